"""Safety: model files never run code, uploads are bounded, the server serves only its own files, no secret leaks.

- A malicious pickle (its ``__reduce__`` runs Python code) is refused without executing, whichever way a model
  file reaches the library: ``load_photomaker_adapter``, the service's adapter setting, a base-model folder, a
  fast-mode LoRA. A control shows that the same payload does execute under a plain ``pickle.loads``.
- Upload limits: the server refuses an upload above ``MAX_UPLOAD_BYTES`` (HTTP 413, checked on the server, not
  only by gradio_client) and accepts one of exactly that size; decoded images are capped at ``MAX_IMAGE_PIXELS``.
- Files: system files, the app's source, the model checkpoints and the log are refused over HTTP, and the API
  cannot be made to read them as "uploaded" photos; the app's own outputs are served (positive control).
- Secrets: a Hugging Face token in the server's environment never appears in its log, its answers or its files.
"""

from __future__ import annotations

import http.client
import json
import pickle
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from gradio_client.exceptions import AppError

from photomaker import presets
from photomaker.errors import CheckpointError, IDImageError, ModelLoadError
from photomaker.images import MAX_IMAGE_PIXELS, MAX_UPLOAD_BYTES, load_image
from photomaker.service import PhotoMakerService, ServiceConfig
from photomaker.testing import tiny_checkpoint
from photomaker.testsupport import fault_injection

pytest.register_assert_rewrite("app_server", "robust_app", "bad_inputs")
import bad_inputs
from robust_app import (
    FAKE_HF_TOKEN,
    RobustServer,
    call_raw,
    gallery_value,
    generate_args,
)

pytest_plugins = ["app_server", "robust_app"]

PASSWD_LINE = "root:x:0:0"


