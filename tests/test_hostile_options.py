"""Hostile options and environments (issue 9 part 4): each a clear one-line error and exit code 2,
nothing already written damaged, no half-written output."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml

from anomaseg.cli import main
from anomaseg.data.slices import CaseCache
from conftest import tiny_train_args, write_dataset
from hostile import error_line, tree


def _fails(capsys, argv, expected):
    capsys.readouterr()
    assert main(argv) == 2
    line = error_line(capsys.readouterr().err)
    assert expected in line, line
    return line


def _config(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is None:
        path.mkdir()
    else:
        path.write_text(content)
    return str(path)


TRAIN_OPTIONS = {
    "image_size_48": (["--image-size", "48"], "image_size must be a power of two from 32 to 1024, got 48"),
    "image_size_0": (["--image-size", "0"], "image_size must be a power of two"),
    "image_size_4096": (["--image-size", "4096"], "image_size must be a power of two from 32 to 1024"),
    "epochs_0": (["--epochs", "0"], "epochs must be >= 1, got 0"),
    "epochs_negative": (["--epochs", "-3"], "epochs must be >= 1, got -3"),
    "batch_size_0": (["--batch-size", "0"], "batch_size must be >= 1"),
    "lr_nan": (["--set", "train.lr=nan"], "lr must be a positive number"),
    "unknown_model": (["--model", "resnet9000"], "unknown model 'resnet9000'; registered: anovaegan"),
    "unknown_model_param": (["--set", "model.params.bogus=1"], "unexpected keyword argument 'bogus'"),
    "unknown_predictor": (["--set", "score.predictor=nope"], "unknown predictor 'nope'"),
    "predictor_needs_vae": (["--model", "dense_ae", "--set", "model.params={}", "--set", "score.predictor=grad_kl"],
                            "score.predictor 'grad_kl' needs a model with vae; dense_ae has not"),
    "config_is_a_folder": (lambda t: ["--config", _config(t, "c", None)], "c: config path is not a file"),
    "config_binary": (lambda t: ["--config", _config(t, "c.yaml", b"\xff\xfe\x00garbage")], "not a UTF-8 text file"),
    "config_missing": (lambda t: ["--config", str(t / "nope.yaml")], "nope.yaml: config file not found"),
    "config_malformed": (lambda t: ["--config", _config(t, "c.yaml", "train: {epochs: [")], "config is not valid YAML"),
    "config_a_list": (lambda t: ["--config", _config(t, "c.yaml", "- 1\n- 2\n")], "config must be a YAML mapping"),
    "config_unknown_key": (lambda t: ["--config", _config(t, "c.yaml", "train: {epochz: 3}\n")],
                           "unknown config key(s) train.epochz"),
    "config_wrong_type": (lambda t: ["--config", _config(t, "c.yaml", "data: {percentiles: [1, high]}\n")],
                          "config key 'data.percentiles[1]' must be of type"),
    "set_bad_yaml": (["--set", "model.params.beta=["], "the value is not valid YAML"),
    "set_no_value": (["--set", "train.lr"], "--set expects key=value"),
    "precision": (["--set", "train.precision=64"], "precision must be one of"),
    "brain_mask_rule": (["--set", "data.brain_mask=skull"], "brain_mask must be one of auto, nonzero, derived, file"),
}


@pytest.mark.parametrize("kind", TRAIN_OPTIONS)
def test_bad_training_options(healthy_dir, tmp_path, capsys, kind):
    extra, expected = TRAIN_OPTIONS[kind]
    extra = extra(tmp_path) if callable(extra) else extra
    before = set(tmp_path.iterdir())
    _fails(capsys, tiny_train_args(healthy_dir, tmp_path / "run", 1, *extra), expected)
    assert set(tmp_path.iterdir()) == before  # no run folder, no lock file


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast is valid on a GPU")
def test_fp16_on_cpu_is_refused_before_training(healthy_dir, tmp_path, capsys):
    _fails(capsys, tiny_train_args(healthy_dir, tmp_path / "run", 1, "--precision", "16"), "needs a CUDA GPU")
    assert not (tmp_path / "run").exists()


def test_bad_scoring_options(shared_run, lesioned_dir, tmp_path, capsys):
    run, data = str(shared_run), str(lesioned_dir)
    before = tree(shared_run)
    for command in ("score", "evaluate"):
        out = str(tmp_path / command)
        _fails(capsys, [command, "--run", run, "--data", data, "--out", out, "--predictor", "nope"],
               "unknown predictor 'nope'")
        _fails(capsys, [command, "--run", run, "--data", data, "--out", out, "--predictor-params", "[1, 2]"],
               "--predictor-params expects a mapping")
        _fails(capsys, [command, "--run", run, "--data", data, "--out", out, "--predictor-params",
                        "{residual: {bogus: 1}}"], "unexpected keyword argument 'bogus'")
        _fails(capsys, [command, "--run", str(tmp_path / "norun"), "--data", data, "--out", out], "run folder not found")
        _fails(capsys, [command, "--run", data, "--data", data, "--out", out], "not a run folder (no config.yaml)")
        _fails(capsys, [command, "--run", run, "--data", str(tmp_path / "nodata"), "--out", out], "dataset path not found")
    _fails(capsys, ["evaluate", "--run", run, "--data", data, "--out", str(tmp_path / "e"), "--predictor", "residual,nope"],
           "unknown predictor 'nope'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lesioned"]
    assert tree(shared_run) == before


def test_resume_with_zero_epochs_changes_nothing(shared_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(shared_run, run)
    before = tree(run)
    _fails(capsys, ["train", "--out", str(run), "--resume", "--epochs", "0"], "--epochs must be >= 1, got 0")
    assert tree(run) == before


def test_out_inside_a_file(shared_run, healthy_dir, lesioned_dir, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("precious")
    before = sorted(tmp_path.iterdir())
    for argv in (tiny_train_args(healthy_dir, blocker / "run", 1),
                 ["score", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(blocker / "maps")],
                 ["evaluate", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(blocker / "a" / "b")]):
        _fails(capsys, argv, f"{blocker}: is a file, so")
    _fails(capsys, ["score", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(blocker)],
           "notes.txt: output exists and is a file, not a folder")
    assert blocker.read_text() == "precious" and sorted(tmp_path.iterdir()) == before


def test_read_only_output_folder(shared_run, lesioned_dir, tmp_path, capsys, monkeypatch):
    """A read-only folder (simulated: the tests may run as root, for whom chmod does not bite)."""
    import anomaseg.atomic

    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(anomaseg.atomic.os, "open", read_only)
    _fails(capsys, ["score", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(ro / "maps")],
           f"{ro}: cannot write in this folder (Read-only file system)")
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_for_real(shared_run, lesioned_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _fails(capsys, ["score", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(ro / "maps")],
               "cannot write in this folder")
    finally:
        ro.chmod(0o755)


def _disk_full_after(monkeypatch, module, name, n_ok):
    """Make `module.name` (a writer) fail with ENOSPC after `n_ok` successful calls."""
    real = getattr(module, name)
    calls = {"n": 0}

    def writer(obj, target, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real(obj, target, *args, **kwargs)

    monkeypatch.setattr(module, name, writer)


def test_full_disk_while_scoring_keeps_the_previous_output(shared_run, lesioned_dir, tmp_path, capsys, monkeypatch):
    import anomaseg.data.io

    out = tmp_path / "maps"
    assert main(["score", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(out)]) == 0
    before = tree(out)
    _disk_full_after(monkeypatch, anomaseg.data.io.nib, "save", 3)
    line = _fails(capsys, ["score", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(out)],
                  "No space left on device")
    assert line.startswith(f"anomaseg: error: {out / 'les01_segmentation.nii.gz'}: ")  # the final name, not a temporary one
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lesioned", "maps"]


def test_full_disk_while_evaluating(shared_run, lesioned_dir, tmp_path, capsys, monkeypatch):
    import pathlib

    real = pathlib.Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".report.html"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    out = tmp_path / "eval"
    line = _fails(capsys, ["evaluate", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(out)],
                  "No space left on device")
    assert f"{out / 'report.html'}: " in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lesioned"]


@pytest.mark.slow
def test_full_disk_while_training_keeps_the_last_good_checkpoint(healthy_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _disk_full_after(monkeypatch, torch, "save", 2)  # epoch 1 writes last.pt and best.pt; epoch 2 fails
    line = _fails(capsys, tiny_train_args(healthy_dir, run, 3), "No space left on device")
    assert "checkpoints" in line and ".tmp" not in line
    monkeypatch.undo()
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


HOLDER = textwrap.dedent("""
    import sys, time
    from anomaseg.atomic import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_two_commands_on_one_output(shared_run, lesioned_dir, healthy_dir, tmp_path, capsys):
    """While one command writes an output, a second one stops at once and says so; the lock dies
    with its holder (here killed with SIGKILL), so the next command runs."""
    out = tmp_path / "maps"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _fails(capsys, ["score", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(out)],
               f"{out}: another anomaseg command (pid {holder.pid}) is writing this output right now")
        _fails(capsys, tiny_train_args(healthy_dir, out, 1), f"another anomaseg command (pid {holder.pid})")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["score", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healthy", "lesioned", "maps"]  # no lock file left


def test_run_folder_of_another_version(shared_run, lesioned_dir, tmp_path, capsys):
    def copy(name):
        run = tmp_path / name
        shutil.copytree(shared_run, run)
        return run

    def score(run):
        return ["score", "--run", str(run), "--data", str(lesioned_dir), "--out", str(tmp_path / "out")]

    run = copy("newer_config")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["ema_decay"] = 0.999
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    before = tree(run)
    line = _fails(capsys, score(run), "unknown config key(s) train.ema_decay; known: ")
    assert line.endswith("(run folder written by another version of anomaseg?)")
    assert tree(run) == before

    run = copy("other_model_params")
    ckpt_path = run / "checkpoints" / "best.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ckpt["hparams"]["attention_heads"] = 4
    torch.save(ckpt, ckpt_path)
    before = tree(run)
    _fails(capsys, score(run), f"{ckpt_path}: checkpoint does not fit this version of anomaseg's models")
    assert tree(run) == before

    run = copy("damaged_calibration")
    (run / "calibration.json").write_text('{"residual": {"threshold": 0.1')
    before = tree(run)
    _fails(capsys, score(run), "calibration.json: calibration file is damaged")
    assert tree(run) == before

    run = copy("missing_calibration")
    (run / "calibration.json").unlink()
    assert main(score(run)) == 0  # fitted again on the run's held-out healthy cases
    assert "residual" in json.loads((run / "calibration.json").read_text())
    shutil.rmtree(tmp_path / "out")

    run = copy("missing_calibration_and_data")
    (run / "calibration.json").unlink()
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train_dir"] = str(tmp_path / "moved_away")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    _fails(capsys, score(run), "calibration.json: has no calibration of residual for this checkpoint, and it cannot "
                               "be fitted: the run's healthy training data is unusable")

    run = copy("damaged_split")
    (run / "calibration.json").unlink()
    (run / "split.json").write_text("[1, 2")
    _fails(capsys, score(run), "split.json: split file is damaged")
    assert not (tmp_path / "out").exists()


