"""Runs that protect themselves (issue #22): a fault test for each guarantee of README "What a run
gives you": one owner per run directory, one-line write errors that lose nothing, numbers checked
up front, image kinds converted, orphaned temporary files removed, NaN recovery, resumed logs equal
to uninterrupted ones, SIGTERM / SIGINT saving. Toys from test_engine (an MLP on 4x4 images)."""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import SlowToy, ToyData, ToyMethod, make_cfg

import visrep.checkpoint as ckpt_mod
import visrep.engine.logging as log_mod
import visrep.utils as utils_mod
from visrep.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from visrep.config import ConfigError, load_config
from visrep.data.folders import SafeImageFolder, decode_image_rgb, skipped_images
from visrep.engine.resume import ResumeError
from visrep.engine.trainer import NonFiniteLossError, train
from visrep.errors import RunDirectoryError, WriteError

TESTS = Path(__file__).resolve().parent
TIMING = ("images_per_sec", "elapsed")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "child.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(body))
    return path


def _child(script: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    return subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"child ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.05)


CHILD_RUN = """
from test_engine import SlowToy, ToyData, make_cfg
from pathlib import Path
from visrep.engine.trainer import train
cfg = make_cfg(Path({root!r}), epochs=1000, ckpt_every={ckpt_every}, log_every=1)
train(cfg, SlowToy(), ToyData(), resume={resume!r})
"""


# ------------------------------------------------------------------------------------------------
# 1. one owner per run directory


def test_second_process_is_refused_then_sigterm_saves_and_exits_143(tmp_path):
    """Two processes into one directory; the owner's SIGTERM (a cluster's pre-emption) saves at the end
    of its current step and exits 128 + 15; the directory then resumes."""
    run = tmp_path / "run"
    child = _child(_script(tmp_path, CHILD_RUN.format(root=str(tmp_path), ckpt_every=2, resume=False)))
    try:
        _wait_for(lambda: (run / "last.pt").is_file() and len(_lines(run / "metrics.jsonl")) >= 3, child)
        before = load_checkpoint(run / "last.pt")["step"]
        owner = json.loads((run / "run.lock").read_text())
        assert owner["pid"] == child.pid
        for resume in (False, True):  # neither a fresh run nor a resume may write under a live run
            with pytest.raises(RunDirectoryError, match=f"in use by another run \\(pid {child.pid} on host"):
                train(make_cfg(tmp_path, max_steps=2), ToyMethod(), ToyData(), resume=resume)
        assert child.poll() is None and load_checkpoint(run / "last.pt")["step"] >= before
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received: saving a checkpoint" in err and "continue with --resume" in err
    last = _lines(run / "metrics.jsonl")[-1]["step"]
    assert load_checkpoint(run / "last.pt")["step"] == last >= 3  # the step it was in, not the last periodic one
    assert not (run / "run.lock").exists()
    res = train(make_cfg(tmp_path, epochs=1000, max_steps=last + 2, ckpt_every=2, log_every=1), SlowToy(),
                ToyData(), resume=True)
    assert res.start_step == last and [r["step"] for r in _lines(run / "metrics.jsonl")] == list(range(1, last + 3))


def test_a_dead_owners_lock_is_taken_over(tmp_path):
    """kill -9 leaves run.lock (its flock died with the process): the next run takes it over."""
    train(make_cfg(tmp_path, max_steps=2), ToyMethod(), ToyData())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "run" / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                           "started": "earlier"}))
    with pytest.warns(UserWarning, match=f"taking over the stale lock of pid {pid}"):
        res = train(make_cfg(tmp_path, max_steps=4), ToyMethod(), ToyData(), resume=True)
    assert res.step == 4 and not (tmp_path / "run" / "run.lock").exists()
    (tmp_path / "run" / "run.lock").write_text(json.dumps({"pid": pid, "host": "another-host", "started": "x"}))
    with pytest.raises(RunDirectoryError, match="recorded by another host.*delete"):
        train(make_cfg(tmp_path, max_steps=6), ToyMethod(), ToyData(), resume=True)


