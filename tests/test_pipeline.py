"""The PhotoMaker SDXL pipeline on tiny random-weight models with the real architecture.

The central test checks what reaches the UNet at every denoising step against an independent implementation
of the reference algorithm (prompt surgery and delayed subject conditioning) written here with plain tensor operations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from photomaker.errors import CheckpointError, IDImageError, ModelLoadError, PromptError
from photomaker.pipeline import IDEncoding, PhotoMakerStableDiffusionXLPipeline
from photomaker.testing import tiny_checkpoint, tiny_id_encoder_config, tiny_sdxl_components

STEPS = 4
SIZE = 64


def make_pipe(version: int = 1, fuse: bool = True) -> PhotoMakerStableDiffusionXLPipeline:
    pipe = PhotoMakerStableDiffusionXLPipeline(**tiny_sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_photomaker_adapter(tiny_checkpoint(version), pm_version=version, fuse=fuse)
    return pipe


@pytest.fixture(scope="module")
def pipe_v1():
    return make_pipe(1)


@pytest.fixture(scope="module")
def pipe_v2():
    return make_pipe(2)


def photo(seed: int, size: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def face_embeds(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)) * 20


def run(pipe, **kwargs):
    kwargs.setdefault("prompt", "a photo of a man img")
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("height", SIZE)
    kwargs.setdefault("width", SIZE)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    kwargs.setdefault("output_type", "np")
    return pipe(**kwargs).images


class UNetSpy:
    """Records the text conditioning the UNet receives at each call."""

    def __init__(self, pipe):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._forward = pipe.unet.forward
        self._pipe = pipe
        pipe.unet.forward = self

    def __call__(self, *args, **kwargs):
        self.calls.append((kwargs["encoder_hidden_states"].clone(), kwargs["added_cond_kwargs"]["text_embeds"].clone()))
        return self._forward(*args, **kwargs)

    def remove(self):
        self._pipe.unet.forward = self._forward


# ----------------------------------------------------------------------------- the independent reference


def reference_conditioning(
    pipe, checkpoint, prompt, images, negative_prompt=None, start_merge_step=1, steps=STEPS, id_tokens=None
):
    """The reference prompt surgery and two-phase conditioning from scratch: returns, per step,
    (encoder_hidden_states, text_embeds) for the CFG batch."""
    sd = checkpoint["id_encoder"]
    trigger = pipe.tokenizer.convert_tokens_to_ids("img")

    if id_tokens is None:  # v1: CLIP pooled output -> two projections, concatenated
        cfg = tiny_id_encoder_config()
        vision = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=cfg.vision_hidden_size,
                intermediate_size=cfg.vision_intermediate_size,
                num_hidden_layers=cfg.vision_num_layers,
                num_attention_heads=cfg.vision_num_heads,
                patch_size=cfg.patch_size,
                image_size=cfg.image_size,
                projection_dim=cfg.projection_dim_1,
                hidden_act="quick_gelu",
                layer_norm_eps=1e-5,
            )
        ).eval()
        vision_sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
        missing, unexpected = vision.load_state_dict(vision_sd, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing)
        pixels = pipe.id_image_processor(images, return_tensors="pt").pixel_values
        pooled = vision.vision_model(pixel_values=pixels).pooler_output
        id_tokens = torch.cat(
            [pooled @ sd["visual_projection.weight"].T, pooled @ sd["visual_projection_2.weight"].T], -1
        )
        id_tokens = id_tokens[:, None, :]
    flat_tokens = id_tokens.reshape(-1, id_tokens.shape[-1])
    k = flat_tokens.shape[0]

    def mlp(x, prefix):
        x = F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.layernorm.weight"], sd[f"{prefix}.layernorm.bias"], 1e-5)
        x = F.linear(x, sd[f"{prefix}.fc1.weight"], sd[f"{prefix}.fc1.bias"])
        return F.linear(F.gelu(x), sd[f"{prefix}.fc2.weight"], sd[f"{prefix}.fc2.bias"])

    def fuse(c, e):
        h = mlp(torch.cat([c, e], -1), "fuse_module.mlp1") + c
        h = mlp(h, "fuse_module.mlp2") + h
        return F.layer_norm(
            h, h.shape[-1:], sd["fuse_module.layer_norm.weight"], sd["fuse_module.layer_norm.bias"], 1e-5
        )

    def encode(ids1, ids2):
        out1 = pipe.text_encoder(torch.tensor([ids1]), output_hidden_states=True)
        out2 = pipe.text_encoder_2(torch.tensor([ids2]), output_hidden_states=True)
        return torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], -1)[0], out2.text_embeds[0]

    def fit(ids, pad):
        ids = ids[:76] + [49407] if len(ids) > 77 else ids
        return ids + [pad] * (77 - len(ids))

    ids = pipe.tokenizer(prompt).input_ids  # identical for both tokenizers before padding
    t = ids.index(trigger)
    expanded = ids[: t - 1] + [ids[t - 1]] * k + ids[t + 1 :]
    text_only = [i for i in ids if i != trigger]
    id_embeds, id_pooled = encode(fit(expanded, 49407), fit(expanded, 0))
    rows = list(range(t - 1, t - 1 + k))
    id_embeds = id_embeds.clone()
    id_embeds[rows] = fuse(id_embeds[rows], flat_tokens)
    text_embeds, text_pooled = encode(fit(text_only, 49407), fit(text_only, 0))
    if negative_prompt is None:
        neg, neg_pooled = torch.zeros_like(text_embeds), torch.zeros_like(text_pooled)
    else:
        neg_ids = pipe.tokenizer(negative_prompt).input_ids
        neg, neg_pooled = encode(fit(neg_ids, 49407), fit(neg_ids, 0))
    phases = []
    for i in range(steps):
        embeds, pooled = (text_embeds, text_pooled) if i <= start_merge_step else (id_embeds, id_pooled)
        phases.append((torch.stack([neg, embeds]), torch.stack([neg_pooled, pooled])))
    return phases


@pytest.mark.parametrize("negative_prompt", [None, "blurry, lowres"])
def test_unet_sees_text_only_until_merge_step_then_reference_fused_embeddings_v1(negative_prompt):
    pipe = make_pipe(1)
    checkpoint = tiny_checkpoint(1)
    images = [photo(1), photo(2), photo(3)]
    prompt = "a photo of a man img wearing a hat"
    spy = UNetSpy(pipe)
    run(pipe, prompt=prompt, input_id_images=images, start_merge_step=1, negative_prompt=negative_prompt)
    expected = reference_conditioning(pipe, checkpoint, prompt, images, negative_prompt, start_merge_step=1)
    assert len(spy.calls) == STEPS
    for step, ((embeds, pooled), (ref_embeds, ref_pooled)) in enumerate(zip(spy.calls, expected, strict=True)):
        torch.testing.assert_close(embeds, ref_embeds, atol=1e-5, rtol=1e-4, msg=f"step {step}")
        torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-4, msg=f"step {step}")
    text_phase, id_phase = spy.calls[1][0], spy.calls[2][0]
    assert not torch.allclose(text_phase, id_phase)
    torch.testing.assert_close(spy.calls[0][0], spy.calls[1][0])


def test_v2_fuses_two_tokens_per_photo_like_the_reference(pipe_v2):
    images = [photo(1), photo(2)]
    embeds = face_embeds(2)
    encoding = pipe_v2.encode_id_images(images, id_embeds=embeds)
    assert encoding.id_tokens.shape == (2, 2, pipe_v2.unet.config.cross_attention_dim)
    spy = UNetSpy(pipe_v2)
    try:
        run(pipe_v2, input_id_images=images, id_embeds=embeds, start_merge_step=0)
    finally:
        spy.remove()
    expected = reference_conditioning(
        pipe_v2, tiny_checkpoint(2), "a photo of a man img", images, start_merge_step=0, id_tokens=encoding.id_tokens
    )
    for (embeds_seen, pooled_seen), (ref_embeds, ref_pooled) in zip(spy.calls, expected, strict=True):
        torch.testing.assert_close(embeds_seen, ref_embeds, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pooled_seen, ref_pooled, atol=1e-5, rtol=1e-4)


def test_v2_without_face_embeddings_says_what_to_pass(pipe_v2):
    with pytest.raises(IDImageError, match="needs one face embedding per ID photo"):
        run(pipe_v2, input_id_images=[photo(1)])


# ----------------------------------------------------------------------------- loading


def test_fused_lora_changes_each_targeted_weight_by_up_times_down():
    components = tiny_sdxl_components()
    before = {k: v.clone() for k, v in components["unet"].state_dict().items()}
    pipe = PhotoMakerStableDiffusionXLPipeline(**components)
    checkpoint = tiny_checkpoint(1)
    pipe.load_photomaker_adapter(checkpoint)
    after = pipe.unet.state_dict()
    lora = checkpoint["lora_weights"]
    targets = {}
    for key in lora:
        if key.endswith("down.weight"):
            path, proj = key[len("unet.") :].split(".processor.")
            proj = proj.split("_lora")[0]
            module = f"{path}.{proj}.0" if proj == "to_out" else f"{path}.{proj}"
            up = lora[key.removesuffix("down.weight") + "up.weight"]
            targets[f"{module}.weight"] = up.float() @ lora[key].float()
    assert len(targets) == len(lora) // 2 > 0
    for name, delta in targets.items():
        torch.testing.assert_close(after[name] - before[name], delta, atol=1e-5, rtol=1e-4)
    untouched = [k for k in before if k not in targets]
    assert all(torch.equal(before[k], after[k]) for k in untouched)
    assert not any("lora" in k for k in after)  # fused and unloaded: a plain UNet


def test_unfused_adapter_stays_named_and_can_be_weighted():
    pipe = make_pipe(1, fuse=False)
    assert "photomaker" in pipe.get_list_adapters()["unet"]
    full = run(pipe, input_id_images=[photo(1)])
    pipe.set_adapters(["photomaker"], [0.0])
    without = run(pipe, input_id_images=[photo(1)])
    assert not np.allclose(full, without)


def test_fused_matches_unfused_output():
    fused = run(make_pipe(1, fuse=True), input_id_images=[photo(1)])
    unfused = run(make_pipe(1, fuse=False), input_id_images=[photo(1)])
    np.testing.assert_allclose(fused, unfused, atol=2e-3)


def test_trigger_added_to_both_tokenizers(pipe_v1):
    for tokenizer in (pipe_v1.tokenizer, pipe_v1.tokenizer_2):
        assert tokenizer("a man img").input_ids[3] == 49408


def test_second_adapter_refused(pipe_v1):
    with pytest.raises(CheckpointError, match="already loaded"):
        pipe_v1.load_photomaker_adapter(tiny_checkpoint(1))


def test_calling_without_adapter_says_how_to_load_it():
    pipe = PhotoMakerStableDiffusionXLPipeline(**tiny_sdxl_components())
    with pytest.raises(CheckpointError, match="load_photomaker_adapter"):
        run(pipe, input_id_images=[photo(1)])


# ----------------------------------------------------------------------------- sampling behaviour


def test_same_seed_same_image_other_photos_other_image(pipe_v1):
    first = run(pipe_v1, input_id_images=[photo(1)])
    again = run(pipe_v1, input_id_images=[photo(1)])
    other = run(pipe_v1, input_id_images=[photo(7)])
    assert first.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-5  # same seed is bit-exact, so any change is the photos'


def test_num_images_per_prompt_and_list_prompts(pipe_v1):
    images = run(
        pipe_v1,
        prompt=["a man img", "a woman img smiling"],
        input_id_images=[photo(1), photo(2)],
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in range(4)],
    )
    assert images.shape == (4, SIZE, SIZE, 3)
    single = run(
        pipe_v1,
        prompt="a woman img smiling",
        input_id_images=[photo(1), photo(2)],
        generator=torch.Generator().manual_seed(2),
    )
    np.testing.assert_allclose(images[2], single[0], atol=1e-5)


def test_prompt_2_with_class_word_elsewhere_is_masked_on_its_own(pipe_v1):
    spy = UNetSpy(pipe_v1)
    try:
        run(
            pipe_v1,
            prompt="a man img",
            prompt_2="portrait photo of a smiling man img",
            input_id_images=[photo(1)],
            start_merge_step=0,
        )
    finally:
        spy.remove()
    embeds = spy.calls[-1][0][1]  # cond half, ID phase
    width_1 = pipe_v1.text_encoder.config.hidden_size
    plain = pipe_v1.text_encoder_2(
        torch.tensor([pipe_v1.tokenizer_2("portrait photo of a smiling man").input_ids + [0] * 69]),
        output_hidden_states=True,
    ).hidden_states[-2][0]
    assert not torch.allclose(embeds[6, width_1:], plain[6])  # 'man' of prompt_2 (position 6) was fused
    torch.testing.assert_close(embeds[3, width_1:], plain[3])  # other words untouched


def test_weights_of_one_equal_the_reference_and_zero_removes_identity(pipe_v1):
    images = [photo(1), photo(2)]
    reference = run(pipe_v1, input_id_images=images)
    ones = run(pipe_v1, input_id_images=images, id_weights=[1.0, 1.0])
    np.testing.assert_array_equal(reference, ones)
    spy = UNetSpy(pipe_v1)
    try:
        run(pipe_v1, input_id_images=images, id_weights=[0.0, 0.0], start_merge_step=0, guidance_scale=1.0)
    finally:
        spy.remove()
    ids = pipe_v1.tokenizer("a photo of a man man").input_ids
    plain = torch.cat(
        [
            pipe_v1.text_encoder(
                torch.tensor([ids + [49407] * (77 - len(ids))]), output_hidden_states=True
            ).hidden_states[-2],
            pipe_v1.text_encoder_2(
                torch.tensor([ids + [0] * (77 - len(ids))]), output_hidden_states=True
            ).hidden_states[-2],
        ],
        -1,
    )[0]
    torch.testing.assert_close(spy.calls[-1][0][0], plain, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="id_weights has 3 values but there are 2 ID photos"):
        run(pipe_v1, input_id_images=images, id_weights=[1, 1, 1])


def test_reusable_encoding_skips_the_id_encoder_and_gives_the_same_image(pipe_v1):
    images = [photo(1), photo(2)]
    direct = run(pipe_v1, input_id_images=images)
    encoding = pipe_v1.encode_id_images(images)
    assert isinstance(encoding, IDEncoding) and encoding.num_images == 2
    calls = []
    original = pipe_v1.id_encoder.encode_images
    pipe_v1.id_encoder.encode_images = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        reused = run(pipe_v1, input_id_images=encoding)
    finally:
        pipe_v1.id_encoder.encode_images = original
    assert calls == []
    np.testing.assert_allclose(direct, reused, atol=1e-6)


@pytest.mark.parametrize("kind", ["path", "numpy", "tensor", "batch_tensor"])
def test_id_images_as_paths_arrays_and_tensors(pipe_v1, tmp_path, kind):
    image = photo(3)
    image.save(tmp_path / "me.png")
    array = np.asarray(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    given = {"path": [str(tmp_path / "me.png")], "numpy": [array], "tensor": [tensor], "batch_tensor": tensor[None]}[
        kind
    ]
    expected = pipe_v1.encode_id_images([image]).id_tokens
    # Every form becomes the same 8-bit RGB photo (k / 255 round-trips exactly): the same tokens, bit for bit.
    assert torch.equal(pipe_v1.encode_id_images(given).id_tokens, expected)


def test_bad_prompt_is_refused_before_the_photos_are_encoded(pipe_v1):
    calls = []
    original = pipe_v1.id_encoder.encode_images
    pipe_v1.id_encoder.encode_images = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with pytest.raises(PromptError, match="no trigger word 'img'.*after the class word 'man'"):
            run(pipe_v1, prompt="a photo of a man", input_id_images=[photo(1)])
    finally:
        pipe_v1.id_encoder.encode_images = original
    assert calls == []


def test_latent_output_callbacks_and_interrupt(pipe_v1):
    seen = []

    def stop_after_two(pipe, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))
        if step == 1:
            pipe._interrupt = True
        return tensors

    latents = run(pipe_v1, input_id_images=[photo(1)], output_type="latent", callback_on_step_end=stop_after_two)
    assert latents.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert [s for s, _ in seen] == [0, 1]


def test_given_prompt_embeds_with_mask_are_fused(pipe_v1):
    images = [photo(1)]
    encoding = pipe_v1.encode_id_images(images)
    fused, pooled, text, text_pooled = pipe_v1.encode_photomaker_prompt(
        "a man img", None, encoding, torch.device("cpu")
    )
    spy = UNetSpy(pipe_v1)
    try:
        run(
            pipe_v1,
            prompt=None,
            prompt_embeds=fused * 0 + text,
            pooled_prompt_embeds=pooled,
            class_tokens_mask=torch.tensor([[i == 2 for i in range(77)]]),
            input_id_images=encoding,
            prompt_embeds_text_only=text,
            pooled_prompt_embeds_text_only=text_pooled,
            start_merge_step=0,
            guidance_scale=1.0,
        )
    finally:
        spy.remove()
    seen = spy.calls[-1][0][0]
    torch.testing.assert_close(seen[3:], text[0, 3:])
    assert not torch.allclose(seen[2], text[0, 2])


def test_model_cpu_offload_hooks_the_id_encoder_and_keeps_results():
    pipe = make_pipe(1)
    expected = run(pipe, input_id_images=[photo(1)])
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.id_encoder, "_hf_hook")
    np.testing.assert_allclose(run(pipe, input_id_images=[photo(1)]), expected, atol=1e-5)
    pipe.remove_all_hooks()
    assert not hasattr(pipe.id_encoder, "_hf_hook")


def test_sequential_cpu_offload_covers_the_id_encoder():
    # Running is not possible on a CPU-only machine: diffusers names the execution device "cpu:0", which
    # accelerate's per-layer hooks cannot handle (they fail for any torch module); on a GPU it is "cuda:0".
    pipe = make_pipe(1)
    pipe.enable_sequential_cpu_offload(device="cpu")
    unet_hook = pipe.unet.conv_in._hf_hook
    encoder_hooks = [
        m._hf_hook for m in pipe.id_encoder.modules() if getattr(m, "_hf_hook", None) and m._hf_hook.offload
    ]
    assert encoder_hooks and all(h.execution_device == unet_hook.execution_device for h in encoder_hooks)
    assert {p.device.type for p in pipe.id_encoder.parameters()} == {"meta"}  # weights wait on the CPU
    pipe.remove_all_hooks()
    assert not any(hasattr(m, "_hf_hook") for m in pipe.id_encoder.modules())


def test_to_moves_and_casts_the_id_encoder():
    pipe = make_pipe(1)
    pipe.to(torch.bfloat16)
    assert next(pipe.id_encoder.parameters()).dtype == torch.bfloat16
    images = run(pipe, input_id_images=[photo(1)])
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()


def test_from_pretrained_folder_and_official_file(tiny_models_dir):
    pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(tiny_models_dir / "base")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_photomaker_adapter(str(tiny_models_dir), weight_name="photomaker-v1.bin")
    assert pipe.pm_version == 1
    assert run(pipe, input_id_images=[photo(1)]).shape == (1, SIZE, SIZE, 3)


# ----------------------------------------------------------------------------- review fixes


def test_trigger_word_in_negative_prompt_is_removed_with_a_warning(pipe_v1, caplog):
    # The trigger is an added token with no row in the text encoders' embedding tables.
    spy = UNetSpy(pipe_v1)
    try:
        with caplog.at_level("WARNING", logger="photomaker.pipeline"):
            run(pipe_v1, input_id_images=[photo(1)], negative_prompt="blurry img, bad")
    finally:
        spy.remove()
    assert "negative prompt contains the trigger word 'img'" in caplog.text
    expected, expected_pooled = pipe_v1.encode_negative_prompt("blurry, bad", None, 1, torch.device("cpu"))
    for embeds, pooled in spy.calls:
        torch.testing.assert_close(embeds[0], expected[0])
        torch.testing.assert_close(pooled[0], expected_pooled[0])
    with_trigger_2 = pipe_v1.encode_negative_prompt("blurry, bad", "img bad", 1, torch.device("cpu"))
    only_2 = pipe_v1.encode_negative_prompt("blurry, bad", "bad", 1, torch.device("cpu"))
    torch.testing.assert_close(with_trigger_2[0], only_2[0])


def test_shared_unet_is_not_given_the_lora_twice(pipe_v1):
    other = PhotoMakerStableDiffusionXLPipeline(**pipe_v1.components)
    before = {k: v.clone() for k, v in pipe_v1.unet.state_dict().items()}
    with pytest.raises(CheckpointError, match="UNet already holds a PhotoMaker LoRA"):
        other.load_photomaker_adapter(tiny_checkpoint(1))
    assert all(torch.equal(v, before[k]) for k, v in pipe_v1.unet.state_dict().items())


def test_shared_unet_with_the_unfused_adapter_is_refused_until_unloaded():
    pipe = make_pipe(1, fuse=False)
    other = PhotoMakerStableDiffusionXLPipeline(**pipe.components)
    with pytest.raises(CheckpointError, match="as the adapter 'photomaker'"):
        other.load_photomaker_adapter(tiny_checkpoint(1), fuse=False, adapter_name="second")
    pipe.unload_lora_weights()
    other.load_photomaker_adapter(tiny_checkpoint(1), fuse=False, adapter_name="second")
    assert run(other, input_id_images=[photo(1)]).shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize("offload", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_loading_after_cpu_offload_is_refused(offload):
    pipe = PhotoMakerStableDiffusionXLPipeline(**tiny_sdxl_components())
    getattr(pipe, offload)(device="cpu")
    with pytest.raises(ModelLoadError, match="call load_photomaker_adapter before enable_model_cpu_offload"):
        pipe.load_photomaker_adapter(tiny_checkpoint(1))
    assert pipe.id_encoder is None
    pipe.remove_all_hooks()  # the way out the message names: the weights are back, the load works
    pipe.load_photomaker_adapter(tiny_checkpoint(1))
    assert run(pipe, input_id_images=[photo(1)]).shape == (1, SIZE, SIZE, 3)


def test_prompt_2_without_trigger_is_named_in_the_error(pipe_v1):
    with pytest.raises(PromptError) as info:
        run(pipe_v1, prompt="a man img", prompt_2="cinematic lighting", input_id_images=[photo(1)])
    message = str(info.value)
    assert message.startswith("prompt_2 has no trigger word 'img'")
    assert "leave it out to use prompt for both" in message
    with pytest.raises(PromptError, match="^The prompt has no trigger word"):  # prompt itself: as before
        run(pipe_v1, prompt="a man", prompt_2="a man img", input_id_images=[photo(1)])


def test_given_embeddings_in_another_dtype_are_cast_like_sdxl(pipe_v1):
    encoding = pipe_v1.encode_id_images([photo(1)])
    cpu = torch.device("cpu")
    _, pooled, text, text_pooled = pipe_v1.encode_photomaker_prompt("a man img", None, encoding, cpu)
    negative, negative_pooled = pipe_v1.encode_negative_prompt("blurry", None, 1, cpu)
    given = {
        "prompt_embeds": text,
        "pooled_prompt_embeds": pooled,
        "prompt_embeds_text_only": text,
        "pooled_prompt_embeds_text_only": text_pooled,
        "negative_prompt_embeds": negative,
        "negative_pooled_prompt_embeds": negative_pooled,
    }
    mask = torch.tensor([[i == 2 for i in range(77)]])
    expected = run(pipe_v1, prompt=None, class_tokens_mask=mask, input_id_images=encoding, **given)
    as_fp64 = {name: value.double() for name, value in given.items()}
    images = run(pipe_v1, prompt=None, class_tokens_mask=mask, input_id_images=encoding, **as_fp64)
    np.testing.assert_array_equal(images, expected)  # fp32 -> fp64 -> fp32 is exact


def test_prompt_embeds_without_text_only_embeds_are_refused(pipe_v1):
    encoding = pipe_v1.encode_id_images([photo(1)])
    _, pooled, text, _ = pipe_v1.encode_photomaker_prompt("a man img", None, encoding, torch.device("cpu"))
    with pytest.raises(ValueError, match="pass prompt_embeds_text_only as well"):
        run(
            pipe_v1,
            prompt=None,
            prompt_embeds=text,
            pooled_prompt_embeds=pooled,
            input_id_images=encoding,
            class_tokens_mask=torch.tensor([[i == 2 for i in range(77)]]),
        )


def test_failed_upcast_decode_puts_the_vae_back_in_fp16(monkeypatch):
    pipe = PhotoMakerStableDiffusionXLPipeline(**tiny_sdxl_components())
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    seen = []

    def out_of_memory(latents, return_dict=True):
        seen.append(pipe.vae.dtype)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pipe.vae, "decode", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipe._decode_latents(torch.zeros(1, 4, 8, 8, dtype=torch.float16))
    assert seen == [torch.float32]  # the decode did run upcast
    assert pipe.vae.dtype == torch.float16


def test_unreadable_id_photo_path_is_named_by_its_file_name(pipe_v1, tmp_path):
    with pytest.raises(IDImageError, match=r"^ID photo 2 \(missing\.png\): file not found"):
        pipe_v1.encode_id_images([photo(1), str(tmp_path / "missing.png")])
    with pytest.raises(IDImageError, match=r"^ID photo 1: "):
        pipe_v1.encode_id_images([np.zeros((4, 4, 7), dtype=np.uint8)])


def test_too_long_negative_prompt_is_reported_like_the_prompt(pipe_v1, caplog):
    negative = "blurry, " * 45 + "extra fingers"  # 2 tokens per "blurry,": well past 77
    notes = pipe_v1.check_prompt("a photo of a man img", negative_prompt=negative)
    assert len(notes) == 1
    assert notes[0].startswith("The negative prompt is longer than 77 tokens; these last words were cut: ")
    assert "extra fingers" in notes[0]
    assert pipe_v1.check_prompt("a photo of a man img", negative_prompt="blurry") == []
    named = pipe_v1.check_prompt("a photo of a man img", negative_prompt="blurry", negative_prompt_2=negative)
    assert len(named) == 1 and named[0].startswith("negative_prompt_2 is longer than 77 tokens")
    with caplog.at_level("WARNING"):
        run(pipe_v1, input_id_images=[photo(1)], negative_prompt=negative, num_inference_steps=1)
    assert any("The negative prompt is longer" in r.getMessage() for r in caplog.records)


def test_fuse_lora_after_a_fused_load_does_not_apply_the_lora_twice():
    pipe = make_pipe(1)
    before = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    pipe.fuse_lora()  # the official v1 snippet does this right after load_photomaker_adapter
    assert all(torch.equal(before[name], p) for name, p in pipe.unet.named_parameters())


def test_fuse_lora_of_an_unfused_adapter_equals_the_fused_load():
    fused, unfused = make_pipe(1, fuse=True), make_pipe(1, fuse=False)
    unfused.fuse_lora()
    unfused.unload_lora_weights()
    fused_weights = dict(fused.unet.named_parameters())
    for name, parameter in unfused.unet.named_parameters():
        torch.testing.assert_close(parameter, fused_weights[name], atol=1e-6, rtol=1e-5, msg=name)
