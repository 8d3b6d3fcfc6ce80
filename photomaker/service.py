"""The cached PhotoMaker pipeline shared by the app and the CLI.

One `PhotoMakerService` per process owns the loaded pipeline (loaded once, in the background, never twice),
the face analyser, and an LRU cache of ID encodings, and exposes one call: `generate(request)`.

`generate` checks the request before it touches a model, so a bad request fails in milliseconds with a
message that says what to change, even while the model is still loading; only the 77-token budget of the
prompt with its class-word copies is checked once the tokenizers are loaded. Generations run one at a time:
a diffusers pipeline keeps per-call state (scheduler timesteps, guidance) on itself, so two concurrent calls
on one pipeline would corrupt each other.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import numbers
import os
import re
import secrets
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

import aspect_ratio_template
import style_template
from photomaker import metadata, presets
from photomaker.errors import (
    CheckpointError,
    FaceModelUnavailableError,
    IDImageError,
    InvalidRequestError,
    ModelLoadError,
    PhotoMakerError,
    PromptError,
)
from photomaker.faces.prepare import photo_label
from photomaker.images import MAX_IMAGE_PIXELS, MAX_UPLOAD_BYTES, load_image
from photomaker.prompt import DEFAULT_TRIGGER_WORD, check_prompt_text, insert_trigger_word, strip_trigger_word

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "SG161222/RealVisXL_V4.0"
DEFAULT_ADAPTER_REPO = {1: "TencentARC/PhotoMaker", 2: "TencentARC/PhotoMaker-V2"}
DEFAULT_ADAPTER_FILE = {1: "photomaker-v1.bin", 2: "photomaker-v2.bin"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
MAX_PROMPT_CHARS = 2000  # SDXL reads 77 tokens (about 60 words); longer text is almost surely a mistake
MAX_BATCH = 4  # images per pipeline call; best-of-N candidates beyond it run in further calls

_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
_OFFLOAD_MODES = ("none", "model", "sequential")
_OFF = ("off", "none", "0", "false", "no")
_FACE_BACKENDS = ("dlib", "insightface", "none")
# C0/C1 control characters other than tab and newline: invisible in the UI, meaningless to the tokenizer.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


def default_fused_cache_dir() -> str:
    """The prepared-adapter cache's default folder: the user's cache folder (XDG_CACHE_HOME or ~/.cache)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "photomaker", "prepared")


