"""One training loop for every method.

The trainer knows nothing about any method: it asks the method for parameter groups, feeds it
batches, calls ``training_step`` (through DDP when distributed), steps the optimizer with the
schedules' lr / weight decay, and calls ``after_optimizer_step`` (EMA, centres, ...).

    for step in range(start, total_steps):
        lr, wd = lr_at(step), wd_at(step)                  # pure functions of the step
        losses = method(batch(step), Step(step, ...))      # {"loss": ..., other terms}
        losses["loss"].backward()
        check every term is finite                         # else NonFiniteLossError, no checkpoint
        clip; optimizer.step(); method.after_optimizer_step(...)
        log / online k-NN / checkpoint / time budget

Reproducibility: in the in-memory fast path the batch of step ``s`` is a pure function of
``(seed, s, rank)`` (epoch permutation + a per-step generator for ``prepare_batch``), and
checkpoints hold the RNG states of every rank, so a resumed run gives the same losses as an
uninterrupted one. The DataLoader path resumes at the right batch of the right epoch, but worker
augmentation randomness is not replayed exactly.

Run length and schedule horizon: ``total_steps = epochs * steps_per_epoch`` unless given
(``train(..., total_steps=N)`` or :meth:`Trainer.calibrate_total_steps`). The lr / wd schedules
and ``Step.total_steps`` use the horizon ``int(optim.ipe_scale * total_steps)``. ``train.max_steps``
and ``train.max_minutes`` stop a run early without changing the horizon, so a stopped run is a
prefix of the full one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from visrep.utils import mix_seed
import torch
from torch import Tensor

from visrep.methods.base import Method, Step
from visrep.optim.factory import apply_schedules, build_optimizer
from visrep.optim.schedules import build_schedules, schedule_horizon

from . import distributed as D
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, snapshot_checkpoint
from .logging import MetricLogger

CKPT_FORMAT = 1
HISTORY_TAIL = 1000  # log records kept in a checkpoint


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf; nothing was applied or saved for that step."""

    def __init__(self, message: str, *, step: int, epoch: int, terms: dict[str, float], checkpoint: str | None):
        super().__init__(message)
        self.step, self.epoch, self.terms, self.checkpoint = step, epoch, terms, checkpoint


class ResumeError(ValueError):
    """The checkpoint cannot continue this run (its configuration differs in a way that matters)."""


@dataclass
class TrainResult:
    step: int                              # global steps done
    epoch: int                             # epoch of the last step done
    total_steps: int                       # planned run length (steps)
    stopped_by: str                        # "done" | "max_steps" | "max_minutes"
    checkpoint: str | None                 # path of last.pt (None if nothing was saved)
    start_step: int = 0                    # where this call started (> 0 after a resume)
    losses: list[float] = field(default_factory=list)   # total loss of every step of this call
    history: list[dict] = field(default_factory=list)   # logged records of this call
    knn: list[dict] = field(default_factory=list)       # online k-NN results
    images_per_sec: float = 0.0            # global throughput of this call
    elapsed: float = 0.0                   # seconds of training, including before a resume


# ------------------------------------------------------------------------------------------------
# small helpers





