"""The pipeline of each generation mode (text-to-image, ControlNet, T2I-Adapter, img2img, inpaint) on the loaded
base pipeline, and the arguments each mode adds to the pipeline call.

Every mode's pipeline is built once from the base pipeline's components (the same UNet, VAE and text encoders:
no copy), takes the base pipeline's PhotoMaker adapter (`use_photomaker_adapter_of`), and is kept. Control
models, the pose and depth estimators and the IP-Adapter come from one `ControlModelRegistry`, loaded on first
use. What the base pipeline changes between requests (the scheduler in fast mode, the IP-Adapter's image
encoder) is handed on to the mode's pipeline before each call.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from PIL import Image

from photomaker import control_images
from photomaker.control_models import ControlModelRegistry
from photomaker.requests import CompositionPlan

logger = logging.getLogger(__name__)

_SHARED_PER_CALL = ("scheduler", "image_encoder", "feature_extractor")
"""Components the base pipeline may replace after a mode's pipeline was built from it."""


def _pipeline_class(kind: str) -> type:
    if kind == "controlnet":
        from photomaker.pipeline_controlnet import PhotoMakerStableDiffusionXLControlNetPipeline

        return PhotoMakerStableDiffusionXLControlNetPipeline
    if kind == "t2i_adapter":
        from photomaker.pipeline_t2i_adapter import PhotoMakerStableDiffusionXLAdapterPipeline

        return PhotoMakerStableDiffusionXLAdapterPipeline
    if kind == "img2img":
        from photomaker.pipeline_img2img import PhotoMakerStableDiffusionXLImg2ImgPipeline

        return PhotoMakerStableDiffusionXLImg2ImgPipeline
    from photomaker.pipeline_inpaint import PhotoMakerStableDiffusionXLInpaintPipeline

    return PhotoMakerStableDiffusionXLInpaintPipeline


class ModePipelines:
    """The pipelines of every mode on one loaded base pipeline, each built on first use and kept."""

    def __init__(self, base: Any, registry: ControlModelRegistry) -> None:
        self.base = base
        self.registry = registry
        self._pipelines: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def pipeline(self, plan: CompositionPlan) -> Any:
        """The pipeline that runs `plan`, with the base pipeline's current scheduler and image encoder."""
        if plan.pipeline == "text2img":
            return self.base
        key = (plan.pipeline, plan.control_type)
        with self._lock:
            pipe = self._pipelines.get(key)
            if pipe is None:
                extra: dict[str, Any] = {}
                if plan.pipeline == "controlnet":
                    extra["controlnet"] = self.registry.control_model(plan.control_type)
                elif plan.pipeline == "t2i_adapter":
                    extra["adapter"] = self.registry.control_model(plan.control_type)
                pipe = _pipeline_class(plan.pipeline)(**self.base.components, **extra)
                pipe.use_photomaker_adapter_of(self.base)
                pipe.set_progress_bar_config(disable=True)
                self._pipelines[key] = pipe
                logger.info("Built the %s pipeline on the loaded model's components", plan.pipeline)
        pipe.register_modules(**{name: getattr(self.base, name, None) for name in _SHARED_PER_CALL})
        return pipe

    def control_map(self, plan: CompositionPlan, width: int, height: int) -> tuple[Image.Image | None, list[str]]:
        """The control map for `plan` (made during validation, or now by the pose or depth estimator)."""
        if not plan.control_type or plan.control_map is not None:
            return plan.control_map, []
        estimators: dict[str, Any] = {}
        if plan.control_type == "pose" and not control_images.looks_like_pose_skeleton(plan.control_source):
            estimators["pose_estimator"] = self.registry.pose_estimator()
        elif plan.control_type == "depth":
            estimators["depth_estimator"] = self.registry.depth_estimator()
        prepared = control_images.prepare_control_image(
            plan.control_type, plan.control_source, width, height, **estimators
        )
        return prepared.image, list(prepared.notes)

    def style_arguments(self, pipe: Any, plan: CompositionPlan) -> dict[str, Any]:
        """The IP-Adapter arguments of one call: the style image at its scale; once the IP-Adapter is loaded,
        a request without a style image runs it at scale 0 (diffusers then skips its attention entirely), so
        no earlier request's style image carries over."""
        if plan.style_image is not None:
            self.registry.load_ip_adapter(self.base, scale=plan.style_image_scale)
            pipe.register_modules(image_encoder=self.base.image_encoder, feature_extractor=self.base.feature_extractor)
            return {"ip_adapter_image": plan.style_image}
        if getattr(self.base.unet, "encoder_hid_proj", None) is None:
            return {}
        self.base.set_ip_adapter_scale(0.0)
        return {"ip_adapter_image": Image.new("RGB", (64, 64))}


def mode_arguments(
    plan: CompositionPlan, control_map: Image.Image | None, mask: Image.Image | None, width: int, height: int
) -> dict[str, Any]:
    """The arguments that `plan`'s mode adds to the pipeline call (size included: img2img takes it from the
    start photo, which validation fitted to the output size)."""
    if plan.pipeline == "controlnet":
        return {
            "image": control_map,
            "controlnet_conditioning_scale": plan.control_scale,
            "control_guidance_start": plan.control_start,
            "control_guidance_end": plan.control_end,
            "width": width,
            "height": height,
        }
    if plan.pipeline == "t2i_adapter":
        return {
            "image": control_map,
            "adapter_conditioning_scale": plan.control_scale,
            "adapter_conditioning_factor": plan.control_end,
            "width": width,
            "height": height,
        }
    if plan.pipeline == "img2img":
        return {"image": plan.init_image, "strength": plan.strength}
    if plan.pipeline == "inpaint":
        return {
            "image": plan.init_image,
            "mask_image": mask,
            "strength": plan.strength,
            "width": width,
            "height": height,
        }
    return {"width": width, "height": height}
