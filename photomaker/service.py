"""The cached PhotoMaker pipeline shared by the app and the CLI: a thin facade over its parts.

One `PhotoMakerService` per process owns the loaded pipeline (`photomaker.lifecycle`: loaded once, in the
background, never twice), and runs requests on it (`photomaker.generation`: ID-encoding cache, best-of-N,
fast mode) one at a time: a diffusers pipeline keeps per-call state (scheduler timesteps, guidance) on itself,
so two concurrent calls on one pipeline would corrupt each other.

`generate` checks the request first (`photomaker.validation.validate_request`, no model needed), so a bad
request fails in milliseconds with a message that says what to change, even while the model is still loading.

Every name importable from this module before the split is still importable from it.
"""

from __future__ import annotations

from typing import Any

from photomaker.config import (
    DEFAULT_ADAPTER_FILE,
    DEFAULT_ADAPTER_REPO,
    DEFAULT_BASE_MODEL,
    ENV_VARIABLES,
    SINGLE_FILE_SUFFIXES,
    ServiceConfig,
    default_fused_cache_dir,
    parse_switch,
    resolve_device_and_dtype,
)
from photomaker.generation import MAX_BATCH, GenerationRunner
from photomaker.lifecycle import ModelLifecycle, explain_load_error
from photomaker.requests import (
    GeneratedImage,
    GenerationPlan,
    GenerationRequest,
    GenerationResult,
    ProgressCallback,
    ServiceStatus,
)
from photomaker.validation import MAX_PROMPT_CHARS, validate_request

__all__ = [
    "DEFAULT_ADAPTER_FILE",
    "DEFAULT_ADAPTER_REPO",
    "DEFAULT_BASE_MODEL",
    "ENV_VARIABLES",
    "MAX_BATCH",
    "MAX_PROMPT_CHARS",
    "SINGLE_FILE_SUFFIXES",
    "GeneratedImage",
    "GenerationPlan",
    "GenerationRequest",
    "GenerationResult",
    "PhotoMakerService",
    "ProgressCallback",
    "ServiceConfig",
    "ServiceStatus",
    "default_fused_cache_dir",
    "explain_load_error",
    "parse_switch",
    "resolve_device_and_dtype",
]


class PhotoMakerService:
    """Owns one pipeline per process: loads it once in the background and runs generations one at a time."""

    def __init__(self, config: ServiceConfig | None = None) -> None:
        self.config = config or ServiceConfig.from_env()
        self._model = ModelLifecycle(self.config, on_loaded=lambda: self._runner.reset())
        self._runner = GenerationRunner(self.config, self._model)

    @property
    def pipeline(self) -> Any:
        """The loaded pipeline, or None before it is ready."""
        return self._model.pipeline

    @property
    def face_analyzer(self) -> Any:
        """The face analyser, or None before loading or with face_backend="none"."""
        return self._model.face_analyzer

    def cache_info(self) -> dict[str, int]:
        """ID-encoding cache counters: hits, misses, size, max_size."""
        return self._runner.cache_info()

    def status(self) -> ServiceStatus:
        """Where loading stands: idle, loading (with progress), ready or error (with the reason)."""
        return self._model.status()

    def start_loading(self) -> None:
        """Start loading in a background thread, unless loading is under way or done (a failure may retry)."""
        self._model.start_loading()

    def wait_ready(self, timeout: float | None = None, progress: ProgressCallback | None = None) -> None:
        """Block until the model is loaded, starting the load if needed (see `ModelLifecycle.wait_ready`)."""
        self._model.wait_ready(timeout, progress)

    def validate(self, request: GenerationRequest) -> GenerationPlan:
        """Check every field and decode the photos; raise a specific error for the first problem found."""
        return validate_request(request, self.config)

    def generate(
        self, request: GenerationRequest | GenerationPlan, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Validate, then generate `request.num_outputs` images (best of `best_of` each) with metadata.

        A plan from `validate` is used as it is (its photos are already decoded and checked).
        """
        plan = request if isinstance(request, GenerationPlan) else self.validate(request)
        self.wait_ready(progress=progress)
        return self._runner.run(plan, progress)