def test_fresh_run_into_a_run_directory_is_refused_unless_forced(tmp_path):
    run = tmp_path / "run"
    train(make_cfg(tmp_path, max_steps=5), ToyMethod(), ToyData())
    saved = (run / "last.pt").read_bytes()
    with pytest.raises(RunDirectoryError, match="already holds a run .*--resume.*--force"):
        train(make_cfg(tmp_path, max_steps=2), ToyMethod(), ToyData())
    assert (run / "last.pt").read_bytes() == saved and len(_lines(run / "metrics.jsonl")) == 3
    assert not (run / "run.lock").exists()  # a refused start leaves no lock
    with pytest.warns(UserWarning, match="moved to .*replaced-"):
        res = train(make_cfg(tmp_path, max_steps=2), ToyMethod(), ToyData(), force=True)
    aside = next(run.glob("replaced-*"))
    assert (aside / "last.pt").read_bytes() == saved
    assert {"config.yaml", "last.pt", "metrics.jsonl", "tb"} <= set(os.listdir(aside))
    assert res.step == 2 and load_checkpoint(run / "last.pt")["step"] == 2
    assert [r["step"] for r in _lines(run / "metrics.jsonl")] == [2]


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(NonFiniteLossError):
        train(make_cfg(tmp_path, ckpt_every=2), ToyMethod(nan_at=5), ToyData())
    assert not (tmp_path / "run" / "run.lock").exists()
    assert not list((tmp_path / "run").glob(".*.tmp"))  # the unverified checkpoint is not left behind


# ------------------------------------------------------------------------------------------------
# 2. failed writes: one line, path, cause, what is intact; nothing saved is lost


def _failing_open(real_open, errno_: int, after: int = 0, match=lambda p: True):
    """``open`` whose files written to matching paths fail with ``errno_`` after ``after`` bytes."""
    class Full(io.RawIOBase):
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            if self.n + len(b) > after:
                raise OSError(errno_, os.strerror(errno_))
            self.n += len(b)
            return self.f.write(b)

        def writable(self):
            return True

        def flush(self):
            self.f.flush()

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()

    def fake(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if ("w" in mode or "a" in mode) and match(str(path)) else f
    return fake


def test_full_disk_during_a_checkpoint_through_torchs_zip_writer(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    monkeypatch.setattr(ckpt_mod, "open", _failing_open(open, errno.ENOSPC, after=200), raising=False)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, {"step": 2, "w": torch.zeros(100_000)})
    msg = str(info.value)
    assert msg.startswith("no space left on device while writing") and str(path) in msg and "\n" not in msg
    assert "unexpected pos" not in msg and "previous checkpoint is intact" in msg
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"] and load_checkpoint(path)["step"] == 1


def test_file_size_limit_is_reported_by_the_real_zip_writer(tmp_path):
    """A real kernel write error (RLIMIT_FSIZE: EFBIG, no root needed) inside torch.save."""
    script = _script(tmp_path, f"""
        import resource, signal, torch
        from visrep.checkpoint import CheckpointError, save_checkpoint
        save_checkpoint({str(tmp_path / 'last.pt')!r}, {{"w": torch.ones(10)}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        try:
            save_checkpoint({str(tmp_path / 'last.pt')!r}, {{"w": torch.zeros(100_000)}})
        except CheckpointError as e:
            print("ERR", e)
    """)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
    assert "ERR file too large" in out.stdout and "previous checkpoint is intact" in out.stdout, out.stderr
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["w"], torch.ones(10))
    assert os.listdir(tmp_path) == ["child.py", "last.pt"]


def test_full_disk_writing_config_yaml_keeps_the_previous_one(tmp_path, monkeypatch):
    train(make_cfg(tmp_path, max_steps=2), ToyMethod(), ToyData())
    config = (tmp_path / "run" / "config.yaml").read_text()
    monkeypatch.setattr(utils_mod, "open", _failing_open(open, errno.ENOSPC), raising=False)
    with pytest.raises(WriteError, match="no space left on device while writing .*config.yaml; the previous "
                                         "config.yaml is intact, .*last.pt is intact"):
        train(make_cfg(tmp_path, max_steps=4), ToyMethod(), ToyData(), resume=True)
    monkeypatch.undo()
    assert (tmp_path / "run" / "config.yaml").read_text() == config
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2


