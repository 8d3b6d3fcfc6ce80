"""Run ``python app.py --tiny`` as a subprocess for tests: start on a free port, wait until it serves, stop it.

Reusable by any test that needs the running web app (browser, API, robustness, load tests).

As a pytest plugin it provides the session-scoped ``app_server`` fixture, started once per test session::

    pytest_plugins = ["app_server"]          # in a test module under tests/

    def test_something(app_server):
        client = app_server.client()
        client.predict(..., api_name="/generate")

Outside pytest, use it as a context manager::

    with AppServer.start(tiny_dir) as server:
        print(server.url)
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_PATH = REPO_ROOT / "app.py"
START_TIMEOUT_S = 240.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def photos_payload(paths: Sequence[str | Path]) -> list[dict]:
    """The ``id_photos`` (or ``mix_photos``) argument of ``/generate`` for gradio_client: a gallery value."""
    from gradio_client import handle_file

    return [{"image": handle_file(str(path)), "caption": None} for path in paths]


class AppServer:
    """A running ``app.py`` subprocess; its combined stdout/stderr goes to ``log_path``."""

    def __init__(self, process: subprocess.Popen, url: str, port: int, log_path: Path, work_dir: Path) -> None:
        self.process = process
        self.url = url
        self.port = port
        self.log_path = log_path
        self.work_dir = work_dir

    @classmethod
    def start(
        cls,
        tiny_dir: str | Path | None = None,
        *,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        work_dir: str | Path | None = None,
        timeout: float = START_TIMEOUT_S,
    ) -> AppServer:
        """Start ``python app.py --tiny [tiny_dir] --port N`` offline and wait until the page answers.

        ``work_dir`` holds the log and Gradio's upload/output cache (``GRADIO_TEMP_DIR``), so tests can check
        what accumulates there. Raises ``RuntimeError`` with the log tail if the app exits or never answers.
        """
        work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="photomaker-app-"))
        work.mkdir(parents=True, exist_ok=True)
        port = free_port()
        cmd = [sys.executable, str(APP_PATH), "--tiny"]
        if tiny_dir is not None:
            cmd.append(str(tiny_dir))
        cmd += ["--host", "127.0.0.1", "--port", str(port), *extra_args]
        full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "GRADIO_TEMP_DIR": str(work / "gradio-cache"),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        log_path = work / "app.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=full_env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = cls(process, f"http://127.0.0.1:{port}/", port, log_path, work)
        log.info("started %s (pid %d), log %s", " ".join(cmd), process.pid, log_path)
        try:
            server.wait_until_serving(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_until_serving(self, timeout: float) -> None:
        """Poll the page until it answers 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"app.py exited with code {self.process.returncode} before serving:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"app.py did not serve {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def is_alive(self) -> bool:
        """True while the process runs and its page answers."""
        if self.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(self.url, timeout=10) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def client(self, **kwargs):
        """A fresh ``gradio_client.Client`` connected to this server."""
        from gradio_client import Client

        return Client(self.url, verbose=False, **kwargs)

    def log_text(self) -> str:
        """Everything the app printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        """The last lines the app printed."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """Interrupt the app (as Ctrl+C would), then kill its process group if it does not exit."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        log.info("stopped app.py (pid %d)", self.process.pid)

    def __enter__(self) -> AppServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """One ``python app.py --tiny`` for the whole test session (tiny models made once, in a temp folder)."""
    base = tmp_path_factory.mktemp("app-server")
    with AppServer.start(base / "tiny-models", work_dir=base) as server:
        yield server