def parse_switch(value: str) -> bool:
    """An on/off setting as PHOTOMAKER_* variables spell it; ValueError names the accepted spellings."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("use 1/0, true/false, yes/no or on/off")


# Environment variable -> (ServiceConfig field, parser of the variable's text).
ENV_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "PHOTOMAKER_BASE_MODEL": ("base_model", str),
    "PHOTOMAKER_ADAPTER": ("adapter", str),
    "PHOTOMAKER_ADAPTER_WEIGHT_NAME": ("adapter_weight_name", str),
    "PHOTOMAKER_VERSION": ("pm_version", int),
    "PHOTOMAKER_DEVICE": ("device", str),
    "PHOTOMAKER_DTYPE": ("dtype", str),
    "PHOTOMAKER_VARIANT": ("variant", str),
    "PHOTOMAKER_OFFLOAD": ("offload", str),
    "PHOTOMAKER_VAE_TILING": ("vae_tiling", parse_switch),
    "PHOTOMAKER_COMPILE": ("compile_unet", parse_switch),
    "PHOTOMAKER_TINY_DIR": ("tiny_dir", str),
    "PHOTOMAKER_FACE_BACKEND": ("face_backend", str),
    "PHOTOMAKER_FACE_MODEL_DIR": ("face_model_dir", str),
    "PHOTOMAKER_FAST_LORA_DIR": ("fast_lora_dir", str),
    "PHOTOMAKER_FUSED_CACHE_DIR": ("fused_cache_dir", str),
    "PHOTOMAKER_CACHE_SIZE": ("cache_size", int),
    "PHOTOMAKER_MIN_STEPS": ("min_steps", int),
    "PHOTOMAKER_TRIGGER_WORD": ("trigger_word", str),
}


def resolve_device_and_dtype(device: str | None, dtype: str | None, *, tiny: bool = False) -> tuple[str, torch.dtype]:
    """The device and dtype to load on; the one place where the defaults are decided.

    Device: cuda, then mps, then cpu. Dtype: float16 on cuda and mps (half the memory, tensor cores);
    bfloat16 on cpu (about 2x faster than float32 there, same range); float32 for the tiny test models,
    whose outputs should not depend on rounding.
    """
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    kind = device.split(":", 1)[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"PHOTOMAKER_DEVICE={device!r} but torch {torch.__version__} sees no CUDA GPU (CUDA build: "
            f"{torch.version.cuda or 'no, CPU-only wheel'}). Install a CUDA build of torch, check the driver with "
            "nvidia-smi, or set PHOTOMAKER_DEVICE=cpu."
        )
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"PHOTOMAKER_DEVICE={device!r} but this machine has no usable Apple MPS device.")
    if kind not in ("cuda", "mps", "cpu", "xpu"):
        raise ModelLoadError(f"Unknown device {device!r}: use cuda, cuda:N, mps or cpu.")
    if dtype is not None:
        return device, _DTYPES[dtype.lower()]
    if tiny:
        return device, torch.float32
    return device, torch.float16 if kind in ("cuda", "mps", "xpu") else torch.bfloat16


@dataclass
class ServiceConfig:
    """How to load the model. Built from CLI flags and PHOTOMAKER_* environment variables (`from_env`)."""

    base_model: str = DEFAULT_BASE_MODEL  # Hub id, local diffusers folder, or single .safetensors/.ckpt file
    adapter: str | None = None  # Hub repo, folder or file; None -> official repo of `pm_version`
    adapter_weight_name: str | None = None  # file inside a repo/folder adapter; None -> official file name
    pm_version: Literal[1, 2] = 1
    device: str | None = None  # None -> cuda, mps, cpu, whichever is available
    dtype: str | None = None  # "float16" | "bfloat16" | "float32"; None -> see resolve_device_and_dtype
    variant: str | None = None  # weights variant of a Hub base model; None -> "fp16" when loading in fp16
    offload: Literal["none", "model", "sequential"] = "none"
    vae_tiling: bool = False  # decode in tiles (large sizes on small GPUs); on by default with offload
    compile_unet: bool = False
    tiny_dir: str | None = None  # random-weight models written by `make-tiny` (offline tests and demos)
    face_backend: Literal["dlib", "insightface", "none"] | None = None  # None -> dlib (v1), insightface (v2)
    face_model_dir: str | None = None  # where the face backend finds its model files
    fast_lora_dir: str | None = None  # folder holding fast-mode LoRA files by their official names (offline)
    # Where the adapter is kept as loaded (fused UNet weights + ID encoder), so that later starts skip the fuse.
    # None -> default_fused_cache_dir() (no cache with the tiny models); "off" -> no cache.
    fused_cache_dir: str | None = None
    cache_size: int = 16  # ID encodings kept (LRU)
    min_steps: int | None = None  # None -> presets.STEPS_MIN, or 1 with tiny models
    trigger_word: str = DEFAULT_TRIGGER_WORD

    def __post_init__(self) -> None:
        """Refuse an impossible configuration at once, naming the setting to change."""
        if self.pm_version not in (1, 2):
            raise InvalidRequestError(f"PHOTOMAKER_VERSION must be 1 or 2, got {self.pm_version!r}.")
        if self.offload not in _OFFLOAD_MODES:
            raise InvalidRequestError(
                f"PHOTOMAKER_OFFLOAD must be one of {', '.join(_OFFLOAD_MODES)}, got {self.offload!r}."
            )
        if self.dtype is not None and self.dtype.lower() not in _DTYPES:
            raise InvalidRequestError(f"PHOTOMAKER_DTYPE must be float16, bfloat16 or float32, got {self.dtype!r}.")
        if self.face_backend is not None and self.face_backend not in _FACE_BACKENDS:
            raise InvalidRequestError(
                f"PHOTOMAKER_FACE_BACKEND must be one of {', '.join(_FACE_BACKENDS)}, got {self.face_backend!r}."
            )
        if self.pm_version == 2 and self.resolved_face_backend != "insightface":
            raise InvalidRequestError(
                "PhotoMaker v2 needs InsightFace (ArcFace, 512-d) face embeddings: set "
                "PHOTOMAKER_FACE_BACKEND=insightface (its models are for non-commercial use) or use PhotoMaker v1."
            )
        if self.cache_size < 0:
            raise InvalidRequestError(f"PHOTOMAKER_CACHE_SIZE must be >= 0, got {self.cache_size}.")
        if self.min_steps is not None and not 1 <= self.min_steps <= presets.STEPS_MAX:
            raise InvalidRequestError(
                f"PHOTOMAKER_MIN_STEPS must be between 1 and {presets.STEPS_MAX}, got {self.min_steps}."
            )

    @classmethod
    def from_env(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServiceConfig:
        """Defaults, then PHOTOMAKER_* variables, then `overrides` (e.g. CLI flags; None values are skipped)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (field_name, parse) in ENV_VARIABLES.items():
            text = environ.get(name)
            if text is None or text == "":
                continue
            try:
                values[field_name] = parse(text)
            except ValueError as exc:
                raise InvalidRequestError(f"{name}={text!r} is not valid: {exc}.") from None
        known = {f.name for f in fields(cls)}
        for key, value in (overrides or {}).items():
            if key not in known:
                raise InvalidRequestError(f"Unknown service setting {key!r}; known: {', '.join(sorted(known))}.")
            if value is not None:
                values[key] = value
        return cls(**values)

    @property
    def resolved_face_backend(self) -> str:
        if self.face_backend is not None:
            return self.face_backend
        return "insightface" if self.pm_version == 2 else "dlib"

    @property
    def resolved_fast_lora_dir(self) -> str | None:
        """Where fast mode reads its LoRAs: the setting, else the tiny models' own, else the Hub (None)."""
        if self.fast_lora_dir:
            return self.fast_lora_dir
        return os.path.join(self.tiny_dir, "fast-loras") if self.tiny_dir else None

    @property
    def resolved_fused_cache_dir(self) -> str | None:
        """The prepared-adapter cache folder to use, or None for none (see `fused_cache_dir`)."""
        if self.fused_cache_dir is None:
            return None if self.tiny_dir else default_fused_cache_dir()
        return None if self.fused_cache_dir.strip().lower() in _OFF else self.fused_cache_dir

    @property
    def steps_min(self) -> int:
        """Fewest sampling steps accepted in standard mode (tiny models allow 1 so that tests run fast)."""
        if self.min_steps is not None:
            return self.min_steps
        return 1 if self.tiny_dir else presets.STEPS_MIN


