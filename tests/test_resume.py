"""Kill anywhere, resume to the same result.

Real training processes (`anomaseg train`, not mocks) SIGKILL themselves at named points
(`anomaseg.faults`, ANOMASEG_TEST_KILL_AT) and are resumed with `anomaseg train --out RUN --resume`;
the finished run must equal an uninterrupted run of the same seed bit for bit (CPU, fp32): every
tensor of last.pt and best.pt, history.json (but for the wall-clock slices_per_second), the sample
PNGs and calibration.json.

The processes are forked from a forkserver that has imported torch and Lightning once
(`processes.py`), so each of the dozen runs costs its training, not a 5 s interpreter start.
"""

import json
import signal

import pytest
import torch

from anomaseg.cli import main
from anomaseg.run import RunPaths, load_checkpoint, save_checkpoint
from conftest import tiny_train_args, write_dataset
from processes import run_cli


def train_args(data, run):
    # 80 training slices, batch 16: 5 steps per epoch; a mid-epoch checkpoint every 2 steps
    return tiny_train_args(data, run, 3, "--precision", "32", "--seed", "3",
                           "--set", "train.checkpoint_every_steps=2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, and the data and cache it used."""
    root = tmp_path_factory.mktemp("resume")
    data = write_dataset(root / "healthy", 6, lesioned=False, seed=1)
    run = root / "reference"
    assert run_cli(train_args(data, run), root / "cache") == 0
    return data, run, root / "cache"


def assert_same_run(run, ref):
    a, b = RunPaths(run), RunPaths(ref)
    for name in ("last", "best"):
        sa, sb = load_checkpoint(getattr(a, name)), load_checkpoint(getattr(b, name))
        assert sa.keys() == sb.keys() and sa["model"].keys() == sb["model"].keys()
        for k in sb["model"]:
            assert torch.equal(sa["model"][k], sb["model"][k]), f"{name}.pt: {k} differs"
    opt_a, opt_b = load_checkpoint(a.last)["optimizers"], load_checkpoint(b.last)["optimizers"]
    for k in opt_b:
        for p, s in opt_b[k]["state"].items():
            assert all(torch.equal(opt_a[k]["state"][p][n], t) for n, t in s.items()), f"optimizer {k} differs"

    def history(p):
        return [{k: v for k, v in r.items() if k != "slices_per_second"} for r in json.loads(p.read_text())]

    assert history(a.history) == history(b.history)
    assert json.loads(a.calibration.read_text()) == json.loads(b.calibration.read_text())
    assert sorted(p.name for p in a.samples.iterdir()) == sorted(p.name for p in b.samples.iterdir())
    for png in b.samples.iterdir():
        assert (a.samples / png.name).read_bytes() == png.read_bytes(), png.name
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


# Each stage resumes the run the previous stage killed (checkpoints at global steps 2, 4, 5, 6, 8, 10, ...).
KILL_CHAIN = [
    "train_step:epoch=1,step=3",           # mid-epoch, one step after a checkpoint
    "bn_recalibration:epoch=1",            # BatchNorm statistics half re-estimated
    "validation:epoch=1",
    "epoch_outputs:epoch=1",               # history.json and samples ahead of last.pt
    "checkpoint_write:file=best.pt,epoch=1",
    "checkpoint_write:file=last.pt,epoch=1,step=0",   # best.pt new, last.pt not yet renamed
    "train_step:epoch=2,step=2",
    "checkpoint_write:file=last.pt,epoch=1,step=3",   # a mid-epoch checkpoint, not yet renamed
    "validation:epoch=3",
    "calibration",                         # training finished, calibration.json not yet written
]


@pytest.mark.slow
def test_killed_anywhere_resumes_to_the_same_run(reference, tmp_path):
    data, ref, cache = reference
    run = tmp_path / "run"
    resume = ["train", "--out", str(run), "--resume"]
    for i, point in enumerate(KILL_CHAIN):
        code = run_cli(train_args(data, run) if i == 0 else resume, cache, kill_at=point)
        assert code == -signal.SIGKILL, f"the run was not killed at {point} (exit code {code})"
    assert run_cli(resume, cache) == 0
    assert_same_run(run, ref)


@pytest.mark.slow
def test_damaged_last_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys):
    data, ref, cache = reference
    run = tmp_path / "run"
    assert run_cli(train_args(data, run), cache, kill_at="train_step:epoch=2,step=4") == -signal.SIGKILL
    last = RunPaths(run).last
    assert RunPaths(run).last_previous.exists()
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    assert run_cli(["train", "--out", str(run), "--resume"], cache) == 0
    assert_same_run(run, ref)


