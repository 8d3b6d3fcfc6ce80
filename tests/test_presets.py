"""Parameter ranges, the style-strength -> merge-step rule, and fast-mode presets on the tiny pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from photomaker import presets
from photomaker.errors import InvalidRequestError, ModelLoadError


@pytest.mark.parametrize(
    ("strength", "steps", "expected"),
    [
        (15, 20, 3),  # both minimums
        (50, 20, 10),
        (20, 50, 10),  # the defaults
        (15, 100, 15),
        (49, 60, 29),
        (50, 60, 30),  # reaches the cap exactly
        (50, 100, 30),  # both maximums: capped at 30, not 50
        (33.3, 20, 6),  # truncated, not rounded
    ],
)
def test_start_merge_step(strength: float, steps: int, expected: int) -> None:
    assert presets.start_merge_step(strength, steps) == expected


def test_ranges_are_the_official_demo_ones() -> None:
    assert (presets.STEPS_MIN, presets.STEPS_MAX, presets.STEPS_DEFAULT) == (20, 100, 50)
    assert (presets.STYLE_STRENGTH_MIN, presets.STYLE_STRENGTH_MAX, presets.STYLE_STRENGTH_DEFAULT) == (15, 50, 20)
    assert (presets.GUIDANCE_MIN, presets.GUIDANCE_MAX, presets.GUIDANCE_DEFAULT) == (0.1, 10, 5)
    assert (presets.OUTPUTS_MIN, presets.OUTPUTS_MAX, presets.OUTPUTS_DEFAULT) == (1, 4, 2)
    assert (presets.SEED_MIN, presets.SEED_MAX) == (0, 2**31 - 1)
    assert (presets.ID_IMAGES_MIN, presets.ID_IMAGES_MAX) == (1, 4)


def test_fast_preset_table_is_complete() -> None:
    table = {p.key: (p.adapter_repo, p.weight_name, p.scheduler, p.steps) for p in presets.FAST_PRESETS.values()}
    assert table == {
        "lcm-4": ("latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors", "LCMScheduler", 4),
        "hyper-sd-8": ("ByteDance/Hyper-SD", "Hyper-SDXL-8steps-CFG-lora.safetensors", "DDIMScheduler", 8),
        "hyper-sd-12": ("ByteDance/Hyper-SD", "Hyper-SDXL-12steps-CFG-lora.safetensors", "DDIMScheduler", 12),
        "lightning-8": (
            "ByteDance/SDXL-Lightning",
            "sdxl_lightning_8step_lora.safetensors",
            "EulerDiscreteScheduler",
            8,
        ),
    }
    assert presets.DEFAULT_FAST_PRESET in presets.FAST_PRESETS
    for preset in presets.FAST_PRESETS.values():
        assert preset.source.startswith("https://huggingface.co/")
        assert 0 <= preset.max_merge_step < preset.steps
        assert len({p.label for p in presets.FAST_PRESETS.values()}) == len(presets.FAST_PRESETS)
    # CFG-preserving Hyper-SD keeps guidance 5; Lightning and LCM run without CFG.
    assert presets.FAST_PRESETS["hyper-sd-8"].uses_cfg and presets.FAST_PRESETS["hyper-sd-12"].uses_cfg
    assert not presets.FAST_PRESETS["lightning-8"].uses_cfg and not presets.FAST_PRESETS["lcm-4"].uses_cfg


@pytest.mark.parametrize("key", list(presets.FAST_PRESETS))
def test_fast_schedulers_build_from_an_sdxl_config(key: str) -> None:
    import diffusers

    preset = presets.FAST_PRESETS[key]
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler = getattr(diffusers, preset.scheduler).from_config(euler.config, **preset.scheduler_overrides)
    scheduler.set_timesteps(preset.steps)
    assert len(scheduler.timesteps) == preset.steps
    if "timestep_spacing" in preset.scheduler_overrides:
        assert scheduler.config.timestep_spacing == "trailing"
        assert int(scheduler.timesteps[0]) == 999  # trailing spacing starts from the last training step


def test_fast_merge_step_follows_style_strength_under_a_cap() -> None:
    preset = presets.FAST_PRESETS["hyper-sd-12"]
    assert preset.start_merge_step(15) == 1
    assert preset.start_merge_step(25) == 3
    assert preset.start_merge_step(50) == preset.max_merge_step == 3


def test_get_fast_preset_by_key_or_label() -> None:
    preset = presets.FAST_PRESETS["lightning-8"]
    assert presets.get_fast_preset("lightning-8") is preset
    assert presets.get_fast_preset(preset.label) is preset
    with pytest.raises(InvalidRequestError) as info:
        presets.get_fast_preset("turbo")
    assert "'turbo'" in str(info.value) and all(key in str(info.value) for key in presets.FAST_PRESETS)


def test_with_weights_points_a_copy_at_a_local_file(tmp_path: Path) -> None:
    preset = presets.FAST_PRESETS["lcm-4"]
    local = preset.with_weights(tmp_path / "lcm.safetensors")
    assert local.lora_path == str(tmp_path / "lcm.safetensors")
    assert preset.lora_path is None and local.steps == preset.steps


# ---------------------------------------------------------------------------------------- on the tiny pipeline


@pytest.fixture(scope="module")
def tiny_pipe(tiny_models_dir: Path):
    from photomaker.pipeline import PhotoMakerStableDiffusionXLPipeline

    pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(tiny_models_dir / "base", dtype=torch.float32)
    pipe.load_photomaker_adapter(tiny_models_dir / "photomaker-v1.bin")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_fast_lora(path: Path) -> Path:
    """A tiny stand-in for a few-step LoRA: the tiny UNet's LoRA shape, other values than PhotoMaker's."""
    from safetensors.torch import save_file

    from photomaker.testing import tiny_lora_state_dict

    save_file(tiny_lora_state_dict(seed=7), str(path))
    return path


def unet_weights(pipe) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in pipe.unet.state_dict().items()}


def test_apply_then_restore_fast_mode(tiny_pipe, tmp_path: Path) -> None:
    lora = write_fast_lora(tmp_path / "fast.safetensors")
    standard_scheduler = tiny_pipe.scheduler
    before = unet_weights(tiny_pipe)

    state = presets.apply_fast_preset(tiny_pipe, presets.FAST_PRESETS["lcm-4"].with_weights(lora))
    assert type(tiny_pipe.scheduler).__name__ == "LCMScheduler"
    assert presets.FAST_ADAPTER_NAME in tiny_pipe.get_list_adapters()["unet"]
    during = {
        name.replace(".base_layer", ""): t for name, t in tiny_pipe.unet.state_dict().items() if "lora_" not in name
    }
    changed = [name for name in before if not torch.equal(before[name], during[name])]
    assert changed and all(".attn" in name for name in changed)  # the LoRA is in the attention weights

    presets.restore_standard_mode(tiny_pipe, state)
    assert tiny_pipe.scheduler is standard_scheduler
    assert not tiny_pipe.get_list_adapters().get("unet")
    after = unet_weights(tiny_pipe)
    assert after.keys() == before.keys()
    # Bit for bit: subtracting the LoRA again would leave rounding in these fp32 weights.
    assert [name for name in before if not torch.equal(after[name], before[name])] == []


def test_fast_lora_from_a_folder_by_its_official_name(tiny_pipe, tmp_path: Path) -> None:
    preset = presets.FAST_PRESETS["hyper-sd-8"]
    write_fast_lora(tmp_path / preset.weight_name)
    state = presets.apply_fast_preset(tiny_pipe, preset.with_weights(tmp_path))
    try:
        scheduler = tiny_pipe.scheduler
        assert type(scheduler).__name__ == "DDIMScheduler"
        assert scheduler.config.timestep_spacing == "trailing" and scheduler.config.clip_sample is False
    finally:
        presets.restore_standard_mode(tiny_pipe, state)


def test_missing_local_lora_file_is_a_clear_error(tiny_pipe, tmp_path: Path) -> None:
    preset = presets.FAST_PRESETS["lightning-8"].with_weights(tmp_path / "nope.safetensors")
    scheduler = tiny_pipe.scheduler
    with pytest.raises(ModelLoadError, match="does not exist"):
        presets.apply_fast_preset(tiny_pipe, preset)
    assert tiny_pipe.scheduler is scheduler


def test_fast_mode_next_to_an_unfused_photomaker_lora(tiny_models_dir: Path, tmp_path: Path) -> None:
    """With PhotoMaker kept as a live adapter, fast mode fuses both and restoring brings back the live adapter."""
    from photomaker.pipeline import PhotoMakerStableDiffusionXLPipeline

    pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(tiny_models_dir / "base", dtype=torch.float32)
    pipe.load_photomaker_adapter(tiny_models_dir / "photomaker-v1.bin", fuse=False)
    before = unet_weights(pipe)

    state = presets.apply_fast_preset(
        pipe, presets.FAST_PRESETS["lcm-4"].with_weights(write_fast_lora(tmp_path / "fast.safetensors"))
    )
    assert state.active_before == ("photomaker",)
    presets.restore_standard_mode(pipe, state)

    assert pipe.get_list_adapters()["unet"] == ["photomaker"]
    assert pipe.get_active_adapters() == ["photomaker"]
    after = unet_weights(pipe)
    assert after.keys() == before.keys()
    assert [name for name in before if not torch.equal(after[name], before[name])] == []


def test_lora_for_another_model_is_refused_and_nothing_changes(tiny_pipe, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file(
        {
            "unet.some.other.model.to_q.lora_A.weight": torch.zeros(4, 8),
            "unet.some.other.model.to_q.lora_B.weight": torch.zeros(8, 4),
        },
        str(path),
    )
    scheduler = tiny_pipe.scheduler
    before = unet_weights(tiny_pipe)
    with pytest.raises(ModelLoadError, match="has no weights that match this UNet"):
        presets.apply_fast_preset(tiny_pipe, presets.FAST_PRESETS["lcm-4"].with_weights(path))
    assert tiny_pipe.scheduler is scheduler and not tiny_pipe.get_list_adapters().get("unet")
    assert all(torch.equal(before[name], tensor) for name, tensor in unet_weights(tiny_pipe).items())
