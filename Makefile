# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: demo test venv bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 lies on disk here; other versions pull several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/anomaseg demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q

# The short benchmarks (~20 min on an idle 2-core CPU). The paper reproductions take longer and run
# on their own: benchmarks/compare_models.py, benchmarks/study_vae_predictors.py (benchmarks/README.md).
bench: $(STAMP)
	$(PY) benchmarks/bench_speed.py
	$(PY) benchmarks/bench_metrics.py
	$(PY) benchmarks/bench_predictors.py
	$(PY) benchmarks/bench_demo.py

# The long fuzzing run of the loaders and metrics (tests/test_fuzz.py with many random examples;
# ~30-60 min on 2 cores at 2000 examples per property); result in benchmarks/results/fuzz.json.
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	$(PY) benchmarks/fuzz.py --examples $(FUZZ_EXAMPLES)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