# --------------------------------------------------------------------------------------------------------
# Requests and results (the contract with the app and the CLI)
# --------------------------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    """One user request, with the app's defaults."""

    id_images: Sequence[Any]  # paths, bytes, PIL images (1-4)
    prompt: str
    negative_prompt: str = ""
    style: str = style_template.DEFAULT_STYLE_NAME
    aspect_ratio: str = aspect_ratio_template.DEFAULT_ASPECT_RATIO
    num_steps: int = presets.STEPS_DEFAULT  # ignored in fast mode (the preset's count is used)
    style_strength: float = presets.STYLE_STRENGTH_DEFAULT  # percent, 15-50 -> start_merge_step
    num_outputs: int = presets.OUTPUTS_DEFAULT
    guidance_scale: float = presets.GUIDANCE_DEFAULT  # ignored in fast mode
    seed: int | None = None  # None -> random; image k uses seed + k
    mix_images: Sequence[Any] = ()  # photos of a second person (identity mixing)
    mix_strength: float = presets.MIX_STRENGTH_DEFAULT  # 0 = only the first person, 1 = only the second
    crop_faces: bool = True
    fast: str | None = None  # key or label of a fast-mode preset, None = standard sampling
    best_of: int = 1  # candidates per output (seeds seed + k*best_of + j); each output is its most alike one
    width: int | None = None  # width and height together override aspect_ratio
    height: int | None = None


@dataclass
class GeneratedImage:
    image: Image.Image  # carries the PNG text metadata in image.info
    parameters: dict[str, Any]
    identity: dict[str, Any] | None = None  # IdentityScore.as_dict(); None without a face backend

    @property
    def seed(self) -> int:
        """The seed that regenerates this image alone."""
        return int(self.parameters["seed"])


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    seed: int  # the request's seed (image k used seed + k)
    warnings: list[str] = field(default_factory=list)  # e.g. "Added the trigger word 'img' after 'man'"
    prompt_used: str = ""
    crops: list[Image.Image] = field(default_factory=list)  # the ID photos as the encoder saw them
    negative_prompt_used: str = ""
    cache_hit: bool = False  # the ID encoding came from the cache (the ID encoder did not run)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


@dataclass
class ServiceStatus:
    state: Literal["idle", "loading", "ready", "error"]
    message: str
    progress: float  # 0..1 while loading


@dataclass
class GenerationPlan:
    """A request after validation: everything `generate` needs, decoded and in range."""

    request: GenerationRequest
    id_images: list[Image.Image]
    mix_images: list[Image.Image]
    id_names: list[str | None]  # file names of the photos, for messages about them
    mix_names: list[str | None]
    prompt: str  # after trigger insertion, before the style
    negative_prompt: str  # the user's, cleaned, before the style's negative is added
    positive: str
    negative: str
    width: int
    height: int
    num_steps: int
    guidance_scale: float
    style_strength: float
    start_merge_step: int
    seed: int
    num_outputs: int
    best_of: int
    mix_strength: float | None  # None without mix photos
    fast: presets.FastPreset | None
    warnings: list[str]

    @property
    def id_weights(self) -> list[float] | None:
        """Per-photo weights for identity mixing (None without mix photos).

        With mix strength m, every photo of the first person gets min(1, 2(1 - m)) and every photo of the
        second min(1, 2m): at 0.5 both identities are applied in full, and moving towards one end fades the
        other person out linearly while the favoured one stays at full strength.
        """
        if self.mix_strength is None:
            return None
        m = self.mix_strength
        return [min(1.0, 2 * (1 - m))] * len(self.id_images) + [min(1.0, 2 * m)] * len(self.mix_images)

    def image_seed(self, index: int) -> int:
        """Seed of candidate `index`: wraps so that every stored seed is a valid request seed."""
        return (self.seed + index) % (presets.SEED_MAX + 1)


