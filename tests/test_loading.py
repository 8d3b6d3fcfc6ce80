"""Checkpoint loading: every accepted form, refusal of wrong and unsafe files, encoder building, LoRA check."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from photomaker.errors import CheckpointError
from photomaker.loading import (
    build_id_encoder,
    check_lora_applied,
    detect_version,
    load_checkpoint,
    parse_pm_version,
)
from photomaker.testing import tiny_checkpoint, tiny_sdxl_components


@pytest.fixture(scope="module")
def checkpoints() -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    return {version: tiny_checkpoint(version) for version in (1, 2)}


def _assert_same(loaded: dict, original: dict) -> None:
    assert list(loaded) == ["id_encoder", "lora_weights"]
    for part, tensors in original.items():
        assert loaded[part].keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[part][name].dtype == tensor.dtype
            assert torch.equal(loaded[part][name], tensor), name


def test_official_pickle_round_trip(tmp_path: Path, checkpoints) -> None:
    path = tmp_path / "photomaker-v2.bin"
    torch.save(checkpoints[2], path)
    _assert_same(load_checkpoint(path), checkpoints[2])
    _assert_same(load_checkpoint(str(path)), checkpoints[2])


def test_flat_safetensors_round_trip(tmp_path: Path, checkpoints) -> None:
    flat = {f"{part}.{name}": t for part, tensors in checkpoints[1].items() for name, t in tensors.items()}
    path = tmp_path / "photomaker.safetensors"
    save_file(flat, str(path))
    _assert_same(load_checkpoint(path), checkpoints[1])


def test_nested_and_flat_dicts_are_accepted_without_aliasing(checkpoints) -> None:
    nested = {part: dict(tensors) for part, tensors in checkpoints[1].items()}
    loaded = load_checkpoint(nested)
    _assert_same(loaded, checkpoints[1])
    loaded["id_encoder"].clear()
    assert nested["id_encoder"], "the caller's dict must not be emptied through the result"
    flat = {f"{part}.{name}": t for part, tensors in checkpoints[1].items() for name, t in tensors.items()}
    _assert_same(load_checkpoint(flat), checkpoints[1])


def test_folder_needs_weight_name_and_honours_subfolder(tmp_path: Path, checkpoints) -> None:
    (tmp_path / "weights").mkdir()
    torch.save(checkpoints[1], tmp_path / "weights" / "photomaker-v1.bin")
    _assert_same(
        load_checkpoint(tmp_path, weight_name="photomaker-v1.bin", subfolder="weights"),
        checkpoints[1],
    )
    with pytest.raises(CheckpointError, match=r"weight_name.*'photomaker-v1.bin'"):
        load_checkpoint(tmp_path / "weights")
    with pytest.raises(CheckpointError, match="No file 'other.bin'"):
        load_checkpoint(tmp_path, weight_name="other.bin", subfolder="weights")


def test_missing_file_and_unreachable_hub_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.bin")
    with pytest.raises(CheckpointError, match="weight_name='photomaker-v1.bin'"):
        load_checkpoint("TencentARC/PhotoMaker")
    # conftest sets HF_HUB_OFFLINE=1: only the (empty) cache is searched, and the error says so.
    with pytest.raises(
        CheckpointError,
        match=r"'photomaker-v1.bin' from Hub repo 'TencentARC/PhotoMaker'.*[Oo]ffline",
    ):
        load_checkpoint("TencentARC/PhotoMaker", weight_name="photomaker-v1.bin", cache_dir=tmp_path)
    with pytest.raises(TypeError, match="bogus"):
        load_checkpoint("TencentARC/PhotoMaker", weight_name="photomaker-v1.bin", bogus=1)


def test_wrong_layout_names_missing_and_unexpected_parts(tmp_path: Path, checkpoints) -> None:
    path = tmp_path / "wrong.bin"
    torch.save({"id_encoder": checkpoints[1]["id_encoder"], "lora": {}}, path)
    with pytest.raises(CheckpointError, match=r"missing 'lora_weights'; unexpected 'lora'"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"unexpected 'unet.x'"):
        load_checkpoint({"id_encoder.a": torch.zeros(1), "unet.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not tensors: 'a'"):
        load_checkpoint({"id_encoder": {"a": "text"}, "lora_weights": {}})


class _Payload:
    """Unpickling this calls open(marker, 'w'): a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_execution_is_refused_and_never_runs(tmp_path: Path, checkpoints) -> None:
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof))).close()  # an unsafe loader really would run it
    assert proof.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save(
        {
            "id_encoder": {"x": _Payload(marker)},
            "lora_weights": checkpoints[1]["lora_weights"],
        },
        path,
    )
    with pytest.raises(CheckpointError, match="Refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_file_is_reported_as_unreadable(tmp_path: Path, checkpoints) -> None:
    path = tmp_path / "photomaker-v1.bin"
    torch.save(checkpoints[1], path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read as a torch checkpoint"):
        load_checkpoint(path)


def test_version_detection_and_strict_build(checkpoints) -> None:
    for version in (1, 2):
        sd = checkpoints[version]["id_encoder"]
        assert detect_version(sd) == version
        encoder = build_id_encoder(sd)
        assert (encoder.version, encoder.tokens_per_image) == (version, version)
        loaded = encoder.state_dict()
        assert loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)
        positions = encoder.vision_model.embeddings.position_ids
        assert torch.equal(positions, torch.arange(positions.shape[1]).unsqueeze(0))
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.isfinite(
            build_id_encoder(checkpoints[2]["id_encoder"]).encode_images(pixels, torch.randn(1, 512))
        ).all()


def test_requested_version_must_match_the_weights(checkpoints) -> None:
    with pytest.raises(CheckpointError, match=r"v2 was requested.*v1 file"):
        build_id_encoder(checkpoints[1]["id_encoder"], version=2)
    with pytest.raises(CheckpointError, match=r"v1 was requested.*v2 file"):
        build_id_encoder(checkpoints[2]["id_encoder"], version=1)


def test_wrong_keys_are_listed_by_name(checkpoints) -> None:
    sd = dict(checkpoints[1]["id_encoder"])
    del sd["fuse_module.mlp2.fc1.bias"]
    sd["fuse_module.extra.weight"] = torch.zeros(1)
    sd["fuse_module.mlp1.fc2.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as info:
        build_id_encoder(sd)
    message = str(info.value)
    assert "missing keys (1): 'fuse_module.mlp2.fc1.bias'" in message
    assert "unexpected keys (1): 'fuse_module.extra.weight'" in message
    assert "shape mismatches (1): 'fuse_module.mlp1.fc2.weight (5, 5) (expected (128, 128))'" in message


def test_unrelated_state_dict_is_compared_with_the_official_layout() -> None:
    with pytest.raises(
        CheckpointError,
        match=r"(?s)missing keys \(\d+\): 'vision_model.*unexpected keys \(1\): 'foo'",
    ):
        build_id_encoder({"foo": torch.zeros(1)})


@pytest.fixture
def pipe():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**tiny_sdxl_components(), add_watermarker=False)


def test_lora_check_passes_after_loading(pipe, checkpoints) -> None:
    lora = checkpoints[1]["lora_weights"]
    pipe.load_lora_weights(dict(lora), adapter_name="photomaker")
    assert check_lora_applied(pipe.unet, lora, "photomaker") == len(lora)
    with pytest.raises(CheckpointError, match="no LoRA adapter 'other'"):
        check_lora_applied(pipe.unet, lora, "other")


def test_lora_check_reports_keys_that_did_not_land(pipe, checkpoints) -> None:
    lora = dict(checkpoints[1]["lora_weights"])
    keys = list(lora)
    renamed = keys[0].replace("attn1", "attn7")
    lora[renamed] = lora.pop(keys[0])
    unprefixed = keys[5].removeprefix("unet.")
    lora[unprefixed] = lora.pop(keys[5])
    pipe.load_lora_weights(dict(lora), adapter_name="photomaker")

    with pytest.raises(CheckpointError) as info:
        check_lora_applied(pipe.unet, lora, "photomaker")
    message = str(info.value)
    assert f"{renamed}: the UNet has no module" in message
    assert f"{unprefixed}: no 'unet.' prefix" in message
    # The layers those keys were meant for were created by peft but never filled.
    assert "attn1.to_q' has adapter 'photomaker' but the LoRA has no lora_A tensor" in message


def test_lora_check_reports_a_tensor_that_differs(pipe, checkpoints) -> None:
    lora = checkpoints[1]["lora_weights"]
    pipe.load_lora_weights(dict(lora), adapter_name="photomaker")
    corrupted = dict(lora)
    key = next(k for k in lora if k.endswith("to_out_lora.up.weight"))
    corrupted[key] = lora[key] + 1
    with pytest.raises(CheckpointError, match=rf"{key}: values differ .*to_out\.0"):
        check_lora_applied(pipe.unet, corrupted, "photomaker")


@pytest.mark.parametrize("failure", ["partial_is_a_folder", "save_file_raises"])
def test_a_failing_cache_save_never_fails_the_load(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch, caplog, failure: str
) -> None:
    """The cache is written after the UNet was fused: an error there must leave a loaded, working pipeline."""
    import os

    import safetensors.torch

    from photomaker.loading import PreparedAdapterCache
    from photomaker.pipeline import PhotoMakerStableDiffusionXLPipeline

    def base() -> PhotoMakerStableDiffusionXLPipeline:
        pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(tiny_models_dir / "base")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    adapter = tiny_models_dir / "photomaker-v1.bin"
    reference = base()
    reference.load_photomaker_adapter(adapter)

    pipe = base()
    cache_dir = tmp_path / "fused"
    path = PreparedAdapterCache(cache_dir, pipe.unet, adapter).path
    assert path is not None
    if failure == "partial_is_a_folder":  # safetensors raises its own SafetensorError, not an OSError
        (path.parent / f"{path.name}.{os.getpid()}.partial").mkdir(parents=True)
    else:

        def refuse(*args, **kwargs):
            raise RuntimeError("no space for you")

        monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    with caplog.at_level("WARNING", logger="photomaker.loading"):
        pipe.load_photomaker_adapter(adapter, fused_cache_dir=str(cache_dir))
    assert "Could not save the prepared-adapter cache" in caplog.text
    assert not path.exists()
    assert pipe.id_encoder is not None
    expected = reference.unet.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in pipe.unet.state_dict().items())  # fused once
    image = pipe(
        "a photo of a man img",
        input_id_images=[torch.rand(3, 64, 64)],
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)


