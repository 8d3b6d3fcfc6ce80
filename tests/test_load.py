"""Load: 40 concurrent calls against the tiny app with a bounded queue (``--max-queue 8``).

Every call either completes with its own images or is told the queue is full; none is lost or answered twice
(each call carries its own seed, which comes back both as the seed used and inside its PNG); afterwards the
server's memory is back near its baseline and temporary files stay within the app's cache policy (Gradio's
``delete_cache``, which removes uploads and outputs after an hour and everything at shutdown).

Each call comes from its own gradio_client session, as from 40 people. (Several calls through one session race
inside gradio_client: when the server closes the session's event stream after its last pending call, a call
submitted at that moment is never read and its job ends in ``CancelledError``; seen under load.) Waits follow
the calls' progress (tests/waiting.py), so a slow or busy machine only makes the test slower.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError

from photomaker.metadata import read_parameters

pytest.register_assert_rewrite("app_server", "robust_app")
from robust_app import SMALL_QUEUE, RobustServer, generate_args
from waiting import StalledError, wait_for_jobs

pytest_plugins = ["app_server", "robust_app"]

CALLS = 40
FIRST_SEED = 700_000
MIB = 1024 * 1024
MAX_CACHE_AGE_S = 24 * 3600  # an upload or output older than a day must be gone


def _files(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()} if folder.exists() else set()


def _outcome(job: Any, seed: int) -> tuple[str, Any]:
    """("done", (seed used, seeds in the PNGs, number of answers)) or ("queue full", message)."""
    if not job.done():
        return "lost", f"no answer for seed {seed} while the other calls had stopped progressing"
    try:
        images, seed_used, _crops, _notes = job.result(timeout=0)
    except QueueError as error:
        return "queue full", str(error)
    except AppError as error:
        if "queue is full" in str(error).lower():
            return "queue full", str(error)
        return "error", str(error)
    except Exception as error:  # e.g. concurrent.futures.CancelledError: reported with the call's seed
        return "error", repr(error)
    png_seeds = [read_parameters(item["image"])["seed"] for item in images]
    return "done", (int(seed_used), png_seeds, len(job.outputs()))


def test_forty_concurrent_calls_complete_or_are_told_the_queue_is_full(robust_server: RobustServer) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:  # each client fetches the app's config: connect in parallel
        clients = list(pool.map(lambda _: robust_server.client(), range(CALLS)))
    try:
        clients[0].predict(**generate_args(seed=FIRST_SEED - 1), api_name="/generate")  # loaded and warm
        baseline_rss = robust_server.rss()
        cache_before = _files(robust_server.cache_dir)
        tmp_before = _files(robust_server.tmp_dir)

        started = time.monotonic()
        jobs = [
            (FIRST_SEED + i, client.submit(**generate_args(seed=FIRST_SEED + i), api_name="/generate"))
            for i, client in enumerate(clients)
        ]
        with contextlib.suppress(StalledError):  # the calls still waiting are reported as lost below
            wait_for_jobs([job for _, job in jobs], f"{CALLS} concurrent calls")
        outcomes = {seed: _outcome(job, seed) for seed, job in jobs}
        elapsed = time.monotonic() - started

        kinds = Counter(kind for kind, _ in outcomes.values())
        unexpected = {seed: outcome for seed, outcome in outcomes.items() if outcome[0] not in ("done", "queue full")}
        assert not unexpected, f"calls neither completed nor were told the queue is full: {unexpected}"
        assert kinds["done"] + kinds["queue full"] == CALLS
        assert kinds["queue full"] >= 1, "40 calls at once never filled a queue of 8: the queue is not bounded"
        assert kinds["done"] >= SMALL_QUEUE, f"only {kinds['done']} calls were served"
        for seed, (kind, detail) in outcomes.items():
            if kind == "done":
                seed_used, png_seeds, answers = detail
                # Its own answer (not another call's), exactly once.
                assert (seed_used, png_seeds, answers) == (seed, [seed], 1), seed
            else:
                assert "Queue is full" in detail, detail

        # Still serving, and the queue is empty again: a new call is accepted at once.
        images, seed, _, _ = clients[1].predict(**generate_args(seed=FIRST_SEED + CALLS), api_name="/generate")
        assert seed == FIRST_SEED + CALLS and len(images) == 1

        grown = robust_server.rss() - baseline_rss
        allowed = max(256 * MIB, baseline_rss // 4)
        assert grown < allowed, f"RSS grew by {grown / MIB:.0f} MiB over {kinds['done']} generations"

        # Temporary files: nothing outside Gradio's managed cache (the server's TMPDIR stays as it was); inside
        # it, one result image and one face crop per completed call at most (the shared upload is stored once).
        assert _files(robust_server.tmp_dir) == tmp_before
        new_cache_files = _files(robust_server.cache_dir) - cache_before
        assert len(new_cache_files) <= 2 * (kinds["done"] + 1) + 1, sorted(map(str, new_cache_files))
        print(f"{CALLS} calls in {elapsed:.1f} s: {dict(kinds)}; RSS {grown / MIB:+.0f} MiB")
    finally:
        for client in clients:
            client.close()


def test_the_app_declares_a_cache_policy(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uploads and outputs are deleted on a schedule (and at shutdown): Gradio's delete_cache is set and bounded."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    import app
    from photomaker.service import PhotoMakerService, ServiceConfig

    demo = app.build_demo(PhotoMakerService(ServiceConfig(tiny_dir=str(tiny_models_dir))), tiny=True)
    assert demo.delete_cache is not None, "app.py keeps every upload and output until the server restarts"
    frequency, age = demo.delete_cache
    assert 0 < frequency <= age <= MAX_CACHE_AGE_S