def test_full_disk_while_logging(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, ckpt_every=2, log_every=1)
    real = open
    calls = []

    def fail_after_three(path, mode="r", *a, **k):
        if "a" in mode and str(path).endswith("metrics.jsonl"):
            calls.append(1)
            if len(calls) > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode, *a, **k)

    monkeypatch.setattr(log_mod, "open", fail_after_three, raising=False)
    with pytest.raises(WriteError, match="no space left on device while appending step 4 to .*metrics.jsonl; it "
                                         "holds steps up to 3"):
        train(cfg, ToyMethod(), ToyData())
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2
    assert [r["step"] for r in _lines(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_export_errors_name_the_path_and_cause(tmp_path, monkeypatch):
    from visrep.cli import main
    from visrep.runner import export_checkpoint, load_trained, pretrain

    cfg = load_config(None, ["method.name=ijepa", "data.name=procedural", "data.image_size=16", "model.patch_size=4",
                             "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "method.pred_emb_dim=16",
                             "method.pred_depth=1", "method.min_keep=2", "train.batch_size=8", "train.max_steps=1",
                             f"train.out_dir={tmp_path / 'run'}", "train.progress=false", "train.device=cpu",
                             "data.train_subset=16"])
    pretrain(cfg)
    ck = tmp_path / "run" / "last.pt"
    with pytest.raises(RunDirectoryError, match="already holds a run"):  # said before any data is read
        pretrain(cfg)
    with pytest.raises(WriteError, match="is a folder; give the file to write"):
        export_checkpoint(str(ck), str(tmp_path))
    assert main(["export", str(ck), str(tmp_path)]) == 1  # the CLI: one line, exit 1
    monkeypatch.setattr(utils_mod.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    with pytest.raises(WriteError, match="read-only file system while writing .*enc.safetensors; nothing was written"):
        export_checkpoint(str(ck), str(tmp_path / "enc.safetensors"))
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*.tmp"))
    state = load_checkpoint(ck)
    torch.save(state["model"], tmp_path / "bare.pt")  # a bare state dict
    with pytest.raises(CheckpointError, match="not a visrep training checkpoint .*load_official"):
        load_trained(tmp_path / "bare.pt")
    torch.save({**state, "format": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 99 is not one this visrep reads"):
        load_trained(tmp_path / "future.pt")
    renamed = {**state, "model": {"x." + k: v for k, v in state["model"].items()}}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match="do not fit the ijepa model .*missing .*unexpected"):
        load_trained(tmp_path / "renamed.pt")


# ------------------------------------------------------------------------------------------------
# 3. numbers checked before any data is read


@pytest.mark.parametrize("override, allowed", [
    ("train.max_steps=0", ">= 1"), ("train.max_steps=-1", ">= 1"), ("train.max_minutes=-1", "> 0"),
    ("train.max_minutes=0", "> 0"), ("train.epochs=0", ">= 1"), ("train.batch_size=0", ">= 1"),
    ("train.batch_size=-4", ">= 1"), ("optim.lr=-0.001", ">= 0"), ("model.patch_size=0", ">= 1"),
    ("train.threads=0", ">= 1"), ("data.num_workers=-1", ">= 0"), ("data.image_size=0", ">= 1"),
    ("optim.betas=[0.9,1.5]", "< 1"), ("optim.weight_decay=-1", ">= 0"), ("train.log_every=-1", ">= 0"),
    ("eval.knn_k=[10,0]", ">= 1"), ("model.drop_path_rate=1", "< 1"), ("optim.eps=0", "> 0"),
])
def test_bad_numbers_name_the_key(override, allowed):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config("ijepa/fashion_mnist_demo", [override])
    msg = str(info.value)
    assert msg.startswith(key) and "is not allowed" in msg and allowed in msg


def test_a_config_built_in_code_is_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps: 0 .*at least one step"):
        train(make_cfg(tmp_path, max_steps=0), ToyMethod(), ToyData())
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# 4. image kinds; one summary of skipped files across workers


def _save(im: Image.Image, path: Path, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def test_image_kinds_are_converted(tmp_path):
    grey16 = np.array([[0, 30000, 65535]], dtype=np.uint16)
    out = decode_image_rgb(_save(Image.fromarray(grey16), tmp_path / "g16.png", "PNG"))
    assert out.shape == (3, 1, 3) and out[0].tolist() == [[0, 117, 255]] and torch.equal(out[0], out[2])
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))        # transparent (black underneath): the background
    rgba.putpixel((1, 0), (255, 0, 0, 128))    # half-transparent red
    out = decode_image_rgb(_save(rgba, tmp_path / "a.png", "PNG"))
    assert out[:, 0, 0].tolist() == [255, 255, 255] and out[:, 0, 1].tolist() == [255, 127, 127]
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), "LA")
    assert decode_image_rgb(_save(la, tmp_path / "la.png", "PNG"))[:, 0].T.tolist() == [[50] * 3, [255] * 3]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    out = decode_image_rgb(_save(pal, tmp_path / "p.png", "PNG", transparency=0))
    assert out[:, 0, 0].tolist() == [255, 255, 255] and out[:, 0, 1].tolist() == [0, 255, 0]
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    out = decode_image_rgb(_save(cmyk, tmp_path / "c.jpg", "JPEG", quality=100))
    assert (out[:, 0, 0].int() - 255).abs().max() <= 3 and (out[:, 0, 1].int() - torch.tensor([255, 0, 0])).abs(
    ).max() <= 12
    with pytest.raises(ValueError, match=r"floating-point image \(mode F\)"):
        decode_image_rgb(_save(Image.fromarray(np.ones((2, 2), np.float32)), tmp_path / "f.tif", "TIFF"))


def test_skipped_files_are_counted_across_workers(tmp_path):
    root = tmp_path / "folder"
    for c in ("a", "b"):
        for i in range(6):
            _save(Image.new("RGB", (8, 8), (i * 20, 0, 0)), root / c / f"{i}.png", "PNG")
    bad = [root / "a" / "bad1.png", root / "b" / "bad2.png", root / "b" / "bad3.jpg"]
    for p in bad:
        p.write_bytes(b"not an image")
    ds = SafeImageFolder(root)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    assert sum(x.shape[0] for x, _ in loader) == 15  # each worker warns in its own process
    assert ds.skipped == []  # the main process read nothing itself
    report = skipped_images(torch.utils.data.Subset(ds, range(len(ds))))
    assert report.paths == sorted(map(str, bad)) and report.total == 15 and report.root == str(root)


# ------------------------------------------------------------------------------------------------
# 5. orphaned temporary checkpoints


def test_orphaned_temporary_files_are_removed_at_the_next_start(tmp_path):
    train(make_cfg(tmp_path, max_steps=2), ToyMethod(), ToyData())
    run = tmp_path / "run"
    (run / ".last.pt.k3j_x9ab.tmp").write_bytes(b"\0" * 1000)   # a kill during a save
    (run / ".last.pt.unverified.tmp").write_bytes(b"\0" * 10)   # a kill before it was checked
    (run / "notes.tmp").write_text("the user's")
    with pytest.warns(UserWarning, match="removed 2 temporary file"):
        train(make_cfg(tmp_path, max_steps=4), ToyMethod(), ToyData(), resume=True)
    assert not list(run.glob(".*.tmp")) and (run / "notes.tmp").read_text() == "the user's"


# ------------------------------------------------------------------------------------------------
# 6. NaN: stopped before the bad update is written; resume with another learning rate


class BlowUp(ToyMethod):
    """A finite step whose update blows the weights up (the next loss overflows to inf / NaN)."""

    def __init__(self, at: int, **kw):
        super().__init__(**kw)
        self.at = at

    def after_optimizer_step(self, step):
        if step.step == self.at:
            with torch.no_grad():
                for p in self.encoder.parameters():
                    p.mul_(1e30)


def test_nan_leaves_the_state_before_the_bad_update(tmp_path):
    ref = ToyMethod()
    train(make_cfg(tmp_path, "ref", max_steps=4, log_every=1), ref, ToyData())
    cfg = make_cfg(tmp_path, ckpt_every=1, log_every=1)
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, BlowUp(at=4), ToyData())  # update of step 5 (index 4) blows up; step 6's loss is not finite
    assert info.value.step == 6 and "step 6 (epoch" in str(info.value)
    logged = [r["step"] for r in _lines(tmp_path / "run" / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4, 5]  # the message's step follows metrics.jsonl's numbering
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["step"] == 4 and "(step 4" in str(info.value)  # not step 5: that state holds the blown-up update
    ref_ck = load_checkpoint(tmp_path / "ref" / "last.pt")
    for k, v in ref_ck["model"].items():
        assert torch.equal(v, ck["model"][k]), k


def test_resume_may_change_the_learning_rate_and_records_it(tmp_path):
    with pytest.raises(NonFiniteLossError):
        train(make_cfg(tmp_path, ckpt_every=2, log_every=1), BlowUp(at=4), ToyData())
    cfg = make_cfg(tmp_path, ckpt_every=2, log_every=1, max_steps=8)
    cfg.optim.lr, cfg.optim.betas, cfg.optim.clip_grad = 1e-3, (0.8, 0.99), 1.0
    res = train(cfg, ToyMethod(), ToyData(), resume=True)
    assert res.start_step == 4 and res.step == 8
    event = next(r for r in _lines(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "resume")
    assert event["step"] == 4 and any(c.startswith("optim.lr: 0.01 -> 0.001") for c in event["changes"])
    assert any(c.startswith("optim.betas") for c in event["changes"])
    assert load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.99)
    cfg.optim.name = "sgd"
    with pytest.raises(ResumeError, match="optim.name"):
        train(cfg, ToyMethod(), ToyData(), resume=True)


# ------------------------------------------------------------------------------------------------
# 8. resumed logs equal an uninterrupted run's (metrics.jsonl and TensorBoard)


class CrashOnce(ToyMethod):
    crashed = False

    def training_step(self, batch, step):
        if step.step == 4 and not CrashOnce.crashed:
            CrashOnce.crashed = True
            raise RuntimeError("killed")
        return super().training_step(batch, step)


def _tb_steps(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)] for tag in ("train/loss", "train/lr")}


