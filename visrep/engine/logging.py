"""Training metrics: one JSON line per log step, TensorBoard scalars (optional), a progress bar.

Only the main process logs (pass ``enabled=False`` elsewhere). ``metrics.jsonl`` is appended to,
so a resumed run continues the same file (:meth:`MetricLogger.truncate_after` drops the lines a
crashed run wrote after the checkpoint it resumes from; ``purge_step`` hides them in TensorBoard).
A failed write of ``metrics.jsonl`` raises :class:`~visrep.errors.WriteError` (path, cause, what is
intact); a failing TensorBoard writer is switched off with one warning.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from visrep.errors import WriteError, os_cause
from visrep.utils import atomic_write_text


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan" / "inf": keep the file valid JSON
    return v


class MetricLogger:
    """``log(record)`` writes ``record`` (a flat dict with a ``step``) to ``out_dir/metrics.jsonl``
    and its numbers to TensorBoard (``out_dir/tb``) when ``tensorboard`` is importable.

    ``progress`` shows a tqdm bar over steps ``[initial, total)`` with img/s and ETA;
    :meth:`advance` moves it (cheap: tqdm redraws at most every ``mininterval`` seconds).
    ``purge_step`` (a resumed run: the checkpoint's step + 1) hides the TensorBoard events a killed
    run wrote from that step on, as ``truncate_after`` does for ``metrics.jsonl``.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 progress: bool = True, total: int | None = None, initial: int = 0, desc: str = "train",
                 purge_step: int | None = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.last_step: int | None = None  # the last step written to metrics.jsonl
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge_step)
            except Exception as e:  # tensorboard missing or broken: JSONL is enough
                warnings.warn(f"TensorBoard logging disabled ({type(e).__name__}: {e})", stacklevel=2)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             mininterval=1.0)

    def set_total(self, total: int) -> None:
        """The run length changed (a time-budgeted run re-fitted its horizon)."""
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def truncate_after(self, step: int) -> None:
        """Drop JSONL lines with ``step > step`` (left by a run that crashed after its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill or a full disk
                continue
        try:
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        except OSError as e:
            raise WriteError(f"{os_cause(e)} while truncating {self.path} to step {step}; it is unchanged") from e
        self.last_step = step

    def _tb_failed(self, e: BaseException) -> None:
        warnings.warn(f"TensorBoard logging to {self.out_dir / 'tb'} stopped ({os_cause(e)}); metrics.jsonl "
                      "continues", stacklevel=3)
        tb, self._tb = self._tb, None
        try:
            tb.close()
        except Exception:  # noqa: BLE001 -- the writer is already broken
            pass

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as e:
            upto = f"steps up to {self.last_step}" if self.last_step is not None else "no step of this run"
            raise WriteError(f"{os_cause(e)} while appending step {record.get('step')} to {self.path}; it holds "
                             f"{upto} (a cut last line is skipped on resume); checkpoints are not affected") from e
        self.last_step = record.get("step", self.last_step)
        if self._tb is not None:
            step = int(record.get("step", 0))
            try:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._tb.add_scalar(f"train/{k}" if "/" not in k else k, v, step)
            except Exception as e:  # noqa: BLE001 -- TensorBoard is optional
                self._tb_failed(e)
        if self._bar is not None:
            post = {k: f"{record[k]:.4g}" for k in ("loss", "lr", "rank", "target_entropy")
                    if isinstance(record.get(k), float)}  # the health signals that fit (visrep.engine.health)
            if "images_per_sec" in record:
                post["img/s"] = f"{record['images_per_sec']:.0f}"
            self._bar.set_postfix(post, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar (main process only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            try:
                self._tb.flush()
                self._tb.close()
            except Exception as e:  # noqa: BLE001 -- TensorBoard is optional
                warnings.warn(f"TensorBoard logging to {self.out_dir / 'tb'} could not be closed ({os_cause(e)})",
                              stacklevel=2)
            self._tb = None


__all__ = ["MetricLogger"]
