"""The compiled training step gives the eager step's numbers; a failing compiler falls back to eager;
`auto` compiles only when the run is long enough to repay it, and only keeps what pays."""

import copy
import time

import pytest
import torch

from anomaseg import compilation
from anomaseg.compilation import StepCompiler
from anomaseg.models import create_model


def _vae(seed=0):
    torch.manual_seed(seed)
    return create_model("spatial_vae", tiny=True, image_size=32).train()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_compiled_step_matches_eager_and_the_probe_leaves_no_trace():
    eager, compiled = _vae(), _vae()
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    buffers = {k: v.clone() for k, v in compiled.state_dict().items()}
    rng = torch.get_rng_state()
    logs = []
    compiler = StepCompiler(compiled, "on", log=logs.append)
    compiler.before_step(x)  # compiles, probes with one forward + backward
    assert compiler.compiled and any("compiled in" in m for m in logs), logs
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(buffers[k], v) for k, v in compiled.state_dict().items())
    assert all(p.grad is None for p in compiled.parameters())

    for model in (eager, compiled):  # same sampled noise in both (fallback_random)
        torch.manual_seed(3)
        out = model(x)
        losses = model.loss(x, out)
        losses["loss"].backward()
        model.losses = {k: float(v.detach()) for k, v in losses.items()}
    assert eager.losses == pytest.approx(compiled.losses, rel=1e-5)
    ge, gc = _grads(eager), _grads(compiled)
    overall = max(g.abs().max() for g in ge.values())
    for name in ge:  # relative to the layer's gradient; absolute for gradients that are 0 up to rounding
        assert (ge[name] - gc[name]).abs().max() <= 1e-3 * ge[name].abs().max() + 1e-5 * overall, name
    with compiler.eager():  # the eager path inside eager(), the compiled one after it
        assert "forward" not in compiled.__dict__
    assert "forward" in compiled.__dict__


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor: no working C++ compiler\nlong traceback")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model, reference = _vae(), _vae()
    x = torch.rand(4, 1, 32, 32)
    logs = []
    compiler = StepCompiler(model, "on", log=logs.append)
    compiler.before_step(x)
    assert not compiler.compiled and compiler.state == "eager"
    assert any("torch.compile failed (RuntimeError: inductor: no working C++ compiler)" in m for m in logs), logs
    assert "forward" not in model.__dict__
    opts = model.make_optimizers(1e-3)
    torch.manual_seed(0)
    got = model.training_step(x, opts, lambda loss: loss.backward())
    torch.manual_seed(0)
    want = reference.training_step(x, reference.make_optimizers(1e-3), lambda loss: loss.backward())
    assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in want.items()}


def _fake_steps(compiler, seconds, steps_left, n):
    for _ in range(n):
        compiler.before_step(torch.zeros(1))
        compiler.after_step(time.perf_counter() - seconds, steps_left)


@pytest.fixture
def stub_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(compilation, "compile_forward", lambda m: calls.append(m) or setattr(m, "forward", m.forward))
    monkeypatch.setattr(StepCompiler, "_probe", lambda self, x: None)
    return calls


def test_auto_compiles_only_when_the_rest_of_the_run_repays_it(stub_compile):
    short = StepCompiler(_vae(), "auto", log=lambda m: None, payback_seconds=600)
    _fake_steps(short, 0.1, 1000, 10)  # 100 s of eager training left: not worth a compilation
    assert short.state == "eager" and not stub_compile

    long = StepCompiler(_vae(), "auto", log=lambda m: None, payback_seconds=600)
    _fake_steps(long, 0.1, 100_000, compilation.TIMED_STEPS + 2)  # 10,000 s left
    assert long.compiled and len(stub_compile) == 1
    assert StepCompiler(_vae(), "off").state == "off" and StepCompiler(_vae(), False).state == "off"
    with pytest.raises(ValueError, match="train.compile must be one of"):
        StepCompiler(_vae(), "sometimes")


def test_auto_goes_back_to_eager_when_the_compiled_step_is_not_faster(stub_compile):
    logs = []
    compiler = StepCompiler(_vae(), "auto", log=logs.append, payback_seconds=1)
    _fake_steps(compiler, 0.1, 10_000, compilation.TIMED_STEPS + 2)
    assert compiler.state == "checking"
    _fake_steps(compiler, 0.12, 10_000, compilation.TIMED_STEPS + 1)
    assert compiler.state == "eager" and "not faster" in logs[-1]
    assert "forward" not in compiler.model.__dict__
