"""Waiting on the running app by its progress, not by the clock: a busy machine is slow, not stuck.

A fixed timeout either fails on a machine twice as slow (another job on both cores) or hides a hang for a long
time. These helpers wait as long as something observable keeps changing (a gradio_client job's queue rank,
status, denoising step or outputs; the number of finished calls) and fail only when nothing has changed for
``STALL_S`` seconds, saying what was last seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

# Nothing at all happened for this long: stuck. One tiny-model step takes well under a second on an idle CPU,
# and the slowest observed gap between two progress reports under full load was a few seconds.
STALL_S = 180.0
POLL_S = 0.05


class StalledError(AssertionError):
    """The awaited work made no observable progress for the stall limit."""


def wait_while_progressing(
    done: Callable[[], bool], progress: Callable[[], Hashable], what: str, stall_s: float = STALL_S
) -> None:
    """Return once `done()`; raise `StalledError` when `progress()` stays the same for `stall_s` seconds."""
    last_seen, last_change = progress(), time.monotonic()
    while not done():
        time.sleep(POLL_S)
        seen = progress()
        if seen != last_seen:
            last_seen, last_change = seen, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            raise StalledError(f"{what}: no progress for {stall_s:.0f} s (last seen: {last_seen!r})")


def job_progress(job: Any) -> Hashable:
    """What a gradio_client job shows of its progress: status, queue rank, progress bars, outputs so far."""
    status = job.status()
    bars = tuple((unit.desc, unit.index, unit.length) for unit in status.progress_data or ())
    return status.code, status.rank, bars, len(job.outputs())


def wait_for_jobs(jobs: Sequence[Any], what: str, stall_s: float = STALL_S) -> None:
    """Wait until every job is done, for as long as any of them progresses."""
    wait_while_progressing(
        lambda: all(job.done() for job in jobs), lambda: tuple(map(job_progress, jobs)), what, stall_s
    )


def result(job: Any, what: str, stall_s: float = STALL_S) -> Any:
    """`job.result()` once the job is done, waiting while it progresses (raises what the job raised)."""
    wait_for_jobs([job], what, stall_s)
    return job.result(timeout=0)
