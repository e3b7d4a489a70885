"""`torch.compile` for the training step: used where it pays, its cost cached and bounded, eager
whenever it fails.

What it buys: inductor fuses BatchNorm with the activation that follows, and their backward
passes, into single passes over the activation maps (eager PyTorch runs each as its own kernel);
on a 2-core CPU in fp32 that is 7% (64 px) to 11% (128 px) per step for Baur et al.'s VAE
(benchmarks/README.md). What it costs: compilation, up to a few minutes on such a CPU the first
time (11-21 s measured with a warm inductor cache directory, ~100 s cold); seconds later on,
because inductor keeps compiled graphs on disk (`TORCHINDUCTOR_CACHE_DIR`, by default
`$ANOMASEG_CACHE/inductor`).

`train.compile`:
- "auto" (default): after a few eager steps, compile only if the rest of the run would take longer
  than PAYBACK_SECONDS in eager mode, so the compilation is a small fraction of the run; then,
  after a few compiled steps, go back to eager if the compiled step is not faster.
- "on" / true: compile before the first step. "off" / false: never.
A probe (one forward + backward on the real batch, with the model's buffers, gradients and the
random state restored afterwards) runs the compiled code before training uses it: if compilation
fails there, the run says so in one line and continues eagerly. Random numbers inside compiled
code come from PyTorch's own generators (`fallback_random`), as in eager mode.

Only the modules named by `model.compile_targets()` are compiled (the model's forward by
default), and only for training steps: BatchNorm re-estimation, validation and sample images run
eagerly inside `eager()`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn as nn

PAYBACK_SECONDS = 900.0  # compile only when the remaining eager training is at least this long
TIMED_STEPS = 5  # steps timed before deciding (after one warm-up step), eager and compiled alike
MODES = ("auto", "on", "off")


def compile_mode(value) -> str:
    """Normalise the config value (`true`/`false` from YAML, or a mode name)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in MODES:
        raise ValueError(f"train.compile must be one of auto, on, off (or true/false), got {value!r}")
    return value


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled graphs: $TORCHINDUCTOR_CACHE_DIR, else $ANOMASEG_CACHE/inductor."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    from anomaseg.data.slices import CaseCache

    return CaseCache.default_folder() / "inductor"


def compile_forward(module: nn.Module) -> None:
    """Compile `module`'s forward in place (undone by `eager_forward`)."""
    module.forward = torch.compile(module.forward, dynamic=False, options={"fallback_random": True})


def eager_forward(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)


def _differentiable(out) -> list[torch.Tensor]:
    """The tensors of a module's output that carry gradients (for the probe's backward)."""
    if torch.is_tensor(out):
        return [out] if out.requires_grad else []
    return [t for o in (out if isinstance(out, (tuple, list)) else []) for t in _differentiable(o)]


class StepCompiler:
    """Decides whether and when to compile a model's training forward; see the module docstring."""

    def __init__(self, model: nn.Module, mode="auto", autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 log: Callable[[str], None] = print, payback_seconds: float = PAYBACK_SECONDS):
        self.model, self.mode, self.autocast, self.log = model, compile_mode(mode), autocast, log
        self.payback_seconds = payback_seconds
        self.targets: list[nn.Module] = list(model.compile_targets()) if hasattr(model, "compile_targets") else [model]
        off = self.mode == "off" or not self.targets or not hasattr(torch, "compile")
        self.state = "off" if off else "deciding"
        self.eager_times: list[float] = []
        self.compiled_times: list[float] = []
        self.compile_seconds: float | None = None
        self._compile_next = self.mode == "on" and self.state == "deciding"

    @property
    def compiled(self) -> bool:
        return self.state in ("compiled", "checking")

    # --------------------------------------------------------------------------- the loop's hooks
    def before_step(self, x: torch.Tensor) -> None:
        if self._compile_next:
            self._compile_next = False
            self._compile(x)

    def after_step(self, started: float, steps_left: int) -> None:
        """`started`: time.perf_counter() before the step; `steps_left`: steps remaining in the run."""
        if self.state not in ("deciding", "checking"):
            return
        if torch.cuda.is_available():  # only while timing: the steps are asynchronous on a GPU
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if self.state == "deciding":
            self.eager_times.append(seconds)
            if len(self.eager_times) > TIMED_STEPS:  # the first step is a warm-up
                per_step = statistics.median(self.eager_times[1:])
                if self.mode == "on" or per_step * steps_left >= self.payback_seconds:
                    self._compile_next = steps_left > 0
                    self.state = "pending"
                else:
                    self.state = "eager"
        elif self.state == "checking":
            self.compiled_times.append(seconds)
            if len(self.compiled_times) > TIMED_STEPS:
                compiled = statistics.median(self.compiled_times[1:])
                eager = statistics.median(self.eager_times[1:]) if len(self.eager_times) > 1 else None
                if eager is not None and compiled >= 0.98 * eager:
                    self._uncompile(f"compiled step {compiled * 1e3:.0f} ms is not faster than eager "
                                    f"{eager * 1e3:.0f} ms; training continues without torch.compile")
                else:
                    self.state = "compiled"

    @contextlib.contextmanager
    def eager(self):
        """Eager forward inside the block (BatchNorm re-estimation, validation, samples)."""
        if not self.compiled:
            yield
            return
        saved = [t.__dict__.pop("forward") for t in self.targets]
        try:
            yield
        finally:
            for t, fwd in zip(self.targets, saved):
                t.forward = fwd

    def summary(self) -> dict:
        return {"compile": self.mode, "compiled": self.compiled, "compile_seconds": self.compile_seconds}

    # --------------------------------------------------------------------------- internals
    def _compile(self, x: torch.Tensor) -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
        self.log(f"compiling the training step with torch.compile (cache: {os.environ['TORCHINDUCTOR_CACHE_DIR']})")
        t0 = time.perf_counter()
        try:
            for t in self.targets:
                compile_forward(t)
            self._probe(x)
        except Exception as exc:  # any compiler failure: train eagerly
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            self._uncompile(f"torch.compile failed ({type(exc).__name__}: {first_line}); training continues without it")
            return
        self.compile_seconds = time.perf_counter() - t0
        self.state = "checking" if self.eager_times else "compiled"
        self.log(f"compiled in {self.compile_seconds:.0f} s")

    def _uncompile(self, message: str) -> None:
        for t in self.targets:
            eager_forward(t)
        self.state = "eager"
        self.log(message)

    def _probe(self, x: torch.Tensor) -> None:
        """Run the compiled forward and backward once, leaving no trace in the model or the RNG."""
        params = [p for p in self.model.parameters()]
        grads = [p.grad for p in params]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), self.autocast():
                for t in self.targets:
                    outputs = _differentiable(t(x))
                    if outputs:
                        sum(o.float().mean() for o in outputs).backward()
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in zip(params, grads):
                p.grad = g