class CodeRunningPayload:
    """Unpickling this runs `exec`, which writes `marker`: the proof that a loader executed pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('code from a model file ran')",)


def _evil_checkpoint(folder: Path, marker: Path, fmt: str) -> Path:
    """A PhotoMaker-shaped checkpoint with the payload hidden among real tensors, in one of the pickle formats."""
    contents = tiny_checkpoint(1)
    contents["lora_weights"]["unet.extra.lora.down.weight"] = CodeRunningPayload(marker)  # type: ignore[assignment]
    if fmt == "torch-zip":
        path = folder / "photomaker-v1.bin"
        torch.save(contents, path)
    elif fmt == "torch-legacy":
        path = folder / "photomaker-v1.pt"
        torch.save(contents, path, _use_new_zipfile_serialization=False)
    elif fmt == "raw-pickle":
        path = folder / "photomaker-v1.ckpt"
        path.write_bytes(pickle.dumps(contents, protocol=2))
    else:  # a pickle disguised as safetensors
        path = folder / "photomaker-v1.safetensors"
        path.write_bytes(pickle.dumps(contents))
    return path


PICKLE_FORMATS = ["torch-zip", "torch-legacy", "raw-pickle", "pickle-named-safetensors"]


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a model file executed code while it was loaded"


def test_the_payload_is_live_under_an_unsafe_loader(tmp_path: Path) -> None:
    """Control: the payload really runs when unpickled naively, so the refusals below are meaningful."""
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(CodeRunningPayload(proof)))
    assert proof.read_text() == "code from a model file ran"


@pytest.fixture(scope="module")
def bare_pipeline(tiny_models_dir: Path):
    """The tiny SDXL pipeline without any PhotoMaker adapter."""
    from photomaker.pipeline import PhotoMakerStableDiffusionXLPipeline

    pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(str(tiny_models_dir / "base"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("fmt", PICKLE_FORMATS)
def test_malicious_adapter_is_refused_by_load_photomaker_adapter(
    bare_pipeline, tmp_path: Path, marker: Path, fmt: str
) -> None:
    path = _evil_checkpoint(tmp_path, marker, fmt)
    with pytest.raises(CheckpointError) as refused:
        bare_pipeline.load_photomaker_adapter(str(path))
    message = str(refused.value)
    if fmt == "pickle-named-safetensors":
        assert "is not a readable safetensors file" in message
    else:
        assert "Refused to load" in message and "nothing in it was executed" in message
    assert not marker.exists()
    # Nothing was half-applied: the pipeline still has no adapter, so a real one can be loaded next.
    with pytest.raises(CheckpointError, match="No PhotoMaker adapter is loaded"):
        bare_pipeline.check_prompt("a photo of a man img")


def test_real_adapter_loads_after_a_refused_one(bare_pipeline, tiny_models_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    with pytest.raises(CheckpointError):
        bare_pipeline.load_photomaker_adapter(str(_evil_checkpoint(tmp_path, marker, "torch-zip")))
    bare_pipeline.load_photomaker_adapter(str(tiny_models_dir / "photomaker-v1.bin"))
    bare_pipeline.check_prompt("a photo of a man img")  # loaded and usable
    assert not marker.exists()


def test_malicious_adapter_through_the_service_is_a_load_error(
    tiny_models_dir: Path, tmp_path: Path, marker: Path
) -> None:
    path = _evil_checkpoint(tmp_path, marker, "torch-zip")
    config = ServiceConfig(
        base_model=str(tiny_models_dir / "base"), adapter=str(path), face_backend="none", device="cpu", dtype="float32"
    )
    service = PhotoMakerService(config)
    with pytest.raises(ModelLoadError) as refused:
        service.wait_ready(timeout=300)
    assert "Refused to load" in str(refused.value) and "PHOTOMAKER_ADAPTER" in str(refused.value)
    assert service.status().state == "error"
    assert service.pipeline is None
    assert not marker.exists()


def test_malicious_base_model_weights_are_refused(tiny_models_dir: Path, tmp_path: Path, marker: Path) -> None:
    """A base-model folder whose UNet weights are a code-running pickle (diffusers' .bin form)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_models_dir / "base", base)
    unet = base / "unet"
    state = {"conv_in.weight": CodeRunningPayload(marker)}
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    config = ServiceConfig(
        base_model=str(base),
        adapter=str(tiny_models_dir / "photomaker-v1.bin"),
        face_backend="none",
        device="cpu",
        dtype="float32",
    )
    service = PhotoMakerService(config)
    with pytest.raises(ModelLoadError) as refused:
        service.wait_ready(timeout=300)
    assert "Could not load the base model" in str(refused.value)
    assert "unet/diffusion_pytorch_model.bin" in str(refused.value)  # names the file that was refused
    assert not marker.exists()


def test_malicious_fast_mode_lora_is_refused(bare_pipeline, tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "lora.bin"
    torch.save({"unet.down_blocks.0.lora_A.weight": CodeRunningPayload(marker)}, path)
    preset = presets.FAST_PRESETS[presets.DEFAULT_FAST_PRESET].with_weights(path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        presets.apply_fast_preset(bare_pipeline, preset)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- upload limits


def test_limits_are_set_and_the_server_announces_the_same_byte_limit(robust_server: RobustServer) -> None:
    assert MAX_UPLOAD_BYTES == 20 * 1024 * 1024
    assert MAX_IMAGE_PIXELS == 40_000_000
    config = httpx.get(robust_server.url + "config", timeout=30).json()
    assert config["max_file_size"] == MAX_UPLOAD_BYTES


def _post_upload(url: str, name: str, data: bytes) -> httpx.Response:
    return httpx.post(url + "gradio_api/upload", files={"files": (name, data)}, timeout=120)


def test_server_refuses_an_upload_over_the_byte_limit(robust_server: RobustServer) -> None:
    """Checked by the server itself (a script need not use gradio_client); the boundary size is accepted."""
    before = {path for path in robust_server.cache_dir.rglob("*") if path.is_file()}
    too_big = _post_upload(robust_server.url, "too_big.png", bytes(MAX_UPLOAD_BYTES + 1))
    assert too_big.status_code == 413
    assert f"maximum allowed size of {MAX_UPLOAD_BYTES} bytes" in too_big.text
    stored = {path for path in robust_server.cache_dir.rglob("*") if path.is_file()} - before
    assert not any(path.stat().st_size > MAX_UPLOAD_BYTES for path in stored), "the refused upload was kept"
    at_limit = _post_upload(robust_server.url, "at_limit.png", b"\x01" * MAX_UPLOAD_BYTES)
    assert at_limit.status_code == 200, at_limit.text
    # What was accepted is then refused as a photo by name, not decoded as one.
    event, message = call_raw(robust_server.url, gallery_value(at_limit.json()[0], "at_limit.png"), seed=3)
    assert event == "error" and "ID photo 1 (at_limit.png): not a readable image file" in str(message)


def test_library_limits_hold_at_their_boundaries(tmp_path: Path) -> None:
    at_limit = tmp_path / "at_limit.jpg"
    at_limit.write_bytes(b"\x01" * MAX_UPLOAD_BYTES)
    with pytest.raises(IDImageError, match="not a readable image file"):  # read and tried, not size-refused
        load_image(at_limit)
    over = tmp_path / "over.jpg"
    over.write_bytes(b"\x01" * (MAX_UPLOAD_BYTES + 1))
    with pytest.raises(IDImageError, match=r"the file is too large \(20\.0 MiB, the limit is 20\.0 MiB\)"):
        load_image(over)
    started = time.monotonic()
    with pytest.raises(IDImageError, match="the limit is 40 megapixels"):
        load_image(bad_inputs.png_claiming_huge_size(tmp_path))  # 10 gigapixels claimed: nothing allocated
    assert time.monotonic() - started < 2.0


# -------------------------------------------------------------------------------------- serving files


REFUSED_PATHS = [
    "gradio_api/file=/etc/passwd",
    "gradio_api/file=%2Fetc%2Fpasswd",
    "gradio_api/file=../../../../../../etc/passwd",
    "gradio_api/file=..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "gradio_api/file=//etc/passwd",
    "gradio_api/file=file:///etc/passwd",
    "gradio_api/file=/proc/self/environ",
    "gradio_api/file=~/.bashrc",
    "gradio_api/file={repo}/app.py",
    "gradio_api/file=app.py",
    "gradio_api/file={tiny}/photomaker-v1.bin",
    "gradio_api/file={work}/app.log",
    "gradio_api/file={cache}/../app.log",
    "gradio_api/file={cache}/../faults.txt",
    "file=/etc/passwd",
    "static/../../../../etc/passwd",
    "assets/../../../../etc/passwd",
    "gradio_api/proxy=http://127.0.0.1:1/",
]


def _get_as_is(url: str, path: str) -> tuple[int, str]:
    """GET `path` exactly as written (dots and escapes unnormalised, as an attacker's raw client sends them)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", "/" + path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


@pytest.mark.parametrize("template", REFUSED_PATHS)
def test_server_does_not_serve_files_outside_its_own(
    robust_server: RobustServer, tiny_models_dir: Path, template: str
) -> None:
    path = template.format(
        repo=bad_inputs.EXAMPLES.parent,
        tiny=tiny_models_dir,
        work=robust_server.work_dir,
        cache=robust_server.cache_dir,
    )
    status, body = _get_as_is(robust_server.url, path)
    assert status in (400, 403, 404), f"{path}: HTTP {status}"
    assert PASSWD_LINE not in body and FAKE_HF_TOKEN not in body and "def build_demo" not in body


def test_server_serves_its_own_outputs(robust_server: RobustServer) -> None:
    """Positive control for the refusals above: the same route serves a file the app produced."""
    event, outputs = call_raw(robust_server.url, _uploaded(robust_server), seed=5)
    assert event == "complete", outputs
    url = outputs[0][0]["image"]["url"]
    assert "/gradio_api/file=" in url
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")


def _uploaded(robust_server: RobustServer) -> list[dict[str, Any]]:
    from robust_app import upload

    return gallery_value(upload(robust_server.url, bad_inputs.ASTRONAUT), "astronaut.png")


@pytest.mark.parametrize(
    "where",
    [
        "/etc/passwd",
        "{repo}/examples/astronaut.png",
        "{tiny}/photomaker-v1.bin",
        "{work}/app.log",
        "{cache}/../app.log",
    ],
)
def test_api_cannot_read_server_files_as_photos(robust_server: RobustServer, tiny_models_dir: Path, where: str) -> None:
    """A Gallery value naming a server path that no user uploaded is refused before the app sees it."""
    path = where.format(
        repo=bad_inputs.EXAMPLES.parent,
        tiny=tiny_models_dir,
        work=robust_server.work_dir,
        cache=robust_server.cache_dir,
    )
    before = {p.name for p in robust_server.cache_dir.rglob("*") if p.is_file()}
    log_start = len(robust_server.log_text())
    event, message = call_raw(robust_server.url, gallery_value(path, Path(path).name), seed=6)
    assert event == "error", f"{path} was accepted as a photo: {message}"
    copied = {p.name for p in robust_server.cache_dir.rglob("*") if p.is_file()} - before
    assert Path(path).name not in copied, f"{path} was copied into the served cache"
    assert "was not uploaded by a user" in robust_server.log_text()[log_start:]  # this call's refusal


# ------------------------------------------------------------------------------------------------ secrets


def test_no_secret_in_logs_answers_or_files(robust_server: RobustServer) -> None:
    """With HF_TOKEN set, a success, a refusal and a crash leave no trace of the token anywhere the server wrote."""
    client = robust_server.client()
    answers: list[str] = []
    log_start = len(robust_server.log_text())
    try:
        answers.append(json.dumps(client.predict(**generate_args(seed=60), api_name="/generate"), default=str))
        with pytest.raises(AppError) as refused:
            client.predict(**generate_args(prompt="a landscape"), api_name="/generate")
        answers.append(str(refused.value))
        robust_server.inject("crash", 1)
        with pytest.raises(AppError) as crashed:
            client.predict(**generate_args(seed=61), api_name="/generate")
        answers.append(str(crashed.value))
    finally:
        robust_server.inject("crash", 0)
        client.close()
    assert fault_injection.SIMULATED_CRASH_MESSAGE in robust_server.log_text()[log_start:]  # this crash was logged
    for endpoint in ("config", "gradio_api/info", "gradio_api/startup-events"):
        answers.append(httpx.get(robust_server.url + endpoint, timeout=30).text)
    for answer in answers:
        assert FAKE_HF_TOKEN not in answer
    written = [path for path in robust_server.work_dir.rglob("*") if path.is_file()]
    assert any(path.name == "app.log" for path in written)
    leaking = [str(path) for path in written if FAKE_HF_TOKEN.encode() in path.read_bytes()]
    assert not leaking, f"the token was written to {leaking}"
