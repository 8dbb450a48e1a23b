"""A run's length from a time budget: how many steps fit, and how to re-fit that during the run.

``train.max_minutes`` stops a run; with ``fit_schedule_to_budget`` the schedules also end when the
budget does: the step time is measured first (:meth:`visrep.engine.Trainer.calibrate_total_steps`,
``steps_for_budget``) and the horizon is re-fitted at log steps from the pace since the start
(``refit_horizon``), because the machine's speed drifts.
"""
from __future__ import annotations


def steps_for_budget(minutes: float, seconds_per_step: float, safety: float = 0.9) -> int:
    """Steps that fit in ``minutes`` at ``seconds_per_step``, keeping ``1 - safety`` for logging,
    checkpoints and online k-NN."""
    return max(1, int(safety * minutes * 60.0 / max(seconds_per_step, 1e-9)))


def refit_horizon(total_steps: int, step: int, start_step: int, run_seconds: float, remaining: float) -> int | None:
    """A time-budgeted run's new length from the throughput measured so far (None: keep ``total_steps``).

    The steps still to do are what the remaining time allows at the average pace since the start
    (checkpoints and logging included), less 1 % kept for the final checkpoint. Fewer than 20 steps
    measured, or a change under 1 %, keep the length so that the schedules do not jitter."""
    done = step - start_step
    if done < 20 or run_seconds <= 0:
        return None
    new_total = step + max(1, int(0.99 * remaining * done / run_seconds))
    return new_total if abs(new_total - total_steps) > 0.01 * total_steps else None