def test_checkpoints_are_verified_on_load(tmp_path, capsys):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"hparams": {"name": "spatial_ae"}, "model": {"w": torch.arange(4.0)}})
    assert torch.equal(load_checkpoint(good)["model"]["w"], torch.arange(4.0))

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:-100])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    tampered = tmp_path / "tampered.pt"
    state = torch.load(good, weights_only=True)
    state["model"]["w"][0] = 7.0
    torch.save(state, tampered)
    code = tmp_path / "code.pt"
    torch.save({"hparams": {}, "model": {}, "x": signal.Signals.SIGINT}, code)  # needs the full unpickler
    expected = {truncated: "truncated", foreign: "not an anomaseg checkpoint", tampered: "do not match their checksum",
                code: "not an anomaseg checkpoint"}
    for path, message in expected.items():
        with pytest.raises(Exception) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and message in str(err.value), str(err.value)

    # a run whose only checkpoint is damaged stops with one line naming it
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    foreign.rename(RunPaths(run).last)
    assert main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(RunPaths(run).last) in err[0]


@pytest.mark.slow
def test_disk_store_run_killed_mid_epoch_equals_the_in_memory_run(reference, tmp_path):
    """Slices read from the on-disk store through a DataLoader worker, killed mid-epoch and resumed:
    the same run, bit for bit, as the uninterrupted in-memory reference."""
    data, ref, cache = reference
    run = tmp_path / "run"
    args = train_args(data, run) + ["--set", "data.slice_store=disk", "--set", "train.num_workers=1"]
    assert run_cli(args, cache, kill_at="train_step:epoch=2,step=2") == -signal.SIGKILL
    assert run_cli(["train", "--out", str(run), "--resume"], cache) == 0
    assert list((cache / "stores").glob("*.npy"))
    assert_same_run(run, ref)


# The same command, --resume included, re-run after every kill (as a requeued cluster job runs it):
# killed before config.yaml, before the first checkpoint, then at moments drawn at random (seeded,
# so a failure repeats) among the step boundaries, checkpoint writes and epoch ends of the run.
LATER_POINTS = ([f"train_step:epoch={e},step={s}" for e in (1, 2, 3) for s in range(1, 6)]
                + [f"validation:epoch={e}" for e in (1, 2, 3)] + [f"bn_recalibration:epoch={e}" for e in (1, 2, 3)]
                + ["checkpoint_write:file=last.pt,epoch=2,step=0", "checkpoint_write:file=last.pt,epoch=2,step=2"])


@pytest.mark.slow
def test_the_same_command_with_resume_is_idempotent(reference, tmp_path, capsys):
    import random

    data, ref, cache = reference
    run = tmp_path / "run"
    command = train_args(data, run) + ["--resume"]
    drawn = sorted(random.Random(22).sample(range(1, len(LATER_POINTS)), 2))  # index 0 precedes the 2nd kill
    points = ["data_prepared", "train_step:epoch=1,step=1"] + [LATER_POINTS[i] for i in drawn]
    for point in points:
        assert run_cli(command, cache, kill_at=point) == -signal.SIGKILL, f"not killed at {point}"
        if point == "data_prepared":
            assert not RunPaths(run).config.exists()  # died before writing anything of the run
        if point == "train_step:epoch=1,step=1":
            assert not RunPaths(run).last.exists()  # config.yaml, but no checkpoint yet
    assert run_cli(command, cache) == 0
    assert_same_run(run, ref)

    # the folder holds this run: the command of another run (here another seed) is refused, one line
    capsys.readouterr()
    other = [a if a != "3" else "4" for a in command]  # --seed 3 -> --seed 4
    assert main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.seed" in err[0] and str(RunPaths(run).config) in err[0], err


@pytest.mark.slow
def test_sigusr1_and_sigterm_checkpoint_at_the_next_step_and_exit_for_requeue(reference, tmp_path):
    """A scheduler's signals mid-epoch: a checkpoint at that step boundary, exit 128 + signal; the run
    resumed from those checkpoints equals the uninterrupted one. SIGUSR1 comes before the run's first
    own checkpoint, SIGTERM at the last step of an epoch."""
    data, ref, cache = reference
    run = tmp_path / "run"
    command = train_args(data, run) + ["--resume"]
    for point, sig, epoch, step in [("train_step:epoch=1,step=1", signal.SIGUSR1, 0, 1),
                                    ("train_step:epoch=2,step=5", signal.SIGTERM, 1, 5)]:
        assert run_cli(command, cache, kill_at=f"{point},signal={sig.name[3:]}") == 128 + sig
        state = load_checkpoint(RunPaths(run).last)
        assert (state["epoch"], state["step_in_epoch"]) == (epoch, step), sig.name
    assert run_cli(command, cache) == 0
    assert_same_run(run, ref)
