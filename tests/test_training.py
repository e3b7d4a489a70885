import json

import torch

from anomaseg import training
from anomaseg.cli import main
from anomaseg.data.splits import split_cases
from anomaseg.run import RunPaths, load_checkpoint, load_model
from conftest import tiny_train_args


def test_training_writes_a_complete_run(healthy_dir, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_train_args(healthy_dir, run, 2)) == 0
    paths = RunPaths(run)
    for p in (paths.config, paths.split, paths.last, paths.best, paths.history, paths.calibration,
              paths.samples / "epoch_001.png", paths.samples / "epoch_002.png"):
        assert p.exists(), p
    split = json.loads(paths.split.read_text())
    assert split["val"] and not set(split["val"]) & set(split["train"])  # held out by whole case
    history = json.loads(paths.history.read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["val_loss"] > 0 and h["slices_per_second"] > 0 for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    model, config = load_model(run)
    assert config.data.image_size == 32 and not model.training
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_existing_run_needs_resume_and_resume_continues(healthy_dir, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_train_args(healthy_dir, run, 1)) == 0
    assert main(tiny_train_args(healthy_dir, run, 1)) == 2  # would overwrite: refused
    first = load_checkpoint(RunPaths(run).last)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3"]) == 0
    state = load_checkpoint(RunPaths(run).last)
    assert state["epoch"] == 3 and [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert not torch.equal(first["model"]["encoder.0.weight"], state["model"]["encoder.0.weight"])


def test_interrupted_run_resumes_mid_epoch(healthy_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    from anomaseg.models.autoencoders import SpatialVAE

    calls = {"n": 0}
    original = SpatialVAE.training_step

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # epoch 2 (5 steps per epoch), after two of its steps
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(SpatialVAE, "training_step", flaky)
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)
    args = tiny_train_args(healthy_dir, run, 3, "--batch-size", "16", "--set", "train.max_steps_per_epoch=5")
    assert main(args) == 130
    state = load_checkpoint(RunPaths(run).last)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    monkeypatch.setattr(SpatialVAE, "training_step", original)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    state = load_checkpoint(RunPaths(run).last)
    assert state["epoch"] == 3 and len(state["history"]) == 3


def test_labelled_training_data_is_refused(lesioned_dir, tmp_path, capsys):
    assert main(tiny_train_args(lesioned_dir, tmp_path / "run", 1)) == 2
    assert "training data must be healthy" in capsys.readouterr().err


def test_split_holds_out_whole_cases():
    train, val = split_cases([f"c{i}" for i in range(10)], 0.2, seed=0)
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val)
    assert split_cases(["only"], 0.2, 0) == (["only"], [])


def test_split_holds_out_whole_subjects_with_all_their_sessions():
    ids = [f"sub-{s:02d}_ses-{t}" for s in range(10) for t in (1, 2, 3)] + ["sub-10"]
    for seed in range(5):
        train, val = split_cases(ids, 0.2, seed)
        subjects = lambda cases: {c.split("_")[0] for c in cases}  # noqa: E731
        assert sorted(train + val) == sorted(ids) and not subjects(train) & subjects(val)
        assert len(subjects(val)) == 2  # 20% of 11 subjects
    assert split_cases(["sub-01_ses-1", "sub-01_ses-2"], 0.2, 0) == (["sub-01_ses-1", "sub-01_ses-2"], [])


def test_cosine_schedule_is_stateless_and_decays_to_zero():
    lrs = [training.scheduled_lr(1e-3, "cosine", s, 100) for s in range(101)]
    assert lrs[0] == 1e-3 and lrs[-1] < 1e-12 and all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert training.scheduled_lr(1e-3, "constant", 50, 100) == 1e-3


def test_a_resumed_auto_run_keeps_its_compile_decision():
    assert training.resumed_compile_mode("auto", {"compiled": True}) == "on"
    assert training.resumed_compile_mode("auto", {"compiled": False}) == "off"
    assert training.resumed_compile_mode("auto", {"compiled": None}) == "auto"  # had not decided yet
    assert training.resumed_compile_mode("auto", None) == "auto"
    assert training.resumed_compile_mode("off", {"compiled": True}) == "off"  # an explicit setting wins
    assert training.resumed_compile_mode(True, {"compiled": False}) is True