def test_a_hub_checkpoint_is_fetched_before_the_prepared_adapter_cache_looks_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolving a Hub id downloads the file into the Hub cache (the first start can fill the adapter cache);
    a file that cannot be had resolves to None, and load_checkpoint then reports why."""
    import huggingface_hub

    from photomaker.loading import resolve_checkpoint_file

    fetched = tmp_path / "photomaker-v1.bin"
    fetched.write_bytes(b"weights")
    calls = []

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        calls.append((repo_id, filename, subfolder))
        if repo_id != "TencentARC/PhotoMaker":
            raise OSError("404: no such repo")
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_checkpoint_file("TencentARC/PhotoMaker", "photomaker-v1.bin") == fetched
    assert resolve_checkpoint_file("nobody/nothing", "photomaker-v1.bin") is None
    assert calls == [
        ("TencentARC/PhotoMaker", "photomaker-v1.bin", None),
        ("nobody/nothing", "photomaker-v1.bin", None),
    ]


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [(None, None), (1, 1), (2, 2), ("1", 1), ("2", 2), ("v1", 1), ("v2", 2), ("V2", 2), (" v1 ", 1), ("auto", None)],
)
def test_pm_version_accepts_the_reference_spelling(spelling, expected) -> None:
    assert parse_pm_version(spelling) == expected


@pytest.mark.parametrize("spelling", [3, 0, True, 1.0, "v3", "version 2", "", "2.0"])
def test_pm_version_refuses_anything_else_and_says_what_is_accepted(spelling) -> None:
    with pytest.raises(CheckpointError, match=r"must be 1, 2, 'v1', 'v2' or None .*got " + re.escape(repr(spelling))):
        parse_pm_version(spelling)


def test_build_id_encoder_takes_the_reference_version_spelling(checkpoints) -> None:
    assert build_id_encoder(checkpoints[2]["id_encoder"], version="v2").version == 2
    with pytest.raises(CheckpointError, match=r"v1 was requested.*v2 file"):
        build_id_encoder(checkpoints[2]["id_encoder"], version="v1")
