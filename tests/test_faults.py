"""Faults inside a generation: out of memory, an unexpected exception, a cancelled or abandoned request.

Each is reported to the user whose request failed (and only to them) with a message that says what to do, the
memory the failed generation held is released at once, and the next request works. In-process tests fail the
tiny pipeline by monkeypatching; through the running app, faults come from the ``--tiny`` test hook
``PHOTOMAKER_FAULT_INJECT`` (``photomaker/testsupport/fault_injection.py``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image, ImageEnhance

from photomaker.errors import InvalidRequestError
from photomaker.service import GenerationRequest, PhotoMakerService
from photomaker.testsupport import fault_injection

pytest.register_assert_rewrite("app_server", "robust_app")
from robust_app import ASTRONAUT, RobustServer, generate_args
from waiting import job_progress, result, wait_while_progressing

pytest_plugins = ["app_server", "robust_app"]

BALLAST_BYTES = 64 * 1024 * 1024  # what the simulated failing step holds when it fails
MIB = 1024 * 1024
OOM_MESSAGE = "Ran out of memory generating {n} image(s) at {w}x{h}"


def astronaut_variant(k: int) -> Image.Image:
    """The astronaut with a slightly different brightness: the same face, a new ID-encoding cache key."""
    with Image.open(ASTRONAUT) as image:
        return ImageEnhance.Brightness(image.convert("RGB")).enhance(1.0 + k / 100)


def library_request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "id_images": [str(ASTRONAUT)],
        "prompt": "a photo of a woman img",
        "num_steps": 2,
        "num_outputs": 2,
        "width": 64,
        "height": 64,
        "seed": 5,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


class FailingCall:
    """A stand-in for a model call that allocates `BALLAST_BYTES` and then raises `error` (when `applies`)."""

    def __init__(self, original: Any, error: BaseException, applies=lambda *a, **k: True) -> None:
        self.original = original
        self.error = error
        self.applies = applies
        self.ballasts: list[weakref.ref] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.applies(*args, **kwargs):
            return self.original(*args, **kwargs)
        ballast = torch.ones(BALLAST_BYTES // 4)
        self.ballasts.append(weakref.ref(ballast))
        raise self.error


def _target(service: PhotoMakerService, where: str) -> tuple[Any, str]:
    pipe = service.pipeline
    return {
        "id_encoder": (pipe.id_encoder, "encode_images"),
        "unet": (pipe.unet, "forward"),
        "vae_decode": (pipe.vae, "decode"),
    }[where]


# ------------------------------------------------------------------------------------------------ library


@pytest.mark.parametrize("where", ["id_encoder", "unet", "vae_decode"])
def test_out_of_memory_is_explained_and_its_memory_freed_at_once(
    library_service: PhotoMakerService, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    target, name = _target(library_service, where)
    failing = FailingCall(getattr(target, name), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"))
    photo = astronaut_variant({"id_encoder": 1, "unet": 2, "vae_decode": 3}[where])  # a cache miss: the encoder runs
    with monkeypatch.context() as patch:
        patch.setattr(target, name, failing)
        with pytest.raises(InvalidRequestError) as refused:
            library_service.generate(library_request(id_images=[photo]))
        message = str(refused.value)
        assert OOM_MESSAGE.format(n=2, w=64, h=64) in message
        assert "fewer images or a smaller size" in message and "PHOTOMAKER_OFFLOAD=model" in message
        # The caller (here pytest, in the app Gradio's worker thread) still holds the error, yet the tensors of
        # the failed run are gone: on a GPU they would otherwise stay allocated until the error is collected.
        assert failing.ballasts, "the simulated failure did not run"
        assert failing.ballasts[0]() is None, "the failed generation's memory is still referenced by the error"
    result = library_service.generate(library_request(id_images=[photo], seed=41))
    assert [item.seed for item in result.images] == [41, 42]


def test_unexpected_exception_propagates_unchanged_and_frees_memory(
    library_service: PhotoMakerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, name = _target(library_service, "unet")
    failing = FailingCall(getattr(target, name), RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"))
    with monkeypatch.context() as patch:
        patch.setattr(target, name, failing)
        with pytest.raises(RuntimeError, match="CUDNN_STATUS_INTERNAL_ERROR"):
            library_service.generate(library_request())
        assert failing.ballasts and failing.ballasts[0]() is None
    assert len(library_service.generate(library_request(num_outputs=1)).images) == 1


def test_out_of_memory_fails_only_the_request_that_ran_out(
    library_service: PhotoMakerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two users at once: the one whose 72-pixel-wide request runs out of memory is told; the other gets images."""
    target, name = _target(library_service, "unet")

    def wide_latents(sample: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
        return sample.shape[-1] == 72 // 8

    failing = FailingCall(getattr(target, name), torch.OutOfMemoryError("CUDA out of memory"), wide_latents)
    outcomes: dict[str, Any] = {}

    def run(user: str, request: GenerationRequest) -> None:
        try:
            outcomes[user] = library_service.generate(request)
        except (InvalidRequestError, RuntimeError) as error:  # recorded for the assertions below
            outcomes[user] = error

    with monkeypatch.context() as patch:
        patch.setattr(target, name, failing)
        users = [
            threading.Thread(target=run, args=("wide", library_request(width=72, num_outputs=1, seed=1))),
            threading.Thread(target=run, args=("square", library_request(num_outputs=1, seed=2))),
        ]
        for user in users:
            user.start()
        wait_while_progressing(
            lambda: not any(user.is_alive() for user in users),
            lambda: tuple(user.is_alive() for user in users),
            "two library users",
        )
    assert isinstance(outcomes["wide"], InvalidRequestError)
    assert OOM_MESSAGE.format(n=1, w=72, h=64) in str(outcomes["wide"])
    assert [item.seed for item in outcomes["square"].images] == [2]


# ------------------------------------------------------------------------------------- through the app


@pytest.fixture(scope="module")
def client(robust_server: RobustServer):
    client = robust_server.client()
    client.predict(**generate_args(seed=0), api_name="/generate")  # the model is loaded and warm
    yield client
    client.close()


def _denoising_reached(job: Any, min_step: int) -> bool:
    units = job.status().progress_data or []
    return any((unit.desc or "").startswith("Denoising") and (unit.index or 0) >= min_step for unit in units)


def _wait_until_denoising(job: Any, min_step: int = 2) -> None:
    """Block until `job` reports denoising step `min_step` (so a cancel lands mid-way), or fail."""
    wait_while_progressing(
        lambda: job.done() or _denoising_reached(job, min_step), lambda: job_progress(job), "a 30-step generation"
    )
    if not _denoising_reached(job, min_step):
        pytest.fail(f"the generation finished before it could be interrupted: {job.status()}")


def test_out_of_memory_is_reported_to_that_user_only_and_memory_returns(robust_server: RobustServer, client) -> None:
    other_user = robust_server.client()
    try:
        client.predict(**generate_args(seed=2), api_name="/generate")
        baseline = robust_server.rss()
        robust_server.inject("oom", 1)
        failing = client.submit(**generate_args(num_steps=3, seed=10), api_name="/generate")
        _wait_until_started(failing)
        passing = other_user.submit(**generate_args(seed=11), api_name="/generate")
        with pytest.raises(AppError) as refused:
            result(failing, "the failing call")
        assert OOM_MESSAGE.format(n=1, w=64, h=64) in str(refused.value)
        assert "PHOTOMAKER_OFFLOAD=model" in str(refused.value)
        images, seed, _, _ = result(passing, "the other user's call")
        assert seed == 11 and len(images) == 1
        assert robust_server.faults_left() == 0
        # The failing step held 256 MiB when it raised; none of it may stay behind.
        grown = robust_server.rss() - baseline
        assert grown < fault_injection.BALLAST_BYTES // 2, f"RSS grew by {grown / MIB:.0f} MiB after the failure"
        images, seed, _, _ = client.predict(**generate_args(seed=12), api_name="/generate")
        assert seed == 12 and len(images) == 1
    finally:
        other_user.close()
        robust_server.inject("oom", 0)


def _wait_until_started(job: Any) -> None:
    wait_while_progressing(
        lambda: job.done() or job.status().code in (Status.PROGRESS, Status.PROCESSING),
        lambda: job_progress(job),
        "a call waiting to start",
    )


def test_unexpected_exception_gives_a_plain_message_and_the_log_keeps_the_details(
    robust_server: RobustServer, client
) -> None:
    robust_server.inject("crash", 1)
    try:
        with pytest.raises(AppError) as refused:
            client.predict(**generate_args(seed=20), api_name="/generate")
    finally:
        robust_server.inject("crash", 0)
    message = str(refused.value)
    assert "Generation failed unexpectedly (RuntimeError). The app is still running: try again" in message
    assert fault_injection.SIMULATED_CRASH_MESSAGE not in message  # internals stay in the server log
    assert fault_injection.SIMULATED_CRASH_MESSAGE in robust_server.log_text()
    images, seed, _, _ = client.predict(**generate_args(seed=21), api_name="/generate")
    assert seed == 21 and len(images) == 1


def test_cancelled_generation_leaves_the_app_usable(robust_server: RobustServer, client) -> None:
    job = client.submit(**generate_args(num_steps=30, num_outputs=2, seed=30), api_name="/generate")
    _wait_until_denoising(job)
    assert job.cancel()
    deadline = time.monotonic() + 10
    while job.status().code != Status.CANCELLED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.status().code == Status.CANCELLED
    follow_up = client.submit(**generate_args(seed=31), api_name="/generate")
    images, seed, _, _ = result(follow_up, "the call after a cancel")  # waits for the cancelled run to wind down
    assert seed == 31 and len(images) == 1
    assert job.outputs() == []  # the cancelled request never received images
    assert robust_server.is_alive()


ABANDONING_CLIENT = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{tests!r}]
    from gradio_client import Client
    from robust_app import generate_args
    from waiting import job_progress, wait_while_progressing
    job = Client({url!r}, verbose=False).submit(**generate_args(num_steps=30, num_outputs=2, seed=40),
                                                api_name="/generate")
    def midway():
        units = job.status().progress_data or []
        return any((u.desc or "").startswith("Denoising") and (u.index or 0) >= 2 for u in units)
    wait_while_progressing(lambda: job.done() or midway(), lambda: job_progress(job), "the abandoned call")
    if midway():
        print("MIDWAY", flush=True)
    time.sleep(600)  # killed by the test long before
    """
)


def test_client_that_disappears_mid_generation_leaves_the_app_usable(robust_server: RobustServer, client) -> None:
    """A script killed (or a browser tab closed) while its generation runs: the next user is served."""
    script = ABANDONING_CLIENT.format(tests=str(Path(__file__).parent), url=robust_server.url)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline() if process.stdout else ""
        assert line.strip() == "MIDWAY", "the abandoning client never saw its generation start"
    finally:
        process.kill()
        process.wait(10)
    follow_up = client.submit(**generate_args(seed=41), api_name="/generate")
    images, seed, _, _ = result(follow_up, "the call after an abandoned one")
    assert seed == 41 and len(images) == 1
    assert robust_server.is_alive()


def test_repeated_faults_do_not_wedge_the_queue(robust_server: RobustServer, client) -> None:
    """Several failures in a row, of both kinds, each answered; then a normal request goes through."""
    robust_server.inject("oom", 3)
    try:
        for seed in (50, 51, 52):
            with pytest.raises(AppError, match="Ran out of memory"):
                client.predict(**generate_args(seed=seed), api_name="/generate")
    finally:
        robust_server.inject("oom", 0)
    images, seed, _, _ = client.predict(**generate_args(seed=53), api_name="/generate")
    assert seed == 53 and len(images) == 1