def test_resumed_logs_equal_an_uninterrupted_run(tmp_path):
    kw = dict(ckpt_every=3, log_every=2, max_steps=10)   # ckpt_every not a multiple of log_every
    train(make_cfg(tmp_path, "a", **kw), ToyMethod(), ToyData())
    with pytest.raises(RuntimeError, match="killed"):
        train(make_cfg(tmp_path, "b", **kw), CrashOnce(), ToyData())
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 3
    train(make_cfg(tmp_path, "b", **kw), CrashOnce(), ToyData(), resume=True)
    a, b = (_lines(tmp_path / n / "metrics.jsonl") for n in ("a", "b"))
    strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in x] for x in (a, b)]
    assert strip[0] == strip[1] and [r["step"] for r in b] == [2, 4, 6, 8, 10]
    assert _tb_steps(tmp_path / "a" / "tb") == _tb_steps(tmp_path / "b" / "tb")


# ------------------------------------------------------------------------------------------------
# 7. SIGTERM / SIGINT: a checkpoint at the end of the current step, then the usual exit


def test_sigint_saves_at_the_end_of_the_step(tmp_path):
    run = tmp_path / "run"
    child = _child(_script(tmp_path, CHILD_RUN.format(root=str(tmp_path), ckpt_every=1000, resume=False)))
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(_lines(run / "metrics.jsonl")) >= 3, child)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGINT, err[-2000:]  # KeyboardInterrupt: Python re-raises the signal
    assert "SIGINT received: saving a checkpoint" in err and "continue with --resume" in err
    assert load_checkpoint(run / "last.pt")["step"] == _lines(run / "metrics.jsonl")[-1]["step"] >= 3
    assert not (run / "run.lock").exists()
