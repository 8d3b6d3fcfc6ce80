"""Test hook: make chosen generations fail mid-way, to test that the app survives faults.

Honoured only by the test mode of the app (``python app.py --tiny``, random-weight models); the app never
consults it with real models. Set ``PHOTOMAKER_FAULT_INJECT`` to the path of a small text file. Each
generation that starts while the file reads ``<kind> <count>`` with a count above 0 takes one fault (the count
goes down by one) and fails at its first denoising step:

- ``oom``: allocates ``BALLAST_BYTES`` of memory (what a real out-of-memory leaves in flight), then raises
  ``torch.OutOfMemoryError``; the service must turn it into a clear message and free the memory.
- ``crash``: raises ``RuntimeError`` (an unexpected bug inside the pipeline).

A missing, empty or malformed file means no fault. Tests write the file, call the app, and read the count back.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

ENV_VAR = "PHOTOMAKER_FAULT_INJECT"
KINDS = ("oom", "crash")
BALLAST_BYTES = 256 * 1024 * 1024
SIMULATED_OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 GiB (simulated by PHOTOMAKER_FAULT_INJECT)"
SIMULATED_CRASH_MESSAGE = "simulated failure inside the pipeline (PHOTOMAKER_FAULT_INJECT)"

Report = Callable[[int, int, str], None]
_lock = threading.Lock()


def take_fault(path: str | None = None) -> str | None:
    """The kind of fault this generation must suffer (and one fewer left in the file), or None."""
    path = path if path is not None else os.environ.get(ENV_VAR)
    if not path:
        return None
    with _lock:
        try:
            with open(path, encoding="utf-8") as handle:
                words = handle.read().split()
        except OSError:
            return None
        if len(words) != 2 or words[0] not in KINDS or not words[1].isdigit() or int(words[1]) < 1:
            return None
        kind, count = words[0], int(words[1])
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"{kind} {count - 1}\n")
    logger.warning("%s: injecting a simulated %r fault into this generation", ENV_VAR, kind)
    return kind


def inject(report: Report, path: str | None = None) -> Report:
    """`report` itself when no fault is due; else a progress callback that fails at the first denoising step."""
    kind = take_fault(path)
    if kind is None:
        return report

    def failing_report(step: int, total: int, description: str) -> None:
        if step > 0:  # step 0 is "Preparing the ID photos"; later calls come from inside the denoising loop
            if kind == "oom":
                import torch

                ballast = torch.ones(BALLAST_BYTES // 4)  # written, so really resident
                raise torch.OutOfMemoryError(f"{SIMULATED_OOM_MESSAGE}; {ballast.numel() * 4} bytes in flight")
            raise RuntimeError(SIMULATED_CRASH_MESSAGE)
        report(step, total, description)

    return failing_report