ProgressCallback = Callable[[int, int, str], None]  # (step, total, description)


# --------------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------------


def _show(value: float) -> str:
    """A number as people write it: 2147483647 rather than 2.14748e+09, 0.1 rather than 0.10000."""
    if float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return f"{value:g}"


def _number(name: str, value: Any, low: float, high: float, *, integer: bool, hint: str = "") -> float:
    """`value` as a finite number in [low, high] (an int when `integer`), else a specific error."""
    bounds = f"between {_show(low)} and {_show(high)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(f"{name} must be a number {bounds}, got {value!r}.{hint}")
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number {bounds}, got {value}.{hint}")
    if integer and value != int(value):
        raise InvalidRequestError(f"{name} must be a whole number {bounds}, got {value}.{hint}")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be {bounds}, got {_show(value)}.{hint}")
    return int(value) if integer else float(value)


def _photo_list(value: Any, what: str) -> list[Any]:
    """A request's photo field as a list; a single path, bytes or image counts as one photo."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, bytearray, os.PathLike, Image.Image)):
        return [value]
    if not isinstance(value, Sequence):
        raise IDImageError(f"{what} must be a list of photos (paths, bytes or images), got {type(value).__name__}.")
    return list(value)


def _file_name(source: Any) -> str | None:
    return Path(source).name if isinstance(source, (str, os.PathLike)) else None


def _load_photos(sources: Sequence[Any], names: Sequence[str | None], noun: str) -> list[Image.Image]:
    """Decode uploaded photos within the upload limits; errors name the photo ("ID photo 2 (me.jpg): ...")."""
    return [
        load_image(source, name=photo_label(index, name, noun), max_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_IMAGE_PIXELS)
        for index, (source, name) in enumerate(zip(sources, names, strict=True))
    ]


def _clean_text(name: str, value: Any, warnings: list[str]) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"The {name} must be text, got {type(value).__name__}.")
    cleaned, count = _CONTROL_CHARS.subn(" ", value)
    if count:
        warnings.append(f"Removed {count} invisible control character(s) from the {name}.")
    if len(cleaned) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(
            f"The {name} is {len(cleaned)} characters long; keep it under {MAX_PROMPT_CHARS}. SDXL reads only "
            "the first 77 tokens (about 60 words), so shorten it to the words that matter."
        )
    return cleaned.strip()


# --------------------------------------------------------------------------------------------------------
# Load-error explanations
# --------------------------------------------------------------------------------------------------------


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _is_out_of_memory(exc: BaseException) -> bool:
    return any(
        isinstance(e, torch.OutOfMemoryError)
        or (
            isinstance(e, (RuntimeError, MemoryError))
            and re.search(r"out of memory|can't allocate", str(e), re.IGNORECASE)
        )
        for e in _chain(exc)
    )


def explain_load_error(exc: BaseException, what: str, source: str, setting: str) -> ModelLoadError:
    """A ModelLoadError that says why `what` (from `source`, configured by `setting`) failed, and the fix."""
    from huggingface_hub import errors as hub_errors

    chain = _chain(exc)

    def found(*types: type) -> BaseException | None:
        return next((e for e in chain if isinstance(e, types)), None)

    if isinstance(exc, ModelLoadError):
        return ModelLoadError(str(exc))  # a fresh copy: the original's traceback holds the loading frames
    if _is_out_of_memory(exc):
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


# --------------------------------------------------------------------------------------------------------
# The ID-encoding cache
# --------------------------------------------------------------------------------------------------------


@dataclass
class _IDEntry:
    """Everything derived from a set of photos: reused as a whole on a cache hit (no face detection either)."""

    encoding: Any  # photomaker.pipeline.IDEncoding
    crops: list[Image.Image]
    warnings: list[str]
    # Per person (first, then the second one of a mix): (N, D) face embeddings, for the identity score.
    people_embeds: list[np.ndarray] = field(default_factory=list)

    def references(self, mix_strength: float | None) -> np.ndarray | None:
        """The embeddings the likeness is measured against: those of the person who dominates the mix."""
        if not self.people_embeds:
            return None
        second = mix_strength is not None and mix_strength > 0.5 and len(self.people_embeds) > 1
        return self.people_embeds[1 if second else 0]


class _LRUCache:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._items: OrderedDict[str, _IDEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> _IDEntry | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: _IDEntry) -> None:
        if self.max_size == 0:
            return
        with self._lock:
            self._items[key] = entry
            self._items.move_to_end(key)
            while len(self._items) > self.max_size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._items), "max_size": self.max_size}


def _pixels_digest(hasher: Any, images: Sequence[Image.Image]) -> None:
    for image in images:
        hasher.update(f"{image.mode}:{image.width}x{image.height};".encode())
        hasher.update(image.tobytes())


# --------------------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------------------


class PhotoMakerService:
    """Owns one pipeline per process: loads it once in the background and runs generations one at a time."""

    def __init__(self, config: ServiceConfig | None = None) -> None:
        self.config = config or ServiceConfig.from_env()
        self._state_lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self._state: Literal["idle", "loading", "ready", "error"] = "idle"
        self._message = "Not loaded yet."
        self._progress = 0.0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._load_error: ModelLoadError | None = None
        self._pipe: Any = None
        self._analyzer: Any = None
        self._fast_state: presets.FastModeState | None = None
        self._cache = _LRUCache(self.config.cache_size)
        self._base_model_label = self.config.base_model
        self._adapter_label = self.config.adapter or DEFAULT_ADAPTER_REPO[self.config.pm_version]

    # ---------------------------------------------------------------- lifecycle

    @property
    def pipeline(self) -> Any:
        """The loaded pipeline, or None before it is ready."""
        return self._pipe

    @property
    def face_analyzer(self) -> Any:
        """The face analyser, or None before loading or with face_backend="none"."""
        return self._analyzer

    def cache_info(self) -> dict[str, int]:
        """ID-encoding cache counters: hits, misses, size, max_size."""
        return self._cache.info()

    def status(self) -> ServiceStatus:
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
            self._thread = threading.Thread(
                target=self._load, args=(self._done,), name="photomaker-load", daemon=True
            )
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
        """(base model, adapter, adapter weight name) to load; tiny mode writes its models first if needed."""
        config = self.config
        if config.tiny_dir:
            from photomaker.testing import make_tiny

            paths = make_tiny(config.tiny_dir)
            return str(paths["base"]), str(paths[f"v{config.pm_version}"]), None
        adapter = config.adapter or DEFAULT_ADAPTER_REPO[config.pm_version]
        weight_name = config.adapter_weight_name
        if weight_name is None and not os.path.isfile(os.path.expanduser(adapter)):
            weight_name = DEFAULT_ADAPTER_FILE[config.pm_version]
        return config.base_model, adapter, weight_name

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
            self._base_model_label, self._adapter_label = base, adapter

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
                self._pipe, self._analyzer, self._fast_state = pipe, analyzer, None
                self._cache.clear()
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
                self._free_memory()
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

    def _free_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- validation

    def validate(self, request: GenerationRequest) -> GenerationPlan:
        """Check every field and decode the photos; raise a specific error for the first problem found."""
        config = self.config
        warnings: list[str] = []

        photos = _photo_list(request.id_images, "id_images")
        if not presets.ID_IMAGES_MIN <= len(photos) <= presets.ID_IMAGES_MAX:
            raise IDImageError(
                f"Got {len(photos)} ID photos; give {presets.ID_IMAGES_MIN} to {presets.ID_IMAGES_MAX} photos of "
                "the same person (more photos from different angles give a more faithful likeness)."
            )
        mix_photos = _photo_list(request.mix_images, "mix_images")
        if len(mix_photos) > presets.MIX_IMAGES_MAX:
            raise IDImageError(
                f"Got {len(mix_photos)} photos of the second person; give at most {presets.MIX_IMAGES_MAX}."
            )

        prompt = _clean_text("prompt", request.prompt, warnings)
        if not prompt:
            raise PromptError(
                f"The prompt is empty. Describe the picture and name the person with a class word followed by "
                f"'{config.trigger_word}', e.g. \"a photo of a woman {config.trigger_word} in a garden\"."
            )
        negative = _clean_text("negative prompt", request.negative_prompt or "", warnings)
        negative, had_trigger = strip_trigger_word(negative, config.trigger_word)
        if had_trigger:
            warnings.append(
                f"Removed '{config.trigger_word}' from the negative prompt: it only marks the person in the prompt."
            )
        if not isinstance(request.style, str):
            raise InvalidRequestError(f"style must be a style name, got {request.style!r}.")
        prompt, note = insert_trigger_word(prompt, config.trigger_word)
        if note:
            warnings.append(note)
        check_prompt_text(prompt, config.trigger_word)
        positive, full_negative = style_template.apply_style(request.style, prompt, negative)
        width, height = self._validate_size(request)

        fast = None
        if request.fast:
            if not isinstance(request.fast, str):
                raise InvalidRequestError(f"fast must be a preset name or None, got {request.fast!r}.")
            fast = presets.get_fast_preset(request.fast)
            if config.resolved_fast_lora_dir:
                fast = fast.with_weights(config.resolved_fast_lora_dir)
            if config.offload == "sequential":
                raise InvalidRequestError(
                    "Fast mode cannot be used with PHOTOMAKER_OFFLOAD=sequential (its LoRA is fused into weights "
                    "that sequential offload keeps off the device); use PHOTOMAKER_OFFLOAD=model."
                )
        style_strength = _number(
            "style_strength",
            request.style_strength,
            presets.STYLE_STRENGTH_MIN,
            presets.STYLE_STRENGTH_MAX,
            integer=False,
            hint=" Higher keeps more of the prompt's style, lower more of the face.",
        )
        if fast is None:
            num_steps = int(
                _number(
                    "num_steps",
                    request.num_steps,
                    config.steps_min,
                    presets.STEPS_MAX,
                    integer=True,
                    hint=f" The default is {presets.STEPS_DEFAULT}.",
                )
            )
            guidance = _number(
                "guidance_scale",
                request.guidance_scale,
                presets.GUIDANCE_MIN,
                presets.GUIDANCE_MAX,
                integer=False,
                hint=f" The default is {presets.GUIDANCE_DEFAULT:g}.",
            )
            merge_step = presets.start_merge_step(style_strength, num_steps)
        else:
            num_steps, guidance = fast.steps, fast.guidance_scale
            merge_step = fast.start_merge_step(style_strength)
            ignored = [
                f"{name} {value!r}"
                for name, value, default in (
                    ("steps", request.num_steps, presets.STEPS_DEFAULT),
                    ("guidance", request.guidance_scale, presets.GUIDANCE_DEFAULT),
                )
                if value != default
            ]
            if ignored:
                warnings.append(
                    f"{fast.label} uses its own {fast.steps} steps and guidance {fast.guidance_scale:g}; "
                    f"the given {' and '.join(ignored)} were not used."
                )
        num_outputs = int(
            _number("num_outputs", request.num_outputs, presets.OUTPUTS_MIN, presets.OUTPUTS_MAX, integer=True)
        )
        best_of = int(_number("best_of", request.best_of, presets.BEST_OF_MIN, presets.BEST_OF_MAX, integer=True))
        if best_of > 1 and config.resolved_face_backend == "none":
            raise InvalidRequestError(
                "best_of needs identity scores to pick the most alike images, and this service runs without face "
                "analysis (PHOTOMAKER_FACE_BACKEND=none); use best_of=1 or start it with a face backend."
            )
        if request.seed is None:
            seed = secrets.randbelow(presets.SEED_MAX + 1)
        else:
            seed = int(
                _number(
                    "seed",
                    request.seed,
                    presets.SEED_MIN,
                    presets.SEED_MAX,
                    integer=True,
                    hint=" Leave it empty for a random seed.",
                )
            )
        if not isinstance(request.crop_faces, bool):
            raise InvalidRequestError(f"crop_faces must be true or false, got {request.crop_faces!r}.")
        mix_strength = None
        if mix_photos:
            mix_strength = _number(
                "mix_strength", request.mix_strength, presets.MIX_STRENGTH_MIN, presets.MIX_STRENGTH_MAX, integer=False
            )

        id_names = [_file_name(src) for src in photos]
        mix_names = [f"second person, {name}" if name else "second person" for name in map(_file_name, mix_photos)]
        id_images = _load_photos(photos, id_names, "ID photo")
        mix_images = _load_photos(mix_photos, list(map(_file_name, mix_photos)), "photo of the second person")

        if fast is not None and not fast.uses_cfg and full_negative:
            whose = "your negative prompt" if negative else f"the negative prompt of the style {request.style!r}"
            warnings.append(
                f"{fast.label} samples without classifier-free guidance, so {whose} has no effect; "
                "the Hyper-SD presets keep it."
            )
        return GenerationPlan(
            request=request,
            id_images=id_images,
            mix_images=mix_images,
            id_names=id_names,
            mix_names=mix_names,
            prompt=prompt,
            negative_prompt=negative,
            positive=positive,
            negative=full_negative,
            width=width,
            height=height,
            num_steps=num_steps,
            guidance_scale=guidance,
            style_strength=style_strength,
            start_merge_step=merge_step,
            seed=seed,
            num_outputs=num_outputs,
            best_of=best_of,
            mix_strength=mix_strength,
            fast=fast,
            warnings=warnings,
        )

    @staticmethod
    def _validate_size(request: GenerationRequest) -> tuple[int, int]:
        # Checked even when width and height override it: it is written into the PNG, to be restored later.
        if not isinstance(request.aspect_ratio, str):
            raise InvalidRequestError(f"aspect_ratio must be a preset name, got {request.aspect_ratio!r}.")
        preset_size = aspect_ratio_template.get_size(request.aspect_ratio)
        if request.width is None and request.height is None:
            return preset_size
        if request.width is None or request.height is None:
            raise InvalidRequestError("Give both width and height, or neither (then the aspect ratio decides).")
        sizes = []
        for name, value in (("width", request.width), ("height", request.height)):
            size = int(_number(name, value, presets.SIZE_MIN, presets.SIZE_MAX, integer=True))
            if size % presets.SIZE_MULTIPLE:
                lower = size - size % presets.SIZE_MULTIPLE
                raise InvalidRequestError(
                    f"{name} must be a multiple of {presets.SIZE_MULTIPLE}, got {size}; use {lower} or "
                    f"{lower + presets.SIZE_MULTIPLE}."
                )
            sizes.append(size)
        return sizes[0], sizes[1]

    # ---------------------------------------------------------------- generation

    def generate(
        self, request: GenerationRequest | GenerationPlan, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Validate, then generate `request.num_outputs` images (best of `best_of` each) with metadata.

        A plan from `validate` is used as it is (its photos are already decoded and checked).
        """
        plan = request if isinstance(request, GenerationPlan) else self.validate(request)
        self.wait_ready(progress=progress)
        with self._generate_lock:
            try:
                return self._run(plan, progress)
            except BaseException as exc:
                # The traceback's finished frames hold every tensor of the failed run (latents, activations, the
                # allocation that failed); whoever receives the error keeps them alive, so clear them before freeing.
                for error in _chain(exc):
                    traceback.clear_frames(error.__traceback__)
                self._free_memory()
                if _is_out_of_memory(exc):
                    raise InvalidRequestError(
                        f"Ran out of memory generating {plan.num_outputs * plan.best_of} image(s) at "
                        f"{plan.width}x{plan.height}. Ask for fewer images or a smaller size, or start the service "
                        "with PHOTOMAKER_OFFLOAD=model and PHOTOMAKER_VAE_TILING=1."
                    ) from exc
                raise

    def _set_fast_mode(self, pipe: Any, preset: presets.FastPreset | None) -> None:
        current = self._fast_state.preset if self._fast_state else None
        if current == preset:
            return
        if self._fast_state is not None:
            presets.restore_standard_mode(pipe, self._fast_state)
            self._fast_state = None
        if preset is not None:
            source = preset.lora_path or preset.adapter_repo
            try:
                self._fast_state = presets.apply_fast_preset(pipe, preset)
            except Exception as exc:
                if isinstance(exc, PhotoMakerError):
                    raise
                raise explain_load_error(
                    exc, f"the fast-mode LoRA {preset.weight_name}", source, "PHOTOMAKER_FAST_LORA_DIR"
                ) from exc

    def _cache_key(self, plan: GenerationPlan) -> str:
        hasher = hashlib.sha256()
        hasher.update(b"first person;")
        _pixels_digest(hasher, plan.id_images)
        hasher.update(b"second person;")
        _pixels_digest(hasher, plan.mix_images)
        config = self.config
        identity = (
            self._adapter_label,
            config.adapter_weight_name,
            config.pm_version,
            plan.request.crop_faces,
            config.resolved_face_backend,
        )
        hasher.update(repr(identity).encode())
        return hasher.hexdigest()

    def _encode(self, pipe: Any, plan: GenerationPlan) -> tuple[_IDEntry, bool]:
        """The ID encoding of the plan's photos: from the cache, or face preparation + one ID-encoder run."""
        key = self._cache_key(plan)
        entry = self._cache.get(key)
        if entry is not None:
            return entry, True
        crops = plan.id_images + plan.mix_images
        people_embeds: list[np.ndarray] = []
        warnings: list[str] = []
        face_embeds = None
        if self._analyzer is not None:
            from photomaker.faces import prepare_id_photos

            people = [
                prepare_id_photos(photos, self._analyzer, crop=plan.request.crop_faces, need_embeddings=True,
                                  names=names)
                for photos, names in ((plan.id_images, plan.id_names), (plan.mix_images, plan.mix_names))
                if photos
            ]
            crops = [image for person in people for image in person.images]
            warnings = [warning for person in people for warning in person.warnings]
            people_embeds = [person.face_embeds for person in people]
            if pipe.pm_version >= 2:
                face_embeds = torch.from_numpy(np.concatenate([person.face_embeds for person in people]))
        encoding = pipe.encode_id_images(crops, id_embeds=face_embeds)
        entry = _IDEntry(encoding=encoding, crops=crops, warnings=warnings, people_embeds=people_embeds)
        self._cache.put(key, entry)
        return entry, False

    def _run(self, plan: GenerationPlan, progress: ProgressCallback | None) -> GenerationResult:
        pipe = self._pipe
        timings: dict[str, float] = {}
        started = time.perf_counter()
        num_photos = len(plan.id_images) + len(plan.mix_images)
        prompt_notes = pipe.check_prompt(plan.positive, num_id_images=num_photos)
        self._set_fast_mode(pipe, plan.fast)

        report = progress or (lambda step, total, description: None)
        total_candidates = plan.num_outputs * plan.best_of
        chunks = [range(i, min(i + MAX_BATCH, total_candidates)) for i in range(0, total_candidates, MAX_BATCH)]
        total_steps = plan.num_steps * len(chunks)
        report(0, total_steps, "Preparing the ID photos")
        entry, cache_hit = self._encode(pipe, plan)
        timings["id_encoding"] = time.perf_counter() - started

        denoise_started = time.perf_counter()
        candidates: list[Image.Image] = []
        for chunk_index, chunk in enumerate(chunks):
            done_before = chunk_index * plan.num_steps
            description = f"Denoising ({len(chunk)} image{'s' if len(chunk) > 1 else ''})"

            def on_step(
                _pipe: Any, step: int, _timestep: Any, _kwargs: dict, base: int = done_before, text: str = description
            ) -> dict:
                report(base + step + 1, total_steps, text)
                return {}

            output = pipe(
                prompt=plan.positive,
                negative_prompt=plan.negative or None,
                input_id_images=entry.encoding,
                id_weights=plan.id_weights,
                start_merge_step=plan.start_merge_step,
                num_inference_steps=plan.num_steps,
                guidance_scale=plan.guidance_scale,
                num_images_per_prompt=len(chunk),
                # One CPU generator per image: each image depends on its own seed only (reproducible alone,
                # and the same noise on every device).
                generator=[torch.Generator("cpu").manual_seed(plan.image_seed(k)) for k in chunk],
                width=plan.width,
                height=plan.height,
                callback_on_step_end=on_step,
                output_type="pil",
            )
            candidates.extend(output.images)
        timings["denoising"] = time.perf_counter() - denoise_started

        score_started = time.perf_counter()
        identities: list[dict[str, Any] | None] = [None] * len(candidates)
        references = entry.references(plan.mix_strength)
        if self._analyzer is not None and references is not None:
            from photomaker.faces import identity_score

            report(total_steps, total_steps, "Scoring the likeness")
            identities = [identity_score(image, references, self._analyzer).as_dict() for image in candidates]
        # Output k is the most alike of its own candidates k*B .. k*B+B-1 (seeds seed + k*B + j): the same
        # images as a batch job, which requests each output alone with seed + k*B.
        keep = [
            max(range(k * plan.best_of, (k + 1) * plan.best_of), key=lambda c: _similarity(identities[c]))
            for k in range(plan.num_outputs)
        ]
        timings["identity_score"] = time.perf_counter() - score_started

        images = []
        for k in keep:
            params = self._parameters(plan, plan.image_seed(k), identities[k])
            images.append(GeneratedImage(metadata.image_with_metadata(candidates[k], params), params, identities[k]))
        timings["total"] = time.perf_counter() - started
        return GenerationResult(
            images=images,
            seed=plan.seed,
            warnings=plan.warnings + prompt_notes + entry.warnings,
            prompt_used=plan.positive,
            crops=list(entry.crops),
            negative_prompt_used=plan.negative,
            cache_hit=cache_hit,
            timings=timings,
        )

    def _parameters(self, plan: GenerationPlan, seed: int, identity: dict[str, Any] | None) -> dict[str, Any]:
        request = plan.request
        config = self.config
        return metadata.complete_parameters(
            {
                "prompt": plan.prompt,
                "negative_prompt": plan.negative_prompt,
                "prompt_used": plan.positive,
                "negative_prompt_used": plan.negative,
                "style": request.style,
                "aspect_ratio": request.aspect_ratio,
                "width": plan.width,
                "height": plan.height,
                "seed": seed,
                "num_steps": plan.num_steps,
                "guidance_scale": plan.guidance_scale,
                "style_strength": plan.style_strength,
                "start_merge_step": plan.start_merge_step,
                "num_id_images": len(plan.id_images),
                "num_mix_images": len(plan.mix_images),
                "mix_strength": plan.mix_strength,
                "crop_faces": request.crop_faces and config.resolved_face_backend != "none",  # what was done
                "fast": plan.fast.key if plan.fast else None,
                "base_model": self._base_model_label,
                "pm_version": config.pm_version,
                "adapter": self._adapter_label,
                "face_backend": config.resolved_face_backend,
                "identity": identity,
            }
        )


def _similarity(identity: dict[str, Any] | None) -> float:
    """Ranking key for best-of-N: images without a detected face rank last."""
    if not identity or identity.get("similarity") is None:
        return -math.inf
    return float(identity["similarity"])
