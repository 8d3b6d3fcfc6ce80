"""The cached PhotoMaker pipeline shared by the app and the CLI.

One `PhotoMakerService` per process owns the loaded pipeline (loaded once, in the background, never twice),
the face analyser, and an LRU cache of ID encodings, and exposes one call: `generate(request)`.

INTERFACE DRAFT: the dataclasses below are the contract between service, app and CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from PIL import Image

DEFAULT_BASE_MODEL = "SG161222/RealVisXL_V4.0"
DEFAULT_ADAPTER_REPO = {1: "TencentARC/PhotoMaker", 2: "TencentARC/PhotoMaker-V2"}
DEFAULT_ADAPTER_FILE = {1: "photomaker-v1.bin", 2: "photomaker-v2.bin"}


@dataclass
class ServiceConfig:
    """How to load the model. Built from CLI flags and PHOTOMAKER_* environment variables."""

    base_model: str = DEFAULT_BASE_MODEL  # Hub id, local diffusers folder, or single .safetensors file
    adapter: str | None = None  # Hub repo, folder or file; None -> official repo of `pm_version`
    adapter_weight_name: str | None = None
    pm_version: Literal[1, 2] = 1
    device: str | None = None  # None -> cuda, mps, cpu, whichever is available
    dtype: str | None = None  # "float16" | "bfloat16" | "float32"; None -> fp16 on GPU, fp32 on CPU
    offload: Literal["none", "model", "sequential"] = "none"
    vae_tiling: bool = False
    compile_unet: bool = False
    tiny_dir: str | None = None  # use the random-weight models written by `make-tiny` (offline)
    face_backend: Literal["dlib", "insightface"] = "dlib"
    cache_size: int = 16  # ID encodings kept (LRU)


@dataclass
class GenerationRequest:
    """One user request, with the app's defaults."""

    id_images: Sequence[Any]  # paths, bytes, PIL images (1-4)
    prompt: str
    negative_prompt: str = ""
    style: str = "Photographic (Default)"
    aspect_ratio: str = "Instagram (1:1)"
    num_steps: int = 50
    style_strength: float = 20.0  # percent, 15-50 -> start_merge_step
    num_outputs: int = 2
    guidance_scale: float = 5.0
    seed: int | None = None  # None -> random
    mix_images: Sequence[Any] = ()  # photos of a second person (identity mixing)
    mix_strength: float = 0.5  # 0 = only the first person, 1 = only the second
    crop_faces: bool = True
    fast: str | None = None  # name of a fast-mode preset, None = standard sampling
    best_of: int = 1  # generate best_of * num_outputs candidates, keep the most similar
    width: int | None = None  # overrides aspect_ratio when both are given
    height: int | None = None


@dataclass
class GeneratedImage:
    image: Image.Image  # carries the PNG text metadata in image.info / pnginfo
    parameters: dict[str, Any]
    identity: dict[str, Any] | None = None  # IdentityScore.as_dict()


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    seed: int
    warnings: list[str] = field(default_factory=list)  # e.g. "inserted 'img' after 'man'"
    prompt_used: str = ""
    crops: list[Image.Image] = field(default_factory=list)  # the ID photos as the encoder saw them


ProgressCallback = Callable[[int, int, str], None]  # (step, total, description)
