"""What several training processes need besides what Lightning Fabric gives (launch, process group,
devices, precision): averaged gradients, one set of BatchNorm statistics, a check that they agree.

Why gradients are averaged at the optimiser step and not by DDP's wrapper: every model runs its own
`training_step`, and the GANs run several forward/backward passes in it (discriminator, then
generator against the updated discriminator, each network frozen in turn, each with its own
optimiser). DDP synchronises gradients from hooks that its own forward prepares, so each of those
passes would have to go through the wrapper's forward: Fabric refuses model methods that bypass it,
and redirecting `training_step` through the forward (`mark_forward_method`) would run the backward
passes before DDP has prepared them, so nothing would be synchronised. Averaging the gradients an
optimiser is about to apply, right before it applies them, is correct for any number of passes and
any split of the parameters (StyleGAN2-ADA's training loop does the same). Cost: one all-reduce of
a flat buffer per optimiser step, which (unlike DDP's bucketed hooks) does not overlap the backward
pass on GPUs.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Iterable

import torch
import torch.distributed as dist


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")  # Fabric / torchrun, and srun's tasks


def started_by_launcher() -> bool:
    """True in the processes of a multi-process run other than rank 0 (started by Fabric, torchrun
    or srun beside it): they write into the same run folder by design, so they must not take its lock."""
    return any(os.environ.get(name, "0") != "0" for name in RANK_VARIABLES)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _flat_groups(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict = defaultdict(list)
    for t in tensors:
        groups[(t.dtype, t.device)].append(t)
    return list(groups.values())


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view(t.shape))
        offset += n


@torch.no_grad()
def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average tensors over all processes in place (one all-reduce per dtype and device)."""
    n = world_size()
    if n == 1:
        return
    for group in _flat_groups(tensors):
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(n)
        _unflatten_into(flat, group)


@torch.no_grad()
def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite tensors with those of process `src`, in place."""
    if world_size() == 1:
        return
    for group in _flat_groups(tensors):
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src)
        _unflatten_into(flat, group)


class AveragedGradients:
    """Wraps an optimiser: `step()` first averages the gradients of its parameters over all processes.

    Every process must step the same optimisers in the same order with gradients for the same
    parameters (true of every model here: the passes do not depend on the data). Anything else
    (`zero_grad`, `param_groups`, `state_dict`, ...) is the wrapped optimiser's.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, *args, **kwargs):
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        all_reduce_mean_(grads)
        return self.optimizer.step(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


def disagreeing_ranks(digest: str) -> list[int]:
    """Ranks whose `digest` (e.g. of the model's weights) differs from rank 0's."""
    if world_size() == 1:
        return []
    digests: list = [None] * world_size()
    dist.all_gather_object(digests, digest)
    return [r for r, d in enumerate(digests) if d != digests[0]]


# --------------------------------------------------------------------------- an epoch's loss sums
def gather_sums(sums: dict, world: int) -> list[dict[str, float]]:
    """Every process's running loss sums of the epoch, rank by rank."""
    local = {k: float(v) for k, v in sums.items()}
    if world == 1:
        return [local]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    return gathered


def restore_sums(saved, rank: int, world: int) -> dict:
    """This process's running sums from a mid-epoch checkpoint. Saved by as many processes: its
    own; by another number: every process starts from the mean of the saved sums, which keeps the
    epoch's mean over processes right."""
    if isinstance(saved, dict):  # one process (checkpoints of the first exact-resume version)
        saved = [saved]
    if not saved:
        return {}
    if len(saved) == world:
        return dict(saved[rank])
    return {k: sum(s.get(k, 0.0) for s in saved) / len(saved) for k in saved[0]}


def mean_over_processes(sums: dict, world: int) -> dict[str, float]:
    """Per-key mean of `sums` over processes (one all-reduce)."""
    if world == 1:
        return {k: float(v) for k, v in sums.items()}
    keys = list(sums)  # the same order in every process (the same model logs the same terms)
    values = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
    all_reduce_mean_([values])
    return dict(zip(keys, values.tolist()))