def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        out = [_to_device(b, device) for b in batch]
        return type(batch)(out) if not hasattr(batch, "_fields") else type(batch)(*out)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _rng_state() -> dict:
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached": float(np_cached)},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# data.num_workers / pin_memory / root / download do not change what is trained
_RESUME_IGNORED = {"data.num_workers", "data.pin_memory", "data.root", "data.download"}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every setting that changes the run (method, model, data, optim
    sections, train.batch_size, train.seed)."""
    keep = lambda k: (k.split(".")[0] in ("method", "model", "data", "optim")
                      or k in ("train.batch_size", "train.seed")) and k not in _RESUME_IGNORED
    a = {k: v for k, v in _flat(saved).items() if keep(k)}
    b = {k: v for k, v in _flat(current).items() if keep(k)}
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<unset>") != b.get(k, "<unset>")]


# ------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Set up once (device, data, optimizer, schedules), then :meth:`fit`.

    ``total_steps`` fixes the run length (and so the schedule horizon) instead of
    ``epochs * steps_per_epoch``; :meth:`calibrate_total_steps` measures it for a time budget.
    ``keep_every`` also keeps ``step_N.pt`` every N steps (``last.pt`` is always kept).
    """

    def __init__(self, cfg, method: Method, train_data, *, eval_data=None, total_steps: int | None = None,
                 keep_every: int | None = None):
        self.cfg, self.method, self.train_data, self.eval_data = cfg, method, train_data, eval_data
        tc = cfg.train
        self.keep_every = keep_every
        self.out_dir = Path(tc.out_dir)
        self.last_path = self.out_dir / "last.pt"
        self.last_good: str | None = None

        # -- processes, device, seeds, threads
        D.init_distributed()
        self.rank, self.world = D.get_rank(), D.get_world_size()
        if tc.threads:
            torch.set_num_threads(tc.threads)
        dev = tc.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", D.get_local_rank())
        _seed_everything(tc.seed + self.rank)
        method.to(self.device)
        if tc.precision == "bf16" or (tc.precision == "auto" and self.device.type == "cuda"):
            self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext

        # -- data: steps per epoch
        self.batch_size = tc.batch_size
        self.in_memory = bool(cfg.data.in_memory and hasattr(train_data, "tensors"))
        if self.in_memory:
            from visrep.data.loaders import InMemoryBatches

            images, labels = train_data.tensors()
            self.memory = InMemoryBatches(images, labels, self.batch_size, transform=None, shuffle=True,
                                           drop_last=True, seed=tc.seed, rank=self.rank, world_size=self.world,
                                           device=self.device)
            self.steps_per_epoch = len(self.memory)
            n = images.shape[0]
        else:
            from visrep.data.loaders import build_loader

            pin = cfg.data.pin_memory if cfg.data.pin_memory is not None else self.device.type == "cuda"
            self.loader = build_loader(train_data, self.batch_size, shuffle=True, collate_fn=method.collate(),
                                       num_workers=cfg.data.num_workers, pin_memory=pin, drop_last=True,
                                       seed=tc.seed, distributed=self.world > 1, rank=self.rank,
                                       world_size=self.world)
            self.steps_per_epoch = self.loader.sampler.num_samples // self.batch_size
            n = len(train_data)
        if self.steps_per_epoch < 1:
            raise ValueError(f"train.batch_size={self.batch_size} x {self.world} process(es) is larger than "
                             f"the {n} training images: not one batch per epoch")

        # -- model (DDP / compile) and optimizer
        self.model = method
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers (EMA teachers' BN stats, centres) are each method's business: no per-forward sync
            sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                    else {"broadcast_buffers": False})
            self.model = DDP(method, device_ids=ids, find_unused_parameters=False, **sync)
        if tc.compile:
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(method.param_groups(), cfg.optim)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.set_total_steps(total_steps)

    # -- run length ------------------------------------------------------------------------------
    def set_total_steps(self, total_steps: int | None) -> None:
        """Fix the run length in steps (None: ``epochs * steps_per_epoch``) and rebuild the schedules."""
        self.explicit_total = total_steps is not None
        self.total_steps = int(total_steps) if total_steps is not None else self.cfg.train.epochs * self.steps_per_epoch
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        oc = self.cfg.optim
        scale = 1.0
        if oc.lr_batch_ref:  # linear scaling rule: the whole lr schedule scales with the global batch
            scale = self.batch_size * self.world / oc.lr_batch_ref
        self.lr_schedule, self.wd_schedule = build_schedules(
            _scaled_lr(oc, scale), self.steps_per_epoch, self.total_steps)
        self.horizon = schedule_horizon(self.total_steps, oc.ipe_scale)

    def calibrate_total_steps(self, minutes: float | None = None, *, warmup_steps: int = 3,
                              measure_steps: int = 10, safety: float = 0.9) -> int:
        """Time a few real training steps and set the run length to what fits in ``minutes``.

        ``minutes`` defaults to ``train.max_minutes``. Runs ``warmup_steps`` (compilation, caches)
        then ``measure_steps`` timed steps with a throw-away optimizer, restores the method's
        weights and the RNG states, and calls :meth:`set_total_steps` with
        ``int(safety * minutes * 60 / seconds_per_step)`` (``safety`` leaves room for logging,
        checkpoints and online k-NN). The schedules then end exactly when the budget does; the
        time budget still stops the run if the estimate was optimistic. Returns the step count.
        """
        minutes = minutes if minutes is not None else self.cfg.train.max_minutes
        if not minutes or minutes <= 0:
            raise ValueError("calibrate_total_steps needs a time budget (minutes or train.max_minutes)")
        weights = {k: v.detach().clone() for k, v in self.method.state_dict().items()}
        rng = _rng_state()
        optimizer = build_optimizer(self.method.param_groups(), self.cfg.optim)
        batches = self._batches(0)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        try:
            t0 = 0.0
            for s in range(warmup_steps + measure_steps):
                if s == warmup_steps:
                    sync()
                    D.barrier()
                    t0 = time.perf_counter()
                info = self._step_info(s)
                apply_schedules(optimizer, info.lr, info.wd)
                self._train_step(next(batches), info, optimizer)
            sync()
            seconds = torch.tensor([(time.perf_counter() - t0) / max(1, measure_steps)], dtype=torch.float64)
            seconds = float(D.all_reduce_mean(seconds.to(self._reduce_device)).item())
        finally:
            batches.close()
            self.method.load_state_dict(weights)
            _set_rng_state(rng)
            del optimizer
        steps = max(1, int(safety * minutes * 60.0 / max(seconds, 1e-9)))
        self.seconds_per_step = seconds
        self.set_total_steps(steps)
        return steps

    # -- pieces of the loop ----------------------------------------------------------------------
    @property
    def _reduce_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _step_info(self, step: int) -> Step:
        return Step(step=step, epoch=step // self.steps_per_epoch, total_steps=self.horizon,
                    steps_per_epoch=self.steps_per_epoch, lr=self.lr_schedule(step), wd=self.wd_schedule(step))

    def _batches(self, start_step: int) -> Iterator[Any]:
        """The batches of steps ``start_step, start_step + 1, ...`` (on the training device)."""
        epoch, start = divmod(start_step, self.steps_per_epoch)
        step = start_step
        while True:
            if self.in_memory:
                for images, labels in self.memory.batches(epoch, start):
                    g = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, step, self.rank))
                    yield _to_device(self.method.prepare_batch(images, labels, g), self.device)
                    step += 1
            else:
                from visrep.data.loaders import set_epoch

                set_epoch(self.loader, epoch, start)
                for batch in self.loader:
                    yield _to_device(batch, self.device)
                    step += 1
            epoch, start = epoch + 1, 0

    def _train_step(self, batch: Any, info: Step, optimizer: torch.optim.Optimizer,
                    should_stop=lambda: False) -> tuple[list[str], list[float], bool]:
        """Forward, backward, finite check, clip, optimizer step, method hook.

        Returns the loss names, their values (mean over processes) and whether any process asked
        to stop (``should_stop()``, e.g. the time budget on rank 0): one synchronisation per step.
        """
        with self.autocast():
            out = self.model(batch, info)
        if "loss" not in out:
            raise KeyError(f"training_step must return a dict with a 'loss' entry, got keys {sorted(out)}")
        out["loss"].backward()
        names = list(out)
        vals = torch.stack([out[k].detach().float().reshape(()) for k in names]
                           + [torch.tensor(float(should_stop()), device=out["loss"].device)])
        vals = D.all_reduce_mean(vals.to(self._reduce_device)).tolist()
        values, stop = vals[:-1], vals[-1] > 0
        if not all(math.isfinite(v) for v in values):
            optimizer.zero_grad(set_to_none=True)
            bad = ", ".join(f"{k}={v}" for k, v in zip(names, values) if not math.isfinite(v))
            where = f"last good checkpoint: {self.last_good}" if self.last_good else "no checkpoint written yet"
            raise NonFiniteLossError(f"non-finite loss at step {info.step} (epoch {info.epoch}): {bad}; {where}",
                                     step=info.step, epoch=info.epoch, terms=dict(zip(names, values)),
                                     checkpoint=self.last_good)
        if self.cfg.optim.clip_grad:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.method.after_optimizer_step(info)
        return names, values, stop

    # -- checkpoints -----------------------------------------------------------------------------
    def _save(self, step: int, elapsed: float, history: list[dict]) -> None:
        rng = D.all_gather_object(_rng_state())  # every rank's RNG, so that DDP resumes exactly too
        error = None
        if D.is_main():
            state = {
                "format": CKPT_FORMAT,
                "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": step,
                "epoch": step // self.steps_per_epoch,
                "total_steps": self.total_steps,
                "explicit_total_steps": self.explicit_total,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.world,
                "config": self.cfg.to_dict(),
                "rng": rng,
                "elapsed": elapsed,
                "history": history[-HISTORY_TAIL:],
            }
            try:
                save_checkpoint(self.last_path, state)
                if self.keep_every and step % self.keep_every == 0:
                    snapshot_checkpoint(self.last_path, self.out_dir / f"step_{step}.pt")
            except CheckpointError as e:
                error = str(e)
        error = D.broadcast_object(error)
        if error is not None:
            raise CheckpointError(error)
        self.last_good = str(self.last_path)

    def _resume(self, resume: bool | str) -> dict | None:
        """Load the checkpoint to continue from (None: start fresh); restores weights, optimizer, RNG."""
        if resume is False or resume is None:
            return None
        path = self.last_path if resume in (True, "auto") else Path(resume)
        if resume == "auto" and not Path(path).is_file():
            return None
        state = load_checkpoint(path, map_location="cpu")
        if state.get("format") != CKPT_FORMAT:
            raise ResumeError(f"cannot resume from {path}: not a visrep training checkpoint")
        diffs = config_differences(state["config"], self.cfg.to_dict())
        if state["world_size"] * state["config"]["train"]["batch_size"] != self.world * self.batch_size:
            diffs.append(f"global batch: {state['world_size']} x {state['config']['train']['batch_size']} -> "
                         f"{self.world} x {self.batch_size}")
        if diffs:
            raise ResumeError(f"cannot resume from {path}: the run it holds was configured differently:\n  "
                              + "\n  ".join(diffs)
                              + "\nstart a new run (another train.out_dir) or resume with the original settings")
        if not self.explicit_total and state.get("explicit_total_steps"):
            self.set_total_steps(state["total_steps"])  # e.g. a run calibrated to a time budget
        elif self.total_steps != state["total_steps"]:
            warnings.warn(f"resuming {path} with a different run length ({state['total_steps']} -> "
                          f"{self.total_steps} steps): the lr/wd schedules change from here on", stacklevel=3)
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]
        if len(rng) == self.world:
            _set_rng_state(rng[self.rank])
        self.last_good = str(path)
        return state

    # -- online k-NN -----------------------------------------------------------------------------
    def _online_knn(self) -> dict | None:
        """k-NN top-1 (%) of ``method.features`` on fixed subsets (main process; others wait)."""
        if self._knn_sets is None:
            self._knn_sets = self._make_knn_sets()
        if not self._knn_sets:
            return None
        from visrep.eval.knn import knn_classify

        (xb, yb), (xq, yq) = self._knn_sets
        was_training = self.method.training
        self.method.eval()
        try:
            feats = []
            with torch.inference_mode(), self.autocast():
                for x in (xb, xq):
                    bs = self.cfg.eval.batch_size
                    feats.append(torch.cat([self.method.features(x[i:i + bs].to(self.device)).float().flatten(1)
                                            for i in range(0, x.shape[0], bs)]).cpu())
        finally:
            self.method.train(was_training)
        ks = [k for k in self.cfg.eval.knn_k if k <= xb.shape[0]] or [1]
        acc = knn_classify(feats[0].clone(), yb, feats[1].clone(), yq, ks, temperature=self.cfg.eval.knn_temperature)
        return {f"knn_top1_k{k}": float(v) for k, v in acc.items()}

    def _make_knn_sets(self):
        n = self.cfg.train.online_knn_samples
        try:
            from visrep.eval.knn import knn_classify  # noqa: F401
        except ImportError:
            warnings.warn("online k-NN skipped: visrep.eval.knn is not available", stacklevel=3)
            return []

        def take(data, count, offset=0):
            g = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, 0x4B4E4E))
            if hasattr(data, "tensors"):
                images, labels = data.tensors()
                idx = torch.randperm(images.shape[0], generator=g)[offset:offset + count]
                return images[idx], torch.as_tensor(labels)[idx]
            idx = torch.randperm(len(data), generator=g)[offset:offset + count].tolist()
            items = [data[i] for i in idx]
            return torch.stack([torch.as_tensor(it[0]) for it in items]), torch.as_tensor([int(it[1]) for it in items])

        try:
            if self.eval_data is not None:
                return take(self.train_data, n), take(self.eval_data, n)
            # no evaluation set: a held-out slice of the training set is the query set
            return take(self.train_data, n), take(self.train_data, max(1, n // 5), offset=n)
        except Exception as e:
            warnings.warn(f"online k-NN skipped: cannot take (image, label) samples ({type(e).__name__}: {e})",
                          stacklevel=3)
            return []

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, resume: bool | str = False) -> TrainResult:
        """Train to ``total_steps`` (or until ``train.max_steps`` / ``train.max_minutes``).

        ``resume``: False (fresh run), True (continue from ``out_dir/last.pt``), ``"auto"`` (continue
        if it exists), or the path of a checkpoint.
        """
        cfg, tc = self.cfg, self.cfg.train
        state = self._resume(resume)
        step = state["step"] if state else 0
        elapsed_before = state["elapsed"] if state else 0.0
        history = list(state["history"]) if state else []
        self._knn_sets = None
        stop_at = self.total_steps if tc.max_steps is None else min(self.total_steps, tc.max_steps)
        budget = tc.max_minutes * 60.0 if tc.max_minutes else math.inf

        if D.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out_dir / "config.yaml")
        logger = MetricLogger(self.out_dir, enabled=D.is_main(), progress=tc.progress and D.is_main(),
                              total=stop_at, initial=step)
        if state:
            logger.truncate_after(step)
        result = TrainResult(step=step, epoch=step // self.steps_per_epoch, total_steps=self.total_steps,
                             stopped_by="done", checkpoint=self.last_good, start_step=step)
        images_per_step = self.batch_size * self.world
        self.method.train()
        batches = self._batches(step)
        t_start = time.perf_counter()
        t_log, step_log, sums = t_start, step, {}
        elapsed = lambda: elapsed_before + time.perf_counter() - t_start
        over_budget = lambda: D.is_main() and elapsed() >= budget  # rank 0 decides, all ranks stop
        stop_requested = elapsed() >= budget
        try:
            while step < stop_at and not stop_requested:
                info = self._step_info(step)
                apply_schedules(self.optimizer, info.lr, info.wd)
                names, values, stop_requested = self._train_step(next(batches), info, self.optimizer, over_budget)
                step += 1
                result.losses.append(values[names.index("loss")])
                for k, v in zip(names, values):
                    sums[k] = sums.get(k, 0.0) + v

                if (tc.log_every and step % tc.log_every == 0) or step == stop_at or stop_requested:
                    now = time.perf_counter()
                    record = {"step": step, "epoch": info.epoch, "lr": info.lr, "wd": info.wd}
                    record.update({k: v / (step - step_log) for k, v in sums.items()})
                    if cfg.optim.clip_grad:
                        record["grad_norm"] = float(self.grad_norm)
                    record["images_per_sec"] = images_per_step * (step - step_log) / max(now - t_log, 1e-9)
                    record["elapsed"] = elapsed()
                    logger.log(record)
                    history.append(record)
                    result.history.append(record)
                    del history[:-HISTORY_TAIL]
                    t_log, step_log, sums = now, step, {}
                logger.advance()

                if tc.online_knn and step % self.steps_per_epoch == 0:
                    knn = self._online_knn() if D.is_main() else None
                    D.barrier()
                    if knn:
                        record = {"step": step, "epoch": info.epoch, **knn}
                        logger.log(record)
                        logger.write(f"epoch {info.epoch}: " + ", ".join(f"{k}={v:.2f}" for k, v in knn.items()))
                        history.append(record)
                        result.knn.append(record)

                if tc.ckpt_every and step % tc.ckpt_every == 0 and step < stop_at:
                    self._save(step, elapsed(), history)
        finally:
            logger.close()

        if stop_requested and step < stop_at:
            result.stopped_by = "max_minutes"
        elif step < self.total_steps:
            result.stopped_by = "max_steps"
        if step > result.start_step or not self.last_path.is_file():
            self._save(step, elapsed(), history)
        run_time = time.perf_counter() - t_start
        result.step, result.epoch = step, max(0, step - 1) // self.steps_per_epoch
        result.checkpoint = self.last_good
        result.images_per_sec = images_per_step * (step - result.start_step) / max(run_time, 1e-9)
        result.elapsed = elapsed()
        return result


