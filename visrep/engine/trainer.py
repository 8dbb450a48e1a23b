"""One training loop for every method.

The trainer knows nothing about any method: it reads the method's data streams and parameter
groups, feeds it batch dicts, calls ``training_step`` (through DDP when distributed, or on the method
sharded with FSDP2 under ``train.parallel=fsdp``: :mod:`visrep.engine.fsdp`), steps the
optimizer with the schedules' lr / weight decay, and calls the method's hooks.

    for step in range(start, total_steps):
        lr, wd = lr_at(step), wd_at(step)                    # pure functions of the step
        batch = method.prepare_batch(streams(step), g(step)) # dict: image, label, index, [streams]
        losses = method(batch, Step(step, ...))              # {"loss": ..., other terms}
        losses["loss"].backward()
        every term finite on every process?                  # the one host sync of the step
        method.before_optimizer_step(...); clip; optimizer.step(); method.after_optimizer_step(...)
        log (reads the terms at log steps) / online k-NN / checkpoint / time budget

Reproducibility: in the in-memory fast path the batch of step ``s`` is a pure function of
``(seed, s, rank)`` (epoch permutation + a per-step generator for ``prepare_batch``; extra streams
are drawn from ``(seed, stream, s, rank)``), and checkpoints hold the RNG states of every rank, so a
resumed run gives the same losses as an uninterrupted one. The DataLoader path resumes at the right
batch of the right epoch and seeds ``prepare_batch`` the same way, but worker-side per-sample
augmentation is not replayed exactly.

Run length and schedule horizon: ``total_steps = epochs * steps_per_epoch`` unless given
(``train(..., total_steps=N)`` or :meth:`Trainer.calibrate_total_steps`). The lr / wd schedules
and ``Step.total_steps`` use the horizon ``int(optim.ipe_scale * total_steps)``. ``train.max_steps``
and ``train.max_minutes`` stop a run early without changing the horizon, so a stopped run is a
prefix of the full one.

Safety (:mod:`visrep.engine.rundir`, README "What a run gives you"): ``out_dir`` is locked while a
run trains; a fresh run into a directory holding a run is refused unless resumed or forced; a
periodic checkpoint is written at the end of its step and becomes ``last.pt`` only once the next
step's loss is finite, so after a NaN ``last.pt`` is the state the last finite step started from;
SIGINT / SIGTERM save at the end of the current step; every failed write is one line (path, cause,
what is intact).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import Tensor

from visrep import distributed as D
from visrep.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from visrep.config import check_numbers
from visrep.errors import RunDirectoryError, WriteError, os_cause
from visrep.methods.base import Method, Step
from visrep.optim.factory import apply_schedules, build_optimizer, resolve_optim_defaults
from visrep.optim.schedules import build_schedules, schedule_horizon
from visrep.utils import atomic_write_text

from .batches import BatchSource
from .budget import refit_horizon, steps_for_budget
from .health import HealthMonitor, health_stats
from .logging import MetricLogger
from .online_knn import OnlineKNN
from .plots import plot_run
from .resume import ResumeError, check_resumable, config_differences
from .rng import rng_state, seed_everything, set_rng_state
from .rundir import RunLock, StopSignals, claim_run_dir, skipped_summary
from .step import apply_update, forward_backward

CKPT_FORMAT = 2      # 2: + data_info
HISTORY_TAIL = 1000  # log records kept in a checkpoint


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf; nothing was applied or saved for that step. ``step`` is numbered as
    in ``metrics.jsonl`` (the steps done with this one); ``checkpoint`` the last good one (or None)."""

    def __init__(self, message: str, *, step: int, epoch: int, terms: dict[str, float], checkpoint: str | None):
        super().__init__(message)
        self.step, self.epoch, self.terms, self.checkpoint = step, epoch, terms, checkpoint


