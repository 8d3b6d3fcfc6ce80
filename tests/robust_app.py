"""Shared fixtures of the robustness, load, fault and safety tests (a pytest plugin).

One ``python app.py --tiny`` per test session for all four modules (``robust_server``), started through
``app_server.AppServer`` with what those tests need and the general ``app_server`` fixture does not set:

- a small bounded queue (``--max-queue 8``), so that 40 concurrent calls overflow it;
- ``PHOTOMAKER_FAULT_INJECT`` pointing at a file the tests write to make chosen generations fail
  (see ``photomaker/testsupport/fault_injection.py``; honoured in ``--tiny`` mode only);
- a fake Hugging Face token in the environment, which must never show up in logs, files or answers;
- a private ``TMPDIR`` next to Gradio's own cache (``GRADIO_TEMP_DIR``), so the tests can see every
  temporary file the server leaves behind.

Also one in-process ``PhotoMakerService`` on the same tiny models (``library_service``), and helpers to call
``/generate`` with gradio_client or as raw HTTP (for values gradio_client cannot encode, such as NaN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from app_server import AppServer, photos_payload

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ASTRONAUT = EXAMPLES / "astronaut.png"
SMALL_QUEUE = 8
# Looks like a real token (hf_ + 34 characters) so that a redacting logger would treat it as one.
FAKE_HF_TOKEN = "hf_RobustTestSecretZq8Xv3Lm5Np7Rt9Wy2"
SIZE = 64  # the tiny models run 64x64 in a fraction of a second
GENERATE_PARAMETERS = (
    "id_photos",
    "prompt",
    "negative_prompt",
    "style",
    "aspect_ratio",
    "num_steps",
    "style_strength",
    "num_outputs",
    "guidance_scale",
    "seed",
    "randomize_seed",
    "crop_faces",
    "mix_photos",
    "mix_strength",
    "fast_mode",
    "best_of",
    "width",
    "height",
)


class RobustServer:
    """The running app plus the paths the tests inspect."""

    def __init__(self, server: AppServer, fault_file: Path, tmp_dir: Path) -> None:
        self.server = server
        self.url = server.url
        self.pid = server.process.pid
        self.fault_file = fault_file
        self.tmp_dir = tmp_dir
        self.cache_dir = server.work_dir / "gradio-cache"
        self.work_dir = server.work_dir

    def client(self, **kwargs: Any):
        return self.server.client(**kwargs)

    def is_alive(self) -> bool:
        return self.server.is_alive()

    def log_text(self) -> str:
        return self.server.log_text()

    def inject(self, kind: str, count: int = 1) -> None:
        """Make the next `count` generations fail with `kind` ("oom" or "crash")."""
        self.fault_file.write_text(f"{kind} {count}\n", encoding="utf-8")

    def faults_left(self) -> int:
        words = self.fault_file.read_text(encoding="utf-8").split() if self.fault_file.exists() else []
        return int(words[1]) if len(words) == 2 else 0

    def rss(self) -> int:
        """Resident memory of the app process, in bytes."""
        import psutil

        return psutil.Process(self.pid).memory_info().rss


def generate_args(**overrides: Any) -> dict[str, Any]:
    """A valid, quick `/generate` call for gradio_client (1 step, 1 image, 64x64); overrides replace fields."""
    args: dict[str, Any] = {
        "id_photos": photos_payload([ASTRONAUT]),
        "prompt": "a photo of a woman img smiling",
        "negative_prompt": "",
        "style": "Photographic (Default)",
        "aspect_ratio": "Instagram (1:1)",
        "num_steps": 1,
        "style_strength": 20,
        "num_outputs": 1,
        "guidance_scale": 5.0,
        "seed": 1,
        "randomize_seed": False,
        "width": SIZE,
        "height": SIZE,
    }
    args.update(overrides)
    return args


def upload(url: str, path: Path) -> str:
    """Upload `path` as a browser would; the server-side path Gradio stored it under."""
    with open(path, "rb") as handle:
        response = httpx.post(url + "gradio_api/upload", files={"files": (path.name, handle)}, timeout=60)
    response.raise_for_status()
    return response.json()[0]


def gallery_value(server_path: str, name: str | None = None) -> list[dict[str, Any]]:
    """A Gallery input value naming a file on the server (as the browser sends after an upload)."""
    return [{"image": {"path": server_path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}, "caption": None}]


def call_raw(url: str, photos: list[dict[str, Any]], timeout: float = 120, **overrides: Any) -> tuple[str, Any]:
    """Call `/generate` over plain HTTP (``/gradio_api/call/generate``) with JSON that may hold NaN or Infinity.

    `photos` is a Gallery value (see `gallery_value`). Returns ("complete", outputs) or ("error", message).
    """
    args = generate_args(**overrides)
    args["id_photos"] = photos
    defaults = {"crop_faces": True, "mix_photos": None, "mix_strength": 0.5, "fast_mode": "", "best_of": 1}
    data = [args.get(name, defaults.get(name)) for name in GENERATE_PARAMETERS]
    body = json.dumps({"data": data}, allow_nan=True)  # NaN / Infinity / -Infinity literals, as a script may send
    with httpx.Client(timeout=timeout) as http:
        posted = http.post(url + "gradio_api/call/generate", content=body, headers={"content-type": "application/json"})
        if posted.status_code != 200:
            return "error", f"HTTP {posted.status_code}: {posted.text}"
        event_id = posted.json()["event_id"]
        event, payload = "", None
        with http.stream("GET", url + f"gradio_api/call/generate/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    payload = json.loads(line.split(":", 1)[1])
                    break
    if event == "error":
        return "error", (payload or {}).get("error") if isinstance(payload, dict) else payload
    return event, payload


def is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


@pytest.fixture(scope="session")
def robust_server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RobustServer]:
    """One app for the whole session: small queue, fault-injection file, fake HF token, private TMPDIR."""
    work = tmp_path_factory.mktemp("robust-app")
    tmp_dir = work / "tmp"
    tmp_dir.mkdir()
    fault_file = work / "faults.txt"
    env = {
        "PHOTOMAKER_FAULT_INJECT": str(fault_file),
        "HF_TOKEN": FAKE_HF_TOKEN,
        "HUGGING_FACE_HUB_TOKEN": FAKE_HF_TOKEN,
        "TMPDIR": str(tmp_dir),
    }
    with AppServer.start(
        tiny_models_dir, work_dir=work, extra_args=["--max-queue", str(SMALL_QUEUE)], env=env
    ) as server:
        yield RobustServer(server, fault_file, tmp_dir)


@pytest.fixture(scope="session")
def library_service(tiny_models_dir: Path):
    """The library on the tiny models, configured as `app.py --tiny` is (dlib face crops and scores, CPU)."""
    from photomaker.service import PhotoMakerService, ServiceConfig

    service = PhotoMakerService(ServiceConfig(tiny_dir=str(tiny_models_dir), face_backend="dlib", device="cpu"))
    service.wait_ready(timeout=300)
    service.pipeline.set_progress_bar_config(disable=True)
    return service