def test_nothing_depends_on_the_working_directory(shared_run, tmp_path, capsys, monkeypatch):
    """`evaluate --data holdout/test` from one folder, then `score --data /abs/.../holdout/test` from
    another, share the slice cache: the cached entries must not hold the path as typed."""
    write_dataset(tmp_path / "project" / "holdout" / "test", 2, lesioned=True, seed=8)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    assert main(["evaluate", "--run", str(shared_run), "--data", "holdout/test", "--out", "eval"]) == 0
    monkeypatch.chdir(tmp_path / "elsewhere")
    absolute = str(tmp_path / "project" / "holdout" / "test")
    assert main(["score", "--run", str(shared_run), "--data", absolute, "--out", "maps"]) == 0
    assert main(["evaluate", "--run", str(shared_run), "--data", "../project/holdout/test", "--out", "eval2"]) == 0
    a = json.loads((tmp_path / "project" / "eval" / "metrics.json").read_text())
    b = json.loads((tmp_path / "elsewhere" / "eval2" / "metrics.json").read_text())
    assert a["pixel_auroc"] == b["pixel_auroc"] and a["data"] == b["data"] == absolute
    # the run folder (trained with a relative --data from another folder) names its data absolutely
    assert os.path.isabs(yaml.safe_load((shared_run / "config.yaml").read_text())["train_dir"])
    cache = CaseCache(yaml.safe_load((shared_run / "config.yaml").read_text())["data"]["cache_dir"]).folder
    for entry in cache.glob("*.npz"):
        with np.load(entry) as z:
            assert "reference" not in z.files
            assert not any(str(tmp_path) in str(z[k]) for k in z.files if z[k].dtype.kind == "U")
