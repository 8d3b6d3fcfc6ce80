"""The model's lifecycle: load once in a background thread, report status and progress, and explain a failed
load in terms of the setting to change.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import torch

from photomaker.config import (
    DEFAULT_ADAPTER_FILE,
    DEFAULT_ADAPTER_REPO,
    DEFAULT_BASE_MODEL,
    SINGLE_FILE_SUFFIXES,
    ServiceConfig,
    resolve_device_and_dtype,
)
from photomaker.errors import CheckpointError, FaceModelUnavailableError, ModelLoadError, PhotoMakerError
from photomaker.requests import ProgressCallback, ServiceStatus

logger = logging.getLogger(__name__)


def error_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or during, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` (or one it came from) is an out-of-memory error of torch or of the allocator."""
    return any(
        isinstance(e, torch.OutOfMemoryError)
        or (
            isinstance(e, (RuntimeError, MemoryError))
            and re.search(r"out of memory|can't allocate", str(e), re.IGNORECASE)
        )
        for e in error_chain(exc)
    )


def explain_load_error(exc: BaseException, what: str, source: str, setting: str) -> ModelLoadError:
    """A ModelLoadError that says why `what` (from `source`, configured by `setting`) failed, and the fix."""
    from huggingface_hub import errors as hub_errors

    chain = error_chain(exc)

    def found(*types: type) -> BaseException | None:
        return next((e for e in chain if isinstance(e, types)), None)

    if isinstance(exc, ModelLoadError):
        return ModelLoadError(str(exc))  # a fresh copy: the original's traceback holds the loading frames
    if is_out_of_memory(exc):
        return ModelLoadError(
            f"Out of memory while loading {what}. SDXL needs about 11-15 GB of GPU memory in fp16: set "
            "PHOTOMAKER_OFFLOAD=model (or sequential for under 8 GB), close other GPU programs, or use a larger GPU."
        )
    if (err := found(FaceModelUnavailableError)) is not None:
        return ModelLoadError(f"Cannot load the face analyser: {err}")
    if (err := found(CheckpointError)) is not None:
        return ModelLoadError(
            f"{what} ({source}) is not a usable PhotoMaker checkpoint: {err} Check {setting} and PHOTOMAKER_VERSION."
        )
    if found(hub_errors.HFValidationError) is not None:
        return ModelLoadError(
            f"{setting}={source!r} is neither an existing local path nor a valid Hugging Face Hub id "
            "(owner/name). Fix the spelling or point it at a local folder or file."
        )
    if found(hub_errors.GatedRepoError) is not None:
        return ModelLoadError(
            f"{source!r} is a gated repository on the Hub: accept its licence on its web page and log in "
            "(`hf auth login`), or download it elsewhere and set "
            f"{setting} to the local copy."
        )
    if found(hub_errors.RepositoryNotFoundError) is not None:
        return ModelLoadError(
            f"There is no Hub repository {source!r} (or it is private). Check {setting} for typos, e.g. "
            f"{DEFAULT_BASE_MODEL!r} for the base model."
        )
    if found(hub_errors.RevisionNotFoundError) is not None:
        return ModelLoadError(f"The requested revision of {source!r} does not exist on the Hub; check {setting}.")
    offline = found(hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError, ConnectionError, TimeoutError)
    if offline is None:
        import httpx

        offline = found(httpx.TransportError)
    if offline is not None or "not fully cached locally" in str(exc):
        reason = (
            "HF_HUB_OFFLINE=1 is set"
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            else "the Hugging Face Hub cannot be reached (no network?)"
        )
        return ModelLoadError(
            f"Cannot load {what} {source!r}: {reason} and it is not in the local Hugging Face cache. Connect to "
            f"the internet and retry, download it once with `hf download {source}`, or set {setting} to a local "
            "copy."
        )
    if (err := found(hub_errors.EntryNotFoundError, hub_errors.RemoteEntryNotFoundError)) is not None:
        return ModelLoadError(f"A file of {what} is missing in {source!r}: {err}. Check {setting} and the file name.")
    return ModelLoadError(f"Could not load {what} from {source!r}: {type(exc).__name__}: {exc}")


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or source.endswith(SINGLE_FILE_SUFFIXES + (".bin",))
        or source.count("/") > 1
        or re.match(r"^[A-Za-z]:[\\/]", source) is not None
    )


def _check_local_source(source: str, setting: str) -> None:
    if _looks_like_path(source) and not os.path.exists(os.path.expanduser(source)):
        raise ModelLoadError(
            f"{setting}={source!r} looks like a local path but nothing exists there. Fix the path, or give a "
            "Hugging Face Hub id such as owner/name."
        )