@dataclass
class TrainResult:
    step: int                              # global steps done
    epoch: int                             # epoch of the last step done
    total_steps: int                       # planned run length (steps)
    stopped_by: str                        # "done" | "max_steps" | "max_minutes" (a signal raises)
    checkpoint: str | None                 # path of last.pt (None if nothing was saved)
    start_step: int = 0                    # where this call started (> 0 after a resume)
    losses: list[float] = field(default_factory=list)   # total loss of every step of this call
    history: list[dict] = field(default_factory=list)   # logged records of this call
    knn: list[dict] = field(default_factory=list)       # online k-NN results
    images_per_sec: float = 0.0            # global throughput of this call
    elapsed: float = 0.0                   # seconds of training, including before a resume
    calibration_seconds: float = 0.0       # timing the step before a time-budgeted run (not in elapsed)
    health: str = ""                       # the collapse signals at the last log step (visrep.engine.health)


class Trainer:
    """Set up once (device, data streams, optimizer, schedules), then :meth:`fit`.

    ``total_steps`` fixes the run length (and so the schedule horizon) instead of
    ``epochs * steps_per_epoch``; :meth:`calibrate_total_steps` measures it for a time budget.
    """

    def __init__(self, cfg, method: Method, train_data, *, eval_data=None, total_steps: int | None = None):
        cfg = dataclasses.replace(cfg, optim=resolve_optim_defaults(cfg.optim))
        check_numbers(cfg)  # (load_config did too) a Config built in code is checked here
        self.cfg, self.method, self.train_data, self.eval_data = cfg, method, train_data, eval_data
        tc = cfg.train
        self.out_dir = Path(tc.out_dir)
        self.last_path = self.out_dir / "last.pt"
        self.candidate_path = self.out_dir / ".last.pt.unverified.tmp"  # removed at the next start if left
        self.last_good: str | None = None
        self.last_good_step: int | None = None

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
        seed_everything(tc.seed + self.rank)
        method.to(self.device)
        if tc.precision == "bf16" or (tc.precision == "auto" and self.device.type == "cuda"):
            self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext

        self.batches = BatchSource(cfg, method, train_data, self.device, self.rank, self.world)
        self.steps_per_epoch, self.batch_size = self.batches.steps_per_epoch, self.batches.batch_size

        # -- model (DDP / FSDP2 / compile) and optimizer
        self.model = method
        self.fsdp = self.world > 1 and tc.parallel == "fsdp"
        if self.fsdp:  # sharded in place: the method is the FSDP root (see visrep/engine/fsdp.py)
            from .fsdp import shard_method

            shard_method(method, self.device, self.world)
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers (EMA teachers' BN stats, centres) are each method's business: no per-forward sync
            opts = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                    else {"broadcast_buffers": False})
            opts.update(method.ddp_options())
            self.model = DDP(method, device_ids=ids, **opts)
        self.eager_model = self.model
        self.compile_pending = tc.compile if tc.compile is not None else self.device.type == "cuda"
        if self.compile_pending:
            self.model = torch.compile(self.model, backend=tc.compile_backend)
        self.optimizer = build_optimizer(method.param_groups(), cfg.optim)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.knn = (OnlineKNN(train_data, eval_data, tc.online_knn_samples, tc.seed, cfg.eval.knn_k,
                              cfg.eval.knn_temperature, cfg.eval.batch_size) if tc.online_knn else None)
        self.refit_to_budget = False   # set by calibrate_total_steps: re-fit the horizon during the run
        self.calibration_seconds = 0.0
        self.set_total_steps(total_steps)
        self.health = HealthMonitor(self.total_steps)

    # -- run length ------------------------------------------------------------------------------
    def set_total_steps(self, total_steps: int | None) -> None:
        """Fix the run length in steps (None: ``epochs * steps_per_epoch``) and rebuild the schedules."""
        self.explicit_total = total_steps is not None
        self.total_steps = int(total_steps) if total_steps is not None else self.cfg.train.epochs * self.steps_per_epoch
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        oc = self.cfg.optim
        scale = 1.0
        if oc.lr_batch_ref:  # scaling rule: the whole lr schedule scales with the global batch
            scale = self.batch_size * self.world / oc.lr_batch_ref
            scale = math.sqrt(scale) if oc.lr_batch_scaling == "sqrt" else scale
        offset = oc.schedule_offset if oc.schedule_offset is not None else self.method.schedule_offset
        self.lr_schedule, self.wd_schedule = build_schedules(
            _scaled_lr(oc, scale), self.steps_per_epoch, self.total_steps, offset=offset)
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
        t_cal = time.perf_counter()
        weights = {k: v.detach().clone() for k, v in self.method.state_dict().items()}
        rng = rng_state()
        optimizer = build_optimizer(self.method.param_groups(), self.cfg.optim)
        batches = self.batches(0)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        try:
            t0 = 0.0
            for s in range(warmup_steps + measure_steps):
                if s == warmup_steps:
                    sync()
                    D.barrier()
                    t0 = time.perf_counter()
                info = self._step_info(s)
                apply_schedules(optimizer, info.lr, info.wd, info.step)
                self._train_step(next(batches), info, optimizer)
            sync()
            seconds = torch.tensor([(time.perf_counter() - t0) / max(1, measure_steps)], dtype=torch.float64)
            seconds = float(D.all_reduce_mean(seconds.to(self._reduce_device)).item())
        finally:
            batches.close()
            self.method.load_state_dict(weights)
            set_rng_state(rng)
            del optimizer
        steps = steps_for_budget(minutes, seconds, safety)
        self.seconds_per_step = seconds
        self.calibration_seconds = time.perf_counter() - t_cal
        # the budget is whichever binds first: with train.max_steps below what the time allows, the
        # schedules end at max_steps (fitting them to the time alone left `--steps` runs un-decayed)
        max_steps = self.cfg.train.max_steps
        self.refit_to_budget = max_steps is None or steps < max_steps
        if not self.refit_to_budget:
            steps = max_steps
        self.set_total_steps(steps)
        return steps

    # -- health ----------------------------------------------------------------------------------
    def _health(self, step: int) -> dict[str, float]:
        """The collapse signals of what the method's loss saw at this log step (one host read, here)."""
        inputs = self.method.health_inputs()
        if not inputs:
            return {}
        with torch.no_grad():
            stats = health_stats(inputs)
        values = dict(zip(stats, torch.stack(list(stats.values())).tolist())) if stats else {}
        k = inputs["target_probs"].shape[-1] if "target_probs" in inputs else None
        self.health.update(step, values, k)
        return values

    # -- one step --------------------------------------------------------------------------------
    @property
    def _reduce_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _step_info(self, step: int) -> Step:
        return Step(step=step, epoch=step // self.steps_per_epoch, total_steps=self.horizon,
                    steps_per_epoch=self.steps_per_epoch, lr=self.lr_schedule(step), wd=self.wd_schedule(step))

    def _forward(self, batch: dict, info: Step) -> dict:
        """The method's step; a compiled model that fails to compile on its first call (no C++
        compiler, an unsupported op) falls back to eager with one warning."""
        if not self.compile_pending:
            return self.model(batch, info)
        self.compile_pending = False
        try:
            return self.model(batch, info)
        except Exception as e:  # noqa: BLE001 -- any compiler failure; a genuine error re-raises in eager
            why = " ".join(str(e).split())[:300]
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {why}); "
                          "training continues in eager mode (train.compile=false silences this)", stacklevel=2)
            self.model = self.eager_model
            return self.model(batch, info)

    def _train_step(self, batch: dict, info: Step, optimizer: torch.optim.Optimizer,
                    should_stop=lambda: False, before_update=None) -> tuple[list[str], Tensor, bool]:
        """Forward, backward, finite check, ``before_update()``, hooks, clip, optimizer step.

        Returns the loss names, their values averaged over processes (a tensor, not read here) and
        whether any process asked to stop (``should_stop()``, e.g. the time budget on rank 0). The
        finite check and the stop flag are the step's one host synchronisation. ``before_update``
        runs once the loss is known finite, before the weights change (the trainer promotes the
        checkpoint written at the end of the previous step there).
        """
        out = forward_backward(self.method, batch, info, forward=self._forward, autocast=self.autocast)
        names = list(out)
        vals = torch.stack([out[k].detach().to(torch.float64).reshape(()) for k in names])
        flags = torch.stack([(~torch.isfinite(vals)).any().float(),
                             torch.tensor(float(should_stop()), dtype=vals.dtype, device=vals.device)])
        packed = D.all_reduce_mean(torch.cat([vals, flags]).to(self._reduce_device))
        vals, (bad, stop) = packed[:-2], packed[-2:].tolist()
        if bad > 0:
            optimizer.zero_grad(set_to_none=True)
            values = vals.tolist()
            bad_terms = (", ".join(f"{k}={v}" for k, v in zip(names, values) if not math.isfinite(v))
                         or "on another process")
            number = info.step + 1  # metrics.jsonl's numbering: the record of a step carries the steps done
            where = (f"last good checkpoint: {self.last_good} (step {self.last_good_step}: the state the last finite "
                     f"step started from); resume it, e.g. with a lower optim.lr: visrep pretrain <config> --resume "
                     "optim.lr=<lower>" if self.last_good else "no checkpoint written yet")
            raise NonFiniteLossError(
                f"non-finite loss at step {number} (epoch {info.epoch}): {bad_terms}; this step's update was not "
                f"applied and nothing of it was saved; {where}",
                step=number, epoch=info.epoch, terms=dict(zip(names, values)), checkpoint=self.last_good)
        if before_update is not None:
            before_update()
        norm = apply_update(self.method, optimizer, info, clip_grad=self.cfg.optim.clip_grad, params=self.params)
        if norm is not None:
            self.grad_norm = D.full_tensor(norm)  # FSDP: a replicated DTensor (no communication)
        return names, vals, stop > 0

    # -- checkpoints -----------------------------------------------------------------------------
    def _save(self, step: int, elapsed: float, history: list[dict], *, rng: list | None = None,
              log_pending: dict | None = None, path: Path | None = None) -> None:
        """Write the state after ``step`` steps to ``path`` (default ``last.pt``); collective.

        ``rng``: every rank's RNG state taken at the end of that step (default: now);
        ``log_pending``: the loss terms of the steps since the last log record (a resumed run
        averages them into its first record, as an uninterrupted run does).
        """
        path = path or self.last_path
        rng = rng if rng is not None else D.all_gather_object(rng_state())  # every rank's, so DDP resumes exactly
        model, optimizer = self.method.state_dict(), self.optimizer.state_dict()
        if self.fsdp:  # whole tensors on the main process: DDP's format, every process gathers
            from .fsdp import full_state

            model, optimizer = full_state(model, D.is_main()), full_state(optimizer, D.is_main())
        error = None
        if D.is_main():
            state = {
                "format": CKPT_FORMAT,
                "model": model,
                "optimizer": optimizer,
                "step": step,
                "epoch": step // self.steps_per_epoch,
                "total_steps": self.total_steps,
                "explicit_total_steps": self.explicit_total,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.world,
                "config": self.cfg.to_dict(),
                "data_info": self.method.data_info.to_dict(),
                "rng": rng,
                "elapsed": elapsed,
                "history": history[-HISTORY_TAIL:],
                "log_pending": log_pending or {"names": [], "rows": []},
            }
            try:
                save_checkpoint(path, state)
            except CheckpointError as e:
                error = str(e)
                if self.last_good and path != self.last_path:
                    error += f"; last good checkpoint: {self.last_good} (step {self.last_good_step})"
        error = D.broadcast_object(error)
        if error is not None:
            raise CheckpointError(error)
        if path == self.last_path:
            self.last_good, self.last_good_step = str(self.last_path), step

    def _promote(self, step: int) -> None:
        """The step after the candidate checkpoint of ``step`` was finite: it becomes ``last.pt``."""
        error = None
        if D.is_main():
            try:
                os.replace(self.candidate_path, self.last_path)
            except OSError as e:
                error = (f"{os_cause(e)} while renaming {self.candidate_path} to {self.last_path}; "
                         + (f"{self.last_path} (step {self.last_good_step}) is intact" if self.last_good
                            else "no checkpoint was written"))
        error = D.broadcast_object(error)
        if error is not None:
            raise CheckpointError(error)
        self.last_good, self.last_good_step = str(self.last_path), step

    def _resume(self, resume: bool | str) -> dict | None:
        """Load the checkpoint to continue from (None: start fresh); restores weights, optimizer, RNG.
        The optimisation settings a resume may change (:data:`~visrep.engine.resume.RESUME_MAY_CHANGE`)
        take this run's values; ``state["changes"]`` lists them."""
        if resume is False or resume is None:
            return None
        path = self.last_path if resume in (True, "auto") else Path(resume)
        if resume == "auto" and not Path(path).is_file():
            return None
        state = load_checkpoint(path, map_location="cpu")
        changes = check_resumable(path, state, self.cfg.to_dict(), self.world, self.batch_size, CKPT_FORMAT)
        if not self.explicit_total and state.get("explicit_total_steps"):
            self.set_total_steps(state["total_steps"])  # e.g. a run calibrated to a time budget
        elif self.total_steps != state["total_steps"]:
            warnings.warn(f"resuming {path} with a different run length ({state['total_steps']} -> "
                          f"{self.total_steps} steps): the lr/wd schedules change from here on", stacklevel=3)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.fsdp:  # a whole (DDP-format) checkpoint, cut into this process's shards
            from .fsdp import load_full_optimizer_state, load_full_state

            load_full_state(self.method, state["model"])
            load_full_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.method.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if changes:  # load_state_dict restored the saved betas / eps / momentum: this run's settings win
            for group, settings in zip(self.optimizer.param_groups, fresh, strict=True):
                group.update(settings)
        rng = state["rng"]
        if len(rng) == self.world:
            set_rng_state(rng[self.rank])
        self.last_good, self.last_good_step = str(path), state["step"]
        state["changes"] = changes
        return state

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, resume: bool | str = False, force: bool = False) -> TrainResult:
        """Train to ``total_steps`` (or until ``train.max_steps`` / ``train.max_minutes``).

        ``resume``: False (fresh run), True (continue from ``out_dir/last.pt``), ``"auto"`` (continue
        if it exists), or the path of a checkpoint. ``force``: a fresh run into a directory that
        holds a run moves that run's files into ``out_dir/replaced-<time>/`` instead of refusing.
        While it runs, ``out_dir`` is locked (:mod:`visrep.engine.rundir`) and SIGINT / SIGTERM stop
        it at the end of the current step with a checkpoint (then ``KeyboardInterrupt`` /
        ``SystemExit(128 + signal)``).
        """
        resuming = resume not in (False, None) and (resume != "auto" or self.last_path.is_file())
        lock, error = None, None
        if D.is_main():
            try:
                lock = RunLock(self.out_dir).acquire()
                claim_run_dir(self.out_dir, resuming=resuming, force=force)
            except (RunDirectoryError, WriteError) as e:
                error = (type(e).__name__, str(e))
                if lock is not None:
                    lock.release()
        error = D.broadcast_object(error)
        if error is not None:
            raise (RunDirectoryError if error[0] == "RunDirectoryError" else WriteError)(error[1])
        try:
            with StopSignals() as signals:
                return self._fit(resume, signals)
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, resume: bool | str, signals: StopSignals) -> TrainResult:
        cfg, tc = self.cfg, self.cfg.train
        state = self._resume(resume)
        step = state["step"] if state else 0
        elapsed_before = state["elapsed"] if state else 0.0
        history = list(state["history"]) if state else []
        stop_at = self.total_steps if tc.max_steps is None else min(self.total_steps, tc.max_steps)
        budget = tc.max_minutes * 60.0 if tc.max_minutes else math.inf

        if D.is_main():
            config_path = self.out_dir / "config.yaml"
            try:
                atomic_write_text(config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            except OSError as e:
                raise WriteError(f"{os_cause(e)} while writing {config_path}; "
                                 + ("the previous config.yaml is intact" if config_path.exists()
                                    else "no config.yaml was written")
                                 + (f", {self.last_good} is intact" if self.last_good else "")) from e
        logger = MetricLogger(self.out_dir, enabled=D.is_main(), progress=tc.progress and D.is_main(),
                              total=stop_at, initial=step, purge_step=step + 1 if state else None)
        result = TrainResult(step=step, epoch=step // self.steps_per_epoch, total_steps=self.total_steps,
                             stopped_by="done", checkpoint=self.last_good, start_step=step)
        images_per_step = self.batch_size * self.world
        pending: list[Tensor] = []   # loss terms of the steps since the last log, read at log steps
        carried = 0                  # of which from before a resume (not this call's losses)
        if state:
            logger.truncate_after(step)
            saved = state.get("log_pending") or {}
            if saved.get("rows"):
                pending = [torch.tensor(r, dtype=torch.float64) for r in saved["rows"]]
                carried = len(pending)
            if state["changes"]:
                record = {"step": step, "event": "resume", "changes": state["changes"]}
                logger.log(record)
                logger.write(f"resumed at step {step} with changed settings: " + "; ".join(state["changes"]))
        self.method.train()
        batches = self.batches(step)
        t_start = time.perf_counter()
        t_log, step_log = t_start, step
        candidate: dict | None = None  # a checkpoint written at the end of a step, not yet last.pt

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - t_start

        def should_stop() -> bool:  # rank 0 decides the budget, any rank a signal; all ranks stop
            return signals.signum is not None or (D.is_main() and elapsed() >= budget)

        def promote() -> None:  # this step's loss is finite: the state it started from is good
            nonlocal candidate
            if candidate is not None:
                self._promote(candidate["step"])
                candidate = None

        stop_requested = elapsed() >= budget
        try:
            while step < stop_at and not stop_requested:
                info = self._step_info(step)
                apply_schedules(self.optimizer, info.lr, info.wd, info.step)
                names, vals, stop_requested = self._train_step(next(batches), info, self.optimizer, should_stop,
                                                               before_update=promote)
                step += 1
                pending.append(vals)
                if self.world == 1 and signals.signum is not None:
                    stop_requested = True

                if (tc.log_every and step % tc.log_every == 0) or step == stop_at or stop_requested:
                    now = time.perf_counter()
                    rows = torch.stack(pending).tolist()
                    result.losses.extend(r[names.index("loss")] for r in rows[carried:])
                    record = {"step": step, "epoch": info.epoch, "lr": info.lr, "wd": info.wd}
                    record.update({k: sum(r[i] for r in rows) / len(rows) for i, k in enumerate(names)})
                    if cfg.optim.clip_grad:
                        record["grad_norm"] = float(self.grad_norm)
                    record["images_per_sec"] = images_per_step * (step - step_log) / max(now - t_log, 1e-9)
                    record["elapsed"] = elapsed()
                    record.update(self._health(step))
                    logger.log(record)
                    history.append(record)
                    result.history.append(record)
                    del history[:-HISTORY_TAIL]
                    t_log, step_log, pending, carried = now, step, [], 0
                    if self.refit_to_budget and budget < math.inf and not stop_requested:
                        new_total = refit_horizon(self.total_steps, step, result.start_step, now - t_start,
                                              budget - elapsed())
                        new_total = D.broadcast_object(new_total)  # every process keeps the same schedule
                        if new_total is not None and tc.max_steps is not None:
                            new_total = min(new_total, tc.max_steps)
                        if new_total is not None:
                            self.set_total_steps(new_total)
                            self.explicit_total = True
                            stop_at = new_total if tc.max_steps is None else min(new_total, tc.max_steps)
                            result.total_steps = self.total_steps
                            logger.set_total(stop_at)
                logger.advance()

                if self.knn is not None and step % self.steps_per_epoch == 0:
                    if self.fsdp:  # every process runs the sharded encoder; the main process reports
                        from .fsdp import unsharded_root

                        with unsharded_root(self.method):
                            knn = self.knn(self.method, self.device, self.autocast)
                        knn = knn if D.is_main() else None
                    else:
                        knn = self.knn(self.method, self.device, self.autocast) if D.is_main() else None
                    D.barrier()
                    if knn:
                        record = {"step": step, "epoch": info.epoch, **knn}
                        logger.log(record)
                        logger.write(f"epoch {info.epoch}: " + ", ".join(f"{k}={v:.2f}" for k, v in knn.items()))
                        history.append(record)
                        result.knn.append(record)

                if tc.ckpt_every and step % tc.ckpt_every == 0 and step < stop_at and not stop_requested:
                    # written now (the state after this step), made last.pt once the next step's loss is
                    # finite: a NaN never leaves last.pt holding the update that produced it
                    log_pending = {"names": names, "rows": torch.stack(pending).tolist() if pending else []}
                    self._save(step, elapsed(), history, log_pending=log_pending, path=self.candidate_path)
                    candidate = {"step": step}
        finally:
            batches.close()
            self.batches.close()
            logger.close()
            if candidate is not None and D.is_main():  # never checked: a NaN, or an exception
                with contextlib.suppress(OSError):
                    os.unlink(self.candidate_path)

        if signals.signum is not None and step < stop_at:
            result.stopped_by = signals.name
        elif stop_requested and step < stop_at:
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
        result.calibration_seconds = self.calibration_seconds
        result.health = self.health.summary()
        if D.is_main():
            if tc.progress and self.health.last:
                print(result.health, flush=True)
            if tc.plot:
                plot_run(self.out_dir)
        skipped_summary(self.train_data, logger if D.is_main() else None)
        if signals.signum is not None:
            signals.exit(f"stopped by {signals.name} after step {step}; checkpoint: {self.last_good}; continue with "
                         "--resume")
        return result


def _scaled_lr(oc, scale: float):
    if scale == 1.0:
        return oc
    return dataclasses.replace(oc, lr=oc.lr * scale, start_lr=oc.start_lr * scale, final_lr=oc.final_lr * scale)


def train(cfg, method: Method, train_data, *, eval_data=None, resume: bool | str = False,
          total_steps: int | None = None, fit_schedule_to_budget: bool = False, force: bool = False) -> TrainResult:
    """Train ``method`` on ``train_data`` as ``cfg`` says; see :class:`Trainer`.

    ``fit_schedule_to_budget=True`` (with ``train.max_minutes``) measures the step time first and
    sets the run length so that the cosine schedules end when the budget does
    (:meth:`Trainer.calibrate_total_steps`). On resume the checkpoint's run length is reused.
    ``force``: start over in a directory that holds a run (its files move aside; :meth:`Trainer.fit`).
    """
    trainer = Trainer(cfg, method, train_data, eval_data=eval_data, total_steps=total_steps)
    resuming = resume not in (False, None) and (resume != "auto" or trainer.last_path.is_file())
    if fit_schedule_to_budget and total_steps is None and not resuming:
        trainer.calibrate_total_steps(cfg.train.max_minutes)
    return trainer.fit(resume=resume, force=force)


__all__ = ["NonFiniteLossError", "ResumeError", "TrainResult", "Trainer", "config_differences", "train"]
