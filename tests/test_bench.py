"""Smoke tests for the benchmarks: each runs on the tiny models with tiny sizes and produces its ratio table.

No timing is asserted (the figures live in BENCHMARKS.md); only that the scripts run end to end, report every
target, and that the measuring tools they rely on measure what they claim.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from bench import bench_app, bench_fast, bench_lowvram, bench_memory, bench_speed, common, lowvram, sdxl


def tiny_args(tiny_models_dir: Path, *extra: str) -> list[str]:
    return ["--models", "tiny", "--dir", str(tiny_models_dir), "--size", "64", *extra]


# ------------------------------------------------------------------------------------------- real-size configs


def test_real_sdxl_configs_have_the_published_sizes() -> None:
    parts = sdxl.meta_components()
    for name, count in sdxl.SDXL_PARAMETER_COUNTS.items():
        assert sdxl.count_parameters(parts[name]) == count
    from photomaker.testing import attention_lora_targets

    targets = attention_lora_targets(parts["unet"])
    assert len(targets) == sdxl.SDXL_TRANSFORMER_BLOCKS * 2 * 4
    lora = sdxl.photomaker_lora_state_dict(parts["unet"], rank=2)  # rank 2: cheap, same keys and layout
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in lora
    assert lora["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight"].shape == (
        640,
        2,
    )


def test_fast_loras_load_in_their_key_formats(tiny_models_dir: Path) -> None:
    from safetensors.torch import load_file

    from photomaker import presets
    from photomaker.pipeline import PhotoMakerStableDiffusionXLPipeline

    folder = tiny_models_dir / "fast-loras"  # written by make_tiny, as the real-size ones by make_real_size

    lightning = load_file(str(folder / presets.FAST_PRESETS["lightning-8"].weight_name))
    assert all(key.startswith("lora_unet_") for key in lightning)
    lcm = load_file(str(folder / presets.FAST_PRESETS["lcm-4"].weight_name))
    assert all(key.startswith("unet.") and ".lora_" in key for key in lcm)
    pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(tiny_models_dir / "base")
    pipe.load_photomaker_adapter(tiny_models_dir / "photomaker-v1.bin")
    for key in ("lightning-8", "lcm-4"):
        before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        state = presets.apply_fast_preset(pipe, presets.FAST_PRESETS[key].with_weights(folder))
        changed = [
            k
            for k, v in pipe.unet.state_dict().items()
            if "lora" not in k
            and k.replace(".base_layer", "") in before
            and not torch.equal(v, before[k.replace(".base_layer", "")])
        ]
        assert any("ff.net" in k for k in changed) and any("attn2.to_k" in k for k in changed)
        presets.restore_standard_mode(pipe, state)


# ------------------------------------------------------------------------------------------- speed


def test_bench_speed_per_image_table(tiny_models_dir: Path) -> None:
    result = bench_speed.main(
        tiny_args(
            tiny_models_dir,
            "--steps",
            "2",
            "--repeats",
            "1",
            "--stage-repeats",
            "2",
            "--warmup",
            "0",
            "--num-photos",
            "1",
            "--parts",
            "per-image",
        )
    )
    per_image = result["per_image"]
    assert set(per_image["ratio_50_steps"]) == {"first_call", "reuse"}
    assert per_image["id_encoder_bytes"] > 0 and len(per_image["pre_unet_s"]["plain"]) == 2
    assert "(a) first call, new photos" in result["report"] and "(b) same photos again" in result["report"]
    assert "ID encoder alone" in result["report"]


@pytest.mark.parametrize("which", ["plain", "photomaker", "photomaker-cached"])
def test_bench_speed_cold_child(tiny_models_dir: Path, tmp_path: Path, capsys, which: str) -> None:
    parser_args = argparse.Namespace(
        models="tiny", dir=str(tiny_models_dir), dtype=None, cold_child=which, fused_cache=str(tmp_path / "fused")
    )
    bench_speed.cold_child(parser_args)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("COLD ")][-1]
    record = json.loads(line[5:])
    assert record["load_s"] > 0 and record["ready_s"] >= record["load_s"]
    if which != "plain":
        assert "fuse LoRA (or map cached fused weights)" in record["phases"]
    if which == "photomaker-cached":
        assert list((tmp_path / "fused").glob("*.safetensors"))


def test_until_unet_stops_before_denoising(tiny_models_dir: Path) -> None:
    models = common.prepare_models("tiny", tiny_models_dir)
    pipe = common.load_plain(models)
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    seconds = common.until_unet(lambda seed: pipe("a man", num_inference_steps=2, height=64, width=64), pipe.unet, 0)
    assert seconds > 0 and calls == []  # stopped before the UNet ran; the hook is gone afterwards
    pipe("a man", num_inference_steps=1, height=64, width=64)
    assert calls == [1]  # one step with classifier-free guidance: one batched UNet call


# ------------------------------------------------------------------------------------------- memory


def test_bench_memory_children_and_table(tiny_models_dir: Path, capsys) -> None:
    runs = {}
    for which in ("plain", "photomaker"):
        namespace = argparse.Namespace(
            models="tiny",
            dir=str(tiny_models_dir),
            dtype=None,
            child=which,
            device="cpu",
            steps=1,
            size=64,
            num_photos=1,
            lazy=False,
        )
        bench_memory.child(namespace)
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("MEM ")][-1]
        runs[which] = [json.loads(line[4:])]
    assert {"imports", "load base", "generate"} <= set(runs["plain"][0]["phases"])
    assert "adapter + fuse" in runs["photomaker"][0]["phases"]
    assert runs["photomaker"][0]["rss_peak"] > 0
    settings = argparse.Namespace(models="tiny", device="cpu", size=64, steps=1, num_photos=1, repeats=1, lazy=False)
    result = {
        "machine": common.machine_info(),
        "dtype": "float32",
        "command": "test",
        "memory": bench_memory.summarise(settings, runs),
    }
    table = bench_memory.report(settings, result)
    assert "peak RSS, whole process" in table and "target (+ ID encoder)" in table


def test_peak_meter_sees_a_phase_peak() -> None:
    meter = bench_memory.PeakMeter("cpu")
    meter.end_phase("before")
    block = torch.ones(64 * 1024 * 1024, dtype=torch.uint8)  # 64 MiB, touched
    del block
    meter.end_phase("allocation")
    phases = meter.summary()["phases"]
    if meter.summary()["per_phase_reset"]:
        assert phases["allocation"]["rss_peak"] - phases["allocation"]["rss_after"] >= 60 * 1024 * 1024


# ------------------------------------------------------------------------------------------- fast mode


def test_bench_fast_table(tiny_models_dir: Path) -> None:
    result = bench_fast.main(
        tiny_args(
            tiny_models_dir,
            "--steps",
            "6",
            "--measure-steps",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--presets",
            "lcm-4,lightning-8",
        )
    )
    presets_run = result["fast"]["presets"]
    assert set(presets_run) == {"lcm-4", "lightning-8"}
    assert all(v["speedup"] > 0 and not v["cfg"] for v in presets_run.values())
    assert "speed-up" in result["report"] and ">= 6" in result["report"]


# ------------------------------------------------------------------------------------------- app level


def test_bench_app_times_whole_requests_against_plain_sdxl(tiny_models_dir: Path, tmp_path: Path) -> None:
    from photomaker.metadata import read_parameters

    out = tmp_path / "pngs"
    args = ["--steps", "2", "--repeats", "2", "--warmup", "0", "--out", str(out)]
    result = bench_app.main(tiny_args(tiny_models_dir, *args))
    app = result["app"]
    assert {variant: len(times) for variant, times in app["times_s"].items()} == {
        "plain": 2,
        "new_photos": 2,
        "same_photos": 2,
    }
    assert app["ratios"]["plain"] == 1.0 and app["ratios"]["new_photos"] > 0
    assert "plain SDXL call (baseline)" in result["report"] and "ratio (paired)" in result["report"]
    # Every timed request wrote its PNG with the request's seed: 1 priming + 2 repeats x 2 request variants.
    written = sorted(out.glob("*.png"))
    assert len(written) == 5
    assert {read_parameters(path)["seed"] for path in written} == {0, 1000, 1001}


# ------------------------------------------------------------------------------------------- low VRAM


def test_live_tensor_meter_counts_what_is_alive() -> None:
    with torch.no_grad(), bench_lowvram.LiveTensorBytes() as meter:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = torch.empty(500, device="meta")  # 2000 bytes, both alive: peak 6000
        del a
        c = torch.empty(100, device="meta")  # after a was freed: 2400 live
        view = b[:10]  # a view: no new bytes
        del b, c, view
    assert meter.peak == 6000 and meter.live == 0


def test_bench_lowvram_report_and_tiny_hook_trace() -> None:
    result = bench_lowvram.main(["--verify-tiny", "--size", "256"])
    computed = result["computed"]
    assert computed["largest_resident_weights"]["component"] == "unet"
    assert computed["component_bytes"]["unet"] == 2 * sdxl.SDXL_PARAMETER_COUNTS["unet"]
    trace = result["verify_tiny"]
    assert all(trace["hooked"].values()) and trace["hooked"]["id_encoder"]
    assert trace["ran_while_offloaded"] == [] and trace["id_encoder_ran_on_device"]
    assert trace["unet_alone"] and trace["vae_alone"] and trace["ok"]
    assert "Offload hooks on the tiny pipeline" in result["report"]


def test_offload_residency_is_the_largest_component() -> None:
    residency = lowvram.offload_residency({"a": 3, "unet": 10, "vae": 2})
    assert (residency.peak_stage, residency.peak_bytes, residency.all_resident_bytes) == ("unet", 10, 15)


# ------------------------------------------------------------------------------------------- fused-weight cache


def test_fused_weight_cache_round_trip(tiny_models_dir: Path, tmp_path: Path, caplog) -> None:
    """What the cached cold start relies on: the same weights as loading, and no match for other base weights."""
    from photomaker.pipeline import PhotoMakerStableDiffusionXLPipeline

    def load(cache: Path | None, tweak: bool = False):
        pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(tiny_models_dir / "base")
        if tweak:  # the same files, but weights changed in memory before the adapter (e.g. another LoRA fused)
            with torch.no_grad():
                pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.add_(1.0)
        pipe.load_photomaker_adapter(
            tiny_models_dir / "photomaker-v1.bin", fused_cache_dir=None if cache is None else str(cache)
        )
        state = dict(pipe.unet.state_dict())
        state.update({f"id_encoder.{k}": v for k, v in pipe.id_encoder.state_dict().items()})
        return state

    cache = tmp_path / "fused"
    reference = load(None)
    first = load(cache)  # miss: fuses, then saves
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    with caplog.at_level("INFO", logger="photomaker.loading"):
        second = load(cache)  # hit: maps the saved weights
    assert "mapped from" in caplog.text
    for state in (first, second):
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    # The same files but other weights in memory: the cache must not be used (the fingerprint differs).
    tweaked_reference = load(None, tweak=True)
    tweaked = load(cache, tweak=True)
    assert all(torch.equal(tweaked[k], tweaked_reference[k]) for k in tweaked_reference)
    assert not all(torch.equal(tweaked[k], reference[k]) for k in reference)

    files[0].write_bytes(b"not a safetensors file")
    assert all(torch.equal(v, reference[k]) for k, v in load(cache).items())  # damaged: fused again