def _scaled_lr(oc, scale: float):
    if scale == 1.0:
        return oc
    return dataclasses.replace(oc, lr=oc.lr * scale, start_lr=oc.start_lr * scale, final_lr=oc.final_lr * scale)


def train(cfg, method: Method, train_data, *, eval_data=None, resume: bool | str = False,
          total_steps: int | None = None, fit_schedule_to_budget: bool = False,
          keep_every: int | None = None) -> TrainResult:
    """Train ``method`` on ``train_data`` as ``cfg`` says; see :class:`Trainer`.

    ``fit_schedule_to_budget=True`` (with ``train.max_minutes``) measures the step time first and
    sets the run length so that the cosine schedules end when the budget does
    (:meth:`Trainer.calibrate_total_steps`). On resume the checkpoint's run length is reused.
    """
    trainer = Trainer(cfg, method, train_data, eval_data=eval_data, total_steps=total_steps, keep_every=keep_every)
    resuming = resume not in (False, None) and (resume != "auto" or trainer.last_path.is_file())
    if fit_schedule_to_budget and total_steps is None and not resuming:
        trainer.calibrate_total_steps(cfg.train.max_minutes)
    return trainer.fit(resume=resume)


__all__ = ["NonFiniteLossError", "ResumeError", "TrainResult", "Trainer", "config_differences", "train"]
