"""Generation parameter ranges, the style-strength -> merge-step rule, and fast-mode (few-step LoRA) presets.

The ranges are the official demo's; the service validates against them and the app and CLI
build their sliders and flags from the same constants, so the three never disagree.

Fast mode loads a distilled few-step LoRA as a named adapter next to the fused PhotoMaker LoRA and swaps the
scheduler; `restore_standard_mode` undoes both. The published settings of each LoRA are cited in the table.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from photomaker.errors import InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

# --- Ranges (official demo) -------------------------------------------------------------------------------
STEPS_MIN, STEPS_MAX, STEPS_DEFAULT = 20, 100, 50
STYLE_STRENGTH_MIN, STYLE_STRENGTH_MAX, STYLE_STRENGTH_DEFAULT = 15.0, 50.0, 20.0
GUIDANCE_MIN, GUIDANCE_MAX, GUIDANCE_DEFAULT = 0.1, 10.0, 5.0
OUTPUTS_MIN, OUTPUTS_MAX, OUTPUTS_DEFAULT = 1, 4, 2
SEED_MIN, SEED_MAX = 0, 2**31 - 1
ID_IMAGES_MIN, ID_IMAGES_MAX = 1, 4
MIX_IMAGES_MAX = 4
MIX_STRENGTH_MIN, MIX_STRENGTH_MAX, MIX_STRENGTH_DEFAULT = 0.0, 1.0, 0.5
BEST_OF_MIN, BEST_OF_MAX = 1, 4
# Output size: a multiple of the VAE factor; 64 lets the tiny test models run, 2048 is twice SDXL's training size.
SIZE_MULTIPLE, SIZE_MIN, SIZE_MAX = 8, 64, 2048
# The official demo never delays the identity past step 30, whatever the step count.
MAX_START_MERGE_STEP = 30

# --- Control, start photo and style image -------------------------------------------------------------------
# The control types the service offers (the same names as `photomaker.control_images.CONTROL_TYPES`, kept here
# so that the field table loads without torch).
CONTROL_TYPES: tuple[str, ...] = ("pose", "canny", "depth", "sketch")
CONTROL_SCALE_MIN, CONTROL_SCALE_MAX = 0.0, 2.0
CONTROL_SCALE_DEFAULT = 1.0  # diffusers' SDXL ControlNet default
# The reference's v2 sketch demo: adapter_conditioning_scale 0.7, adapter_conditioning_factor 0.8.
SKETCH_SCALE_DEFAULT = 0.7
SKETCH_END_DEFAULT = 0.8
# The SDXL sketch T2I-Adapter (full_adapter_xl) unshuffles the image in 16 px blocks: both sides must divide.
SKETCH_SIZE_MULTIPLE = 16
CONTROL_END_DEFAULT = 1.0
# img2img keeps the layout and colours of the start photo and redraws its details; inpainting redraws the
# masked region almost from scratch (the person must replace whoever is there) but keeps its light and colours.
IMG2IMG_STRENGTH_DEFAULT = 0.6
INPAINT_STRENGTH_DEFAULT = 0.9
STYLE_IMAGE_SCALE_DEFAULT = 0.7  # the reference's IP-Adapter script


def start_merge_step(style_strength_percent: float, num_steps: int) -> int:
    """Denoising step index up to which only the text prompt conditions the image (the official demo's rule).

    A higher style strength lets the text lay out the picture for longer before the identity is merged in.
    """
    return min(MAX_START_MERGE_STEP, int(style_strength_percent / 100 * num_steps))


# --- Fast mode ----------------------------------------------------------------------------------------------
FAST_ADAPTER_NAME = "fast_mode"


@dataclass(frozen=True)
class FastPreset:
    """One few-step LoRA and the sampling settings its authors publish for it."""

    key: str  # short name used by the CLI (`--fast hyper-sd-8`) and the API
    label: str  # shown in the app
    adapter_repo: str  # Hub repository of the LoRA
    weight_name: str  # file inside `adapter_repo` (or inside `lora_path` when that is a folder)
    scheduler: str  # diffusers scheduler class name, built from the pipeline's scheduler config
    scheduler_overrides: Mapping[str, Any] = field(default_factory=dict)
    steps: int = 8
    guidance_scale: float = 1.0  # <= 1 disables classifier-free guidance (the negative prompt is then unused)
    # Cap on the text-only phase: with so few steps the identity needs most of them to take hold; the
    # style-strength rule of standard mode still applies below this cap.
    max_merge_step: int = 2
    lora_scale: float = 1.0
    lora_path: str | None = None  # local file or folder used instead of the Hub (offline runs, tests)
    source: str = ""  # where the settings were published

    def with_weights(self, path: str | os.PathLike[str]) -> FastPreset:
        """The same preset reading its LoRA from a local file or folder instead of the Hub."""
        return dataclasses.replace(self, lora_path=os.fspath(path))

    def start_merge_step(self, style_strength_percent: float) -> int:
        """The merge step for this preset's step count, capped by `max_merge_step`."""
        return min(self.max_merge_step, start_merge_step(style_strength_percent, self.steps))

    @property
    def uses_cfg(self) -> bool:
        """Whether the negative prompt has any effect (diffusers applies CFG only above 1)."""
        return self.guidance_scale > 1.0


# Published settings:
# - LCM-LoRA SDXL: model card of latent-consistency/lcm-lora-sdxl: "change the scheduler to LCMScheduler ...
#   2 to 8 steps ... disable guidance_scale or use values between 1.0 and 2.0"; its example uses 4 steps.
# - Hyper-SD CFG LoRAs: model card of ByteDance/Hyper-SD (news of Apr 30 and May 13, 2024): the 8-step and
#   12-step CFG-preserved SDXL LoRAs "support 5~8 guidance scales"; the diffusers examples fuse the LoRA at
#   scale 1 and use DDIMScheduler with timestep_spacing="trailing". clip_sample / set_alpha_to_one are pinned
#   to SDXL's own values because DDIM's defaults differ when a base model's config omits them.
# - SDXL-Lightning: model card of ByteDance/SDXL-Lightning: "use the correct checkpoint for the corresponding
#   inference steps", EulerDiscreteScheduler with timestep_spacing="trailing", guidance_scale=0.
_DDIM_TRAILING = {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False}

FAST_PRESETS: dict[str, FastPreset] = {
    preset.key: preset
    for preset in (
        FastPreset(
            key="lcm-4",
            label="LCM-LoRA (4 steps)",
            adapter_repo="latent-consistency/lcm-lora-sdxl",
            weight_name="pytorch_lora_weights.safetensors",
            scheduler="LCMScheduler",
            steps=4,
            guidance_scale=1.0,
            max_merge_step=1,
            source="https://huggingface.co/latent-consistency/lcm-lora-sdxl",
        ),
        FastPreset(
            key="hyper-sd-8",
            label="Hyper-SD CFG (8 steps)",
            adapter_repo="ByteDance/Hyper-SD",
            weight_name="Hyper-SDXL-8steps-CFG-lora.safetensors",
            scheduler="DDIMScheduler",
            scheduler_overrides=_DDIM_TRAILING,
            steps=8,
            guidance_scale=5.0,
            max_merge_step=2,
            source="https://huggingface.co/ByteDance/Hyper-SD",
        ),
        FastPreset(
            key="hyper-sd-12",
            label="Hyper-SD CFG (12 steps)",
            adapter_repo="ByteDance/Hyper-SD",
            weight_name="Hyper-SDXL-12steps-CFG-lora.safetensors",
            scheduler="DDIMScheduler",
            scheduler_overrides=_DDIM_TRAILING,
            steps=12,
            guidance_scale=5.0,
            max_merge_step=3,
            source="https://huggingface.co/ByteDance/Hyper-SD",
        ),
        FastPreset(
            key="lightning-8",
            label="SDXL-Lightning (8 steps)",
            adapter_repo="ByteDance/SDXL-Lightning",
            weight_name="sdxl_lightning_8step_lora.safetensors",
            scheduler="EulerDiscreteScheduler",
            scheduler_overrides={"timestep_spacing": "trailing"},
            steps=8,
            guidance_scale=0.0,
            max_merge_step=2,
            source="https://huggingface.co/ByteDance/SDXL-Lightning",
        ),
    )
}
# The default must be fast first (issue 5: >= 6x a 50-step image). CFG-preserving 8-step presets cannot be:
# at most 50/8 = 6.25x counting the UNet alone, 5.5x measured (BENCHMARKS.md). SDXL-Lightning's 8-step LoRA
# runs without guidance, half the UNet batch (9.1x measured), at the cost of the negative prompt, which the
# user is told; hyper-sd-8 and hyper-sd-12 keep guidance for those who need negatives.
DEFAULT_FAST_PRESET = "lightning-8"


def get_fast_preset(name: str) -> FastPreset:
    """The preset called `name` (its key or its label)."""
    if name in FAST_PRESETS:
        return FAST_PRESETS[name]
    for preset in FAST_PRESETS.values():
        if preset.label == name:
            return preset
    choices = ", ".join(f"{p.key!r} ({p.label})" for p in FAST_PRESETS.values())
    raise InvalidRequestError(f"Unknown fast-mode preset {name!r}. Choose one of: {choices}.")


@dataclass
class FastModeState:
    """What `apply_fast_preset` changed, so that `restore_standard_mode` can put it back exactly."""

    preset: FastPreset
    adapter_name: str
    scheduler: Any
    active_before: tuple[str, ...]
    # LoRA layer name -> (its weight before fast mode, its merged adapters then). Fusing works on copies of the
    # weights (peft's safe merge), so these are the untouched tensors: putting them back is exact, where
    # subtracting the fast LoRA again would leave up to one rounding step (0.4 % in bf16) in every weight it
    # touched, after every switch.
    originals: dict[str, tuple[Any, list[str]]] = field(default_factory=dict)


def _lora_layer_weights(unet: Any) -> dict[str, tuple[Any, list[str]]]:
    """(weight, merged adapters) of every LoRA layer of `unet`; weights kept on the CPU (no accelerator memory)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            weight = module.get_base_layer().weight.data
            layers[name] = (weight if weight.device.type == "cpu" else weight.to("cpu"), list(module.merged_adapters))
    return layers


def _lora_source(preset: FastPreset) -> tuple[Any, str | None]:
    """What to hand to `load_lora_weights`: a state dict for a local file, else a folder or repo + file name."""
    if preset.lora_path is None:
        return preset.adapter_repo, preset.weight_name
    path = preset.lora_path
    if os.path.isdir(path):
        return path, preset.weight_name
    if not os.path.isfile(path):
        raise ModelLoadError(
            f"The LoRA file {path!r} for fast mode {preset.key!r} does not exist. Give an existing .safetensors "
            f"file or a folder holding {preset.weight_name!r}."
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path), None
    import torch

    # weights_only: a LoRA file must never run code when it is read.
    return torch.load(path, map_location="cpu", weights_only=True), None


def apply_fast_preset(pipe: Any, preset: FastPreset, adapter_name: str = FAST_ADAPTER_NAME) -> FastModeState:
    """Load `preset`'s LoRA as adapter `adapter_name`, fuse it into the UNet and switch the scheduler.

    The LoRA is fused rather than left as a live adapter because peft skips unmerged adapters on any layer
    that already holds a merged one, which would drop the fast LoRA silently on layers a user's fused LoRA
    shares. Adapters that were active but not fused are fused with it for the same reason. Fusing works on
    copies of the weights, and `restore_standard_mode` puts the originals back.
    """
    import diffusers
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.error import NoMatchingPeftModuleError

    scheduler_cls = getattr(diffusers, preset.scheduler)
    unet_adapters_before = set(pipe.get_list_adapters().get("unet", []))
    active_before = tuple(pipe.get_active_adapters()) if unet_adapters_before else ()
    merged_before = {
        name for module in pipe.unet.modules() if isinstance(module, BaseTunerLayer) for name in module.merged_adapters
    }

    source, weight_name = _lora_source(preset)
    kwargs = {"weight_name": weight_name} if weight_name else {}
    logger.info("Loading fast-mode LoRA %s (%s)", preset.key, preset.lora_path or preset.adapter_repo)
    mismatch = ModelLoadError(
        f"The fast-mode LoRA of {preset.key!r} ({preset.lora_path or preset.adapter_repo}) has no weights that "
        "match this UNet. Use an SDXL LoRA in diffusers, peft or kohya format."
    )
    state = FastModeState(preset, adapter_name, pipe.scheduler, active_before)
    try:
        pipe.load_lora_weights(source, adapter_name=adapter_name, **kwargs)
    except NoMatchingPeftModuleError as exc:
        raise mismatch from exc
    try:
        if adapter_name not in pipe.get_list_adapters().get("unet", []):
            raise mismatch
        state.originals = _lora_layer_weights(pipe.unet)
        unfused_active = [name for name in active_before if name not in merged_before and name != adapter_name]
        if unfused_active:
            pipe.fuse_lora(components=["unet"], adapter_names=unfused_active, safe_fusing=True)
        pipe.fuse_lora(
            components=["unet"], adapter_names=[adapter_name], lora_scale=preset.lora_scale, safe_fusing=True
        )
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **dict(preset.scheduler_overrides))
    except BaseException:
        restore_standard_mode(pipe, state)  # a half-applied preset would break the next one
        raise
    return state


def restore_standard_mode(pipe: Any, state: FastModeState) -> None:
    """Undo `apply_fast_preset`: the weights and merged adapters as they were (bit for bit), the fast LoRA
    deleted, the active adapters and the scheduler restored."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in pipe.unet.named_modules():
        if isinstance(module, BaseTunerLayer) and name in state.originals:
            weight, merged = state.originals[name]
            base = module.get_base_layer()
            base.weight.data = weight.to(base.weight.device)
            module.merged_adapters[:] = merged
    others = {name for names in pipe.get_list_adapters().values() for name in names} - {state.adapter_name}
    if others:
        pipe.delete_adapters([state.adapter_name])
        if state.active_before:
            pipe.set_adapters(list(state.active_before))
    else:
        # Also removes the LoRA wrapper layers: the UNet is plain again, as the pipeline leaves it after
        # fusing PhotoMaker (delete_adapters would keep empty wrappers in every attention layer).
        pipe.unload_lora_weights()
    pipe.scheduler = state.scheduler


# --- ZeroGPU reservation ------------------------------------------------------------------------------------
# Fixed overhead plus per denoising step of one 1-megapixel image (SDXL fp16, with CFG, ID encoding and face
# scoring amortised), generous so that a slow step does not cut a generation short.
GPU_BASE_SECONDS = 20
GPU_SECONDS_PER_STEP_MEGAPIXEL = 0.12


def gpu_seconds(
    num_steps: Any, num_outputs: Any, width: Any, height: Any, *, best_of: Any = 1, fast: Any = None
) -> int:
    """Seconds of GPU to reserve for a generation of `num_outputs` images of `width` x `height`, each the best
    of `best_of` candidates.

    In fast mode (`fast`: a preset key or label) the preset's step count runs, whatever `num_steps` says. Runs
    before the request is validated, so odd values are bounded or fall back instead of raising.
    """

    def bounded(value: Any, low: float, high: float) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return low
        return min(max(number, low), high) if math.isfinite(number) else low

    if fast:
        try:
            num_steps = get_fast_preset(str(fast)).steps
        except InvalidRequestError:
            pass  # refused by validation; reserve for the steps given
    steps = bounded(num_steps, 1, STEPS_MAX)
    images = bounded(num_outputs, 1, OUTPUTS_MAX) * bounded(best_of, 1, BEST_OF_MAX)
    try:
        megapixels = bounded(float(width) * float(height) / 1e6, 0.1, 4.0)
    except (TypeError, ValueError):
        megapixels = 1.0
    return int(GPU_BASE_SECONDS + GPU_SECONDS_PER_STEP_MEGAPIXEL * steps * images * megapixels)
