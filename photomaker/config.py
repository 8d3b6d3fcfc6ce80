"""How the service loads the model: `ServiceConfig`, the PHOTOMAKER_* environment variables, and the choice of
device and dtype. The choice lists here are the ones the app's and the CLI's model flags offer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from photomaker import presets
from photomaker.errors import InvalidRequestError, ModelLoadError
from photomaker.prompt import DEFAULT_TRIGGER_WORD

DEFAULT_BASE_MODEL = "SG161222/RealVisXL_V4.0"
DEFAULT_ADAPTER_REPO = {1: "TencentARC/PhotoMaker", 2: "TencentARC/PhotoMaker-V2"}
DEFAULT_ADAPTER_FILE = {1: "photomaker-v1.bin", 2: "photomaker-v2.bin"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
DTYPES: dict[str, torch.dtype] = {  # every spelling accepted -> torch dtype
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
OFFLOAD_MODES = ("none", "model", "sequential")
DTYPE_CHOICES = ("float16", "bfloat16", "float32")  # the spellings offered by the flags
_OFF = ("off", "none", "0", "false", "no")
FACE_BACKENDS = ("dlib", "insightface", "none")
PM_VERSIONS = (1, 2)


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


def parse_pm_version(value: int | str) -> int:
    """A PhotoMaker version number as users write it: 1, 2, "1", "2", "v1" or "v2" (the reference's spelling).

    Only the spelling is checked here; `ServiceConfig` says which versions exist.
    """
    if isinstance(value, bool):
        raise ValueError(f"use 1, 2, v1 or v2, not {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().removeprefix("v")
    if not text.isdigit():
        raise ValueError(f"use 1, 2, v1 or v2, not {value!r}")
    return int(text)


# Environment variable -> (ServiceConfig field, parser of the variable's text).
ENV_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "PHOTOMAKER_BASE_MODEL": ("base_model", str),
    "PHOTOMAKER_ADAPTER": ("adapter", str),
    "PHOTOMAKER_ADAPTER_WEIGHT_NAME": ("adapter_weight_name", str),
    "PHOTOMAKER_VERSION": ("pm_version", parse_pm_version),
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
        return device, DTYPES[dtype.lower()]
    if tiny:
        return device, torch.float32
    return device, torch.float16 if kind in ("cuda", "mps", "xpu") else torch.bfloat16


@dataclass
class ServiceConfig:
    """How to load the model. Built from CLI flags and PHOTOMAKER_* environment variables (`from_env`)."""

    base_model: str = DEFAULT_BASE_MODEL  # Hub id, local diffusers folder, or single .safetensors/.ckpt file
    adapter: str | None = None  # Hub repo, folder or file; None -> official repo of `pm_version`
    adapter_weight_name: str | None = None  # file inside a repo/folder adapter; None -> official file name
    pm_version: Literal[1, 2] = 1  # "v1" / "v2" are accepted and stored as 1 / 2
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
        try:
            self.pm_version = parse_pm_version(self.pm_version)
        except ValueError as exc:
            raise InvalidRequestError(f"PHOTOMAKER_VERSION={self.pm_version!r} is not valid: {exc}.") from None
        if self.pm_version not in PM_VERSIONS:
            raise InvalidRequestError(
                f"PHOTOMAKER_VERSION must be 1 or 2 (v1 and v2 are accepted too), got {self.pm_version!r}."
            )
        if self.offload not in OFFLOAD_MODES:
            raise InvalidRequestError(
                f"PHOTOMAKER_OFFLOAD must be one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}."
            )
        if self.dtype is not None and self.dtype.lower() not in DTYPES:
            raise InvalidRequestError(f"PHOTOMAKER_DTYPE must be float16, bfloat16 or float32, got {self.dtype!r}.")
        if self.face_backend is not None and self.face_backend not in FACE_BACKENDS:
            raise InvalidRequestError(
                f"PHOTOMAKER_FACE_BACKEND must be one of {', '.join(FACE_BACKENDS)}, got {self.face_backend!r}."
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
