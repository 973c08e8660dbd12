"""Checkpoints that are complete or absent: a run stopped inside a checkpoint write leaves the
earlier states as they were, ``--resume latest`` / ``--resume OUT`` find the newest complete
one, an incomplete folder passed explicitly is refused with one line, ``--keep-last`` prunes
only after a newer state is complete, and the library's own writers never leave a mixed
checkpoint."""
import json

import pytest
import torch

pytest.importorskip("diffusers")
import diffcr  # noqa: E402
from diffcr.app.classcond import run_class_train  # noqa: E402
from diffcr.app.core import find_resume  # noqa: E402
from diffcr.app.options import TrainConfig, TrainError  # noqa: E402


class Killed(BaseException):
    """Stands for SIGKILL inside a write (not an Exception: nothing may catch it)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import write_tiny_dit_folder

    return write_tiny_dit_folder(tmp_path_factory.mktemp("tiny"), images=12)


def _cfg(tiny, out, **kw):
    kw = dict(dict(model=str(tiny / "dit.json"), data=str(tiny / "data"), batch=4, regions=2,
                   progress=False, save_every=2, steps=8, threads=1), **kw)
    return TrainConfig(out=str(out), **kw)


def test_a_run_stopped_inside_a_checkpoint_write_resumes_from_the_newest_complete_one(
        tiny, tmp_path, monkeypatch):
    import safetensors.torch as sf

    torch.set_num_threads(1)
    out = tmp_path / "run"
    real, n = sf.save_file, {"optimizer": 0}

    def dying(tensors, filename, *a, **k):
        if "optimizer" in str(filename):
            n["optimizer"] += 1
            if n["optimizer"] == 3:  # the step-6 state, halfway through
                raise Killed()
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(sf, "save_file", dying)
    with pytest.raises(Killed):
        run_class_train(_cfg(tiny, out))
    monkeypatch.setattr(sf, "save_file", real)
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["step-2", "step-4"]  # step-6 is absent, not half-written
    assert all((out / s / "train_state.json").is_file() for s in visible)
    # what a non-atomic writer used to leave: a step folder without its marker
    (out / "step-7" / "diffcr").mkdir(parents=True)
    assert find_resume("latest", out, "train_state.json") == out / "step-4"
    assert find_resume(str(out), out, "train_state.json") == out / "step-4"
    with pytest.raises(TrainError, match=r"step-7: not a complete checkpoint \(train_state"):
        find_resume(str(out / "step-7"), out, "train_state.json")
    metrics = run_class_train(_cfg(tiny, out, resume="latest", keep_last=1))
    assert metrics["steps"] == 8
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 8
    # --keep-last 1: only the newest complete state is left (step-7 was never one)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-6", "step-7"]
    # the finished run folder itself resumes from its final state
    assert find_resume(str(out), out, "train_state.json") == out


def test_resume_latest_without_any_state_is_one_line(tiny, tmp_path):
    with pytest.raises(TrainError, match="--resume latest: no complete checkpoint"):
        run_class_train(_cfg(tiny, tmp_path / "empty", resume="latest"))


def test_library_writers_leave_the_old_checkpoint_or_a_refused_one(tmp_path, monkeypatch):
    """diffcr.save writes each file aside and renames it, the JSON (with the tensors'
    checksum) last: killed before the JSON, the old JSON no longer matches the new tensors
    and load refuses; killed before the tensors, the old checkpoint is untouched."""
    import safetensors.torch as sf

    from tiny_models import make, set_ratios

    model = make("dit")
    diffcr.convert(model, diffcr.DiffCRConfig(num_regions=2))
    diffcr.save(model, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    set_ratios(model, 0.3)
    real = sf.save_file

    def dying(*a, **k):
        raise Killed()

    monkeypatch.setattr(sf, "save_file", dying)
    with pytest.raises(Killed):
        diffcr.save(model, tmp_path / "ck")
    monkeypatch.setattr(sf, "save_file", real)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    import diffcr.io as dio

    real_atomic = dio.atomic_file

    def die_on_json(path, write):
        if str(path).endswith(".json"):
            raise Killed()
        return real_atomic(path, write)

    monkeypatch.setattr(dio, "atomic_file", die_on_json)
    with pytest.raises(Killed):
        diffcr.save(model, tmp_path / "ck")
    monkeypatch.setattr(dio, "atomic_file", real_atomic)
    fresh = make("dit")
    diffcr.convert(fresh, diffcr.DiffCRConfig(num_regions=2))
    with pytest.raises(diffcr.CheckpointError, match="(?i)checksum|sha"):
        diffcr.load(fresh, tmp_path / "ck")


def test_a_diverging_run_stops_with_its_checkpoints_intact(tiny, tmp_path):
    """--lr 1e30: the weights blow up, the loss turns non-finite, every such step is skipped
    (no weight is written from it) and the run stops after --max-bad-steps in a row, with one
    line; the states written before are complete and finite."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="not finite; the step is skipped"):
        with pytest.raises(TrainError, match=r"not finite for 3 steps in a row"):
            run_class_train(_cfg(tiny, out, lr=1e30, steps=40, save_every=1, max_bad_steps=3))
    states = sorted(out.glob("step-*"))
    assert states and all((p / "train_state.json").is_file() for p in states)
    for p in states:
        w = load_file(str(p / "model" / "diffusion_pytorch_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in w.values()), p.name


def test_a_used_out_folder_is_refused_unless_resumed_or_overwritten(tiny, tmp_path):
    import subprocess
    import sys

    torch.set_num_threads(1)
    out = tmp_path / "run"
    run_class_train(_cfg(tiny, out, steps=4))

    def files():
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = files()
    with pytest.raises(TrainError, match=r"--out .*run holds a previous run's outputs "
                                         r"\(diffcr, diffcr-frozen, metrics.json, model, "
                                         r"\.\.\.\): pass --resume latest"):
        run_class_train(_cfg(tiny, out, steps=4, seed=1))
    assert files() == before  # nothing was touched
    with pytest.raises(TrainError, match="--resume and --overwrite contradict"):
        run_class_train(_cfg(tiny, out, resume="latest", overwrite=True))
    # --overwrite: the old states go first, so --resume latest can only find the new run's
    run_class_train(_cfg(tiny, out, steps=2, save_every=0, overwrite=True))
    assert not list(out.glob("step-*"))
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert not (out / ".diffcr-train.lock").exists()
    # the command line: one line, exit 2
    r = subprocess.run([sys.executable, "-m", "diffcr", "train", "--model",
                        str(tiny / "dit.json"), "--data", str(tiny / "data"), "--out", str(out),
                        "--steps", "1", "--no-progress"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "holds a previous run's outputs" in r.stderr


def test_two_runs_on_one_out_folder_cannot_interleave(tiny, tmp_path):
    import os
    import subprocess
    import sys

    from diffcr.app.core import LOCK_NAME

    torch.set_num_threads(1)
    out = tmp_path / "run"
    out.mkdir()
    host = os.uname().nodename
    (out / LOCK_NAME).write_text(f"{os.getpid()} {host}\n")  # a live run holds it
    with pytest.raises(TrainError, match=rf"in use by another diffcr train \(pid {os.getpid()}"):
        run_class_train(_cfg(tiny, out, steps=2, save_every=0))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    # a lock left by a killed run (its pid is gone) is taken over with a warning
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(f"{dead.pid} {host}\n")
    with pytest.warns(UserWarning, match=f"taking over .*left by a run that was killed "
                                         rf"\(pid {dead.pid} is gone\)"):
        run_class_train(_cfg(tiny, out, steps=2, save_every=0))
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
