"""PhotoMaker: realistic or stylised pictures of a person from 1-4 photos and a prompt, on SDXL.

Heavy modules (diffusers, transformers) load on first use, so that `photomaker.prompt` or the CLI's
`score` command start quickly.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PhotoMakerStableDiffusionXLPipeline": "photomaker.pipeline",
    "IDEncoding": "photomaker.pipeline",
    "PhotoMakerMixin": "photomaker.pipeline_mixin",
    "PhotoMakerStableDiffusionXLControlNetPipeline": "photomaker.pipeline_controlnet",
    "PhotoMakerStableDiffusionXLAdapterPipeline": "photomaker.pipeline_t2i_adapter",
    "PhotoMakerStableDiffusionXLImg2ImgPipeline": "photomaker.pipeline_img2img",
    "PhotoMakerStableDiffusionXLInpaintPipeline": "photomaker.pipeline_inpaint",
    "PhotoMakerIDEncoder": "photomaker.id_encoder",
    "PhotoMakerIDEncoderV2": "photomaker.id_encoder",
    "load_checkpoint": "photomaker.loading",
    "parse_pm_version": "photomaker.loading",
    "FaceAnalysis2": "photomaker.faces.reference_api",
    "analyze_faces": "photomaker.faces.reference_api",
    "PhotoMakerService": "photomaker.service",
    "ServiceConfig": "photomaker.config",
    "GenerationRequest": "photomaker.requests",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'photomaker' has no attribute {name!r}")
