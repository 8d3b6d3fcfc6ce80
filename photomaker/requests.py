"""The contract between the service and its callers (app, CLI, batch): what a request holds, what comes back,
and the validated plan in between. Plain data, no model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from photomaker import presets
from photomaker.aspect_ratios import DEFAULT_ASPECT_RATIO
from photomaker.styles import DEFAULT_STYLE_NAME


@dataclass
class GenerationRequest:
    """One user request, with the app's defaults."""

    id_images: Sequence[Any]  # paths, bytes, PIL images (1-4)
    prompt: str
    negative_prompt: str = ""
    style: str = DEFAULT_STYLE_NAME
    aspect_ratio: str = DEFAULT_ASPECT_RATIO
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
    control_type: str = ""  # "" = no control, else one of presets.CONTROL_TYPES
    control_image: Any = None  # path, bytes, PIL image or a Gradio ImageEditor value (drawings)
    control_scale: float | None = None  # None: presets.CONTROL_SCALE_DEFAULT, the sketch adapter SKETCH_SCALE_DEFAULT
    control_start: float = 0.0  # fraction of the steps before the control starts (ControlNets only)
    control_end: float | None = None  # None: 1, the sketch adapter SKETCH_END_DEFAULT (adapter_conditioning_factor)
    init_image: Any = None  # start photo: img2img, or inpaint with mask_image / mask_face
    strength: float | None = None  # None: IMG2IMG_STRENGTH_DEFAULT, with a mask INPAINT_STRENGTH_DEFAULT
    mask_image: Any = None  # white = redraw (an image or an ImageEditor value)
    mask_face: bool = False  # mask the face found in init_image
    style_image: Any = None  # IP-Adapter image
    style_image_scale: float = presets.STYLE_IMAGE_SCALE_DEFAULT


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
    control_image: Image.Image | None = None  # the control map the ControlNet / adapter saw (for a preview)
    mask_image: Image.Image | None = None  # the inpainting mask used (drawn, uploaded, or found around the face)


@dataclass
class ServiceStatus:
    state: Literal["idle", "loading", "ready", "error"]
    message: str
    progress: float  # 0..1 while loading


PipelineKind = Literal["text2img", "controlnet", "t2i_adapter", "img2img", "inpaint"]


@dataclass
class CompositionPlan:
    """The checked control, start-photo and style-image settings of a request: which pipeline runs, with what.

    Control maps that need no model (canny, sketch) are made during validation; pose and depth maps need an
    estimator, so `control_map` stays None for them until generation (from `control_source`).
    """

    pipeline: PipelineKind = "text2img"
    control_type: str = ""
    control_source: Image.Image | None = None  # the user's control image, decoded
    control_map: Image.Image | None = None  # at the output size, ready for the control model
    control_scale: float | None = None
    control_start: float = 0.0
    control_end: float | None = None
    init_source: Image.Image | None = None  # the start photo as given (faces are found at full resolution)
    init_image: Image.Image | None = None  # the start photo, fitted to the output size
    strength: float | None = None
    mask_image: Image.Image | None = None  # L, 255 = redraw, at the output size (None: mask_face or img2img)
    mask_face: bool = False
    style_image: Image.Image | None = None
    style_image_scale: float = presets.STYLE_IMAGE_SCALE_DEFAULT

    def denoising_steps(self, num_steps: int) -> int:
        """Steps the pipeline runs: a start photo skips the first (1 - strength) of them, as diffusers does."""
        if self.strength is None:
            return num_steps
        return min(int(num_steps * self.strength), num_steps)

    def merge_step_in_run(self, start_merge_step: int, num_steps: int) -> int:
        """`start_merge_step` counted over the steps the pipeline runs: the ID enters at the same point of the
        noise schedule as without a start photo, whose skipped first steps are the text-only ones (counted over
        the run, a low strength would leave no ID step at all: 50 steps, merge 10, strength 0.2 runs 10)."""
        skipped = num_steps - self.denoising_steps(num_steps)
        return max(0, start_merge_step - skipped)


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
    composition: CompositionPlan = field(default_factory=CompositionPlan)

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