class ModelLifecycle:
    """Holds the loaded pipeline and face analyser; loads them once, in the background, never twice.

    `on_loaded` runs (under the state lock) when a load has finished, before anyone sees the new pipeline:
    the generation state kept for the previous pipeline (ID encodings, fast mode) is reset there.
    """

    def __init__(self, config: ServiceConfig, on_loaded: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self._on_loaded = on_loaded
        self._state_lock = threading.Lock()
        self._state: Literal["idle", "loading", "ready", "error"] = "idle"
        self._message = "Not loaded yet."
        self._progress = 0.0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._load_error: ModelLoadError | None = None
        self._pipe: Any = None
        self._analyzer: Any = None
        self.base_model_label = config.base_model  # what the PNG metadata names as the base model and adapter
        self.adapter_label = config.adapter or DEFAULT_ADAPTER_REPO[config.pm_version]
        # ControlModelRegistry overrides: the tiny control models in tiny mode, else none (the environment's).
        self.control_model_overrides: dict[str, str] = {}

    @property
    def pipeline(self) -> Any:
        """The loaded pipeline, or None before it is ready."""
        return self._pipe

    @property
    def face_analyzer(self) -> Any:
        """The face analyser, or None before loading or with face_backend="none"."""
        return self._analyzer

    def status(self) -> ServiceStatus:
        """Where loading stands: idle, loading (with progress), ready or error (with the reason)."""
        with self._state_lock:
            return ServiceStatus(self._state, self._message, self._progress)

    def start_loading(self) -> None:
        """Start loading in a background thread, unless loading is under way or done (a failure may retry)."""
        with self._state_lock:
            if self._state in ("loading", "ready"):
                return
            self._state, self._message, self._progress = "loading", "Starting to load the model.", 0.0
            self._load_error = None
            # Each load sets its own event: a retry started while a failed load is still cleaning up must not
            # let that load wake (or strand) the retry's waiters.
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._load, args=(self._done,), name="photomaker-load", daemon=True)
            self._thread.start()

    def wait_ready(self, timeout: float | None = None, progress: ProgressCallback | None = None) -> None:
        """Block until the model is loaded, starting the load if it has not started.

        A failed load is not retried here (every request would pay for it again): its ModelLoadError is
        raised at once; call `start_loading()` to retry. `progress` gets the loading progress twice a second.
        """
        with self._state_lock:
            state, error = self._state, self._load_error
        if state == "error":
            # A fresh exception per request: re-raising the stored one would chain every request's frames (and
            # its decoded photos) onto its traceback for as long as the service lives.
            raise ModelLoadError(str(error or self._message)) from None
        if state == "idle":
            self.start_loading()
        done = self._done
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            interval = remaining if progress is None else min(0.5, 0.5 if remaining is None else remaining)
            if done.wait(interval):
                break
            if deadline is not None and time.monotonic() >= deadline:
                status = self.status()
                raise ModelLoadError(
                    f"The model is still loading after {timeout:g} s ({status.message}, "
                    f"{status.progress:.0%}); try again shortly."
                )
            if progress is not None:
                status = self.status()
                progress(int(status.progress * 100), 100, status.message)
        with self._state_lock:
            if self._state != "ready":
                raise ModelLoadError(str(self._load_error or self._message)) from None

    def _set_status(self, message: str, progress: float) -> None:
        with self._state_lock:
            self._message, self._progress = message, progress
        logger.info("%s (%.0f%%)", message, progress * 100)

    def _sources(self) -> tuple[str, str, str | None]:
        """(base model, adapter, adapter weight name) to load; tiny mode writes its models first if needed, and
        takes a given adapter (e.g. a checkpoint `train --tiny` exported) instead of the tiny official one."""
        config = self.config
        base = config.base_model
        if config.tiny_dir:
            from photomaker.testing import make_tiny
            from photomaker.testing_control import tiny_control_overrides

            paths = make_tiny(config.tiny_dir)
            self.control_model_overrides = tiny_control_overrides(paths["control"])
            base = str(paths["base"])
            if config.adapter is None:
                return base, str(paths[f"v{config.pm_version}"]), None
        adapter = config.adapter or DEFAULT_ADAPTER_REPO[config.pm_version]
        weight_name = config.adapter_weight_name
        if weight_name is None and not os.path.isfile(os.path.expanduser(adapter)):
            weight_name = DEFAULT_ADAPTER_FILE[config.pm_version]
        return base, adapter, weight_name

    def _load(self, done: threading.Event) -> None:
        config = self.config
        what, source, setting = "the model", config.base_model, "PHOTOMAKER_BASE_MODEL"
        pipe = None
        failed = False
        try:
            device, dtype = resolve_device_and_dtype(config.device, config.dtype, tiny=bool(config.tiny_dir))
            if config.tiny_dir:
                what, source, setting = "the tiny models", config.tiny_dir, "PHOTOMAKER_TINY_DIR"
                self._set_status(f"Preparing tiny models in {config.tiny_dir}", 0.02)
            base, adapter, weight_name = self._sources()
            self.base_model_label, self.adapter_label = base, adapter

            analyzer = None
            backend = config.resolved_face_backend
            if backend != "none":
                what, source, setting = "the face analyser", backend, "PHOTOMAKER_FACE_BACKEND"
                self._set_status(f"Loading the {backend} face analyser", 0.05)
                from photomaker.faces import get_face_analyzer

                analyzer = get_face_analyzer(backend, model_dir=config.face_model_dir)

            what, source, setting = "the base model", base, "PHOTOMAKER_BASE_MODEL"
            self._set_status(f"Loading the base model {base} ({str(dtype).replace('torch.', '')})", 0.1)
            pipe = self._load_base(base, dtype)

            what, source, setting = f"the PhotoMaker v{config.pm_version} adapter", adapter, "PHOTOMAKER_ADAPTER"
            self._set_status(f"Loading the PhotoMaker v{config.pm_version} adapter from {adapter}", 0.6)
            _check_local_source(adapter, setting)
            kwargs = {"weight_name": weight_name} if weight_name else {}
            pipe.load_photomaker_adapter(
                adapter,
                trigger_word=config.trigger_word,
                pm_version=config.pm_version,
                fused_cache_dir=config.resolved_fused_cache_dir,
                **kwargs,
            )
            from diffusers import EulerDiscreteScheduler

            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

            what, source, setting = "the model onto the device", device, "PHOTOMAKER_DEVICE"
            self._set_status(f"Placing the model on {device} (offload: {config.offload})", 0.85)
            self._place(pipe, device)
            with self._state_lock:
                self._pipe, self._analyzer = pipe, analyzer
                self._on_loaded()
                # The face models' licence is shown where they are in use: some forbid commercial use.
                licence = f" Face models: {analyzer.licence}." if analyzer is not None else ""
                self._state, self._message, self._progress = "ready", f"Ready ({device}).{licence}", 1.0
            logger.info("PhotoMaker ready on %s", device)
        except BaseException as exc:
            failed = True
            error = explain_load_error(exc, what, source, setting)
            logger.error("Loading failed: %s", error, exc_info=not isinstance(exc, PhotoMakerError))
            with self._state_lock:
                self._load_error = error
                self._state, self._message, self._progress = "error", str(error), 0.0
        finally:
            if failed:
                # Here the exception and its frames (which hold any half-loaded weights) are gone.
                del pipe
                self.free_memory()
            done.set()

    def _load_base(self, base: str, dtype: torch.dtype) -> Any:
        from photomaker.pipeline import PhotoMakerStableDiffusionXLPipeline as Pipeline

        _check_local_source(base, "PHOTOMAKER_BASE_MODEL")
        local = os.path.exists(os.path.expanduser(base))
        path = os.path.expanduser(base) if local else base
        if base.endswith(SINGLE_FILE_SUFFIXES):
            return Pipeline.from_single_file(path, dtype=dtype)
        variant = self.config.variant
        if variant is None and dtype == torch.float16 and not local:
            try:
                return Pipeline.from_pretrained(path, dtype=dtype, variant="fp16")
            except (OSError, ValueError) as exc:
                if "variant" not in str(exc):
                    raise
                logger.info("%s has no fp16 variant; loading its default weights in fp16", base)
        kwargs = {"variant": variant} if variant else {}
        return Pipeline.from_pretrained(path, dtype=dtype, **kwargs)

    def _place(self, pipe: Any, device: str) -> None:
        config = self.config
        offload = config.offload
        if offload != "none" and device == "cpu":
            logger.warning("PHOTOMAKER_OFFLOAD=%s has no effect on the CPU; ignoring it", offload)
            offload = "none"
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
        if config.vae_tiling or offload != "none":
            pipe.vae.enable_tiling()
            pipe.vae.enable_slicing()
        if config.compile_unet:
            # In place (nn.Module.compile), so LoRA loading for fast mode still finds the UNet's own modules;
            # the default mode, not CUDA graphs, because fast mode changes the weights between calls.
            pipe.unet.compile()

    def free_memory(self) -> None:
        """Return freed memory to the device (after a failed load or generation)."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
