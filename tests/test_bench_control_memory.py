"""bench/bench_control_memory.py: control models' weight bytes from their real configurations, on ``meta``."""

from __future__ import annotations

import json
from pathlib import Path

from bench import bench_control_memory, sdxl


def _ip_adapter_parameters_by_hand() -> int:
    """ip-adapter_sdxl.bin's shapes: a 1280 -> 4 x 2048 projection with its LayerNorm, and two bias-free
    2048 -> inner projections (image keys and values) beside every cross-attention of the UNet."""
    unet = sdxl.build_unet()
    cross = unet.config.cross_attention_dim
    attention = sum(
        2 * cross * module.to_q.out_features for name, module in unet.named_modules() if name.endswith("attn2")
    )
    return 1280 * 4 * cross + 4 * cross + 2 * cross + attention


def test_ip_adapter_and_sketch_adapter_sizes(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    result = bench_control_memory.main(["--models", "ip_adapter", "t2i_adapter", "--json", str(out)])
    sizes = {m["key"]: m for m in result["control_models"]}

    assert list(sizes) == ["t2i_adapter", "ip_adapter"]  # CONTROL_MODELS order, only those asked for
    assert sizes["ip_adapter"]["parameters"] == _ip_adapter_parameters_by_hand()
    for size in sizes.values():
        elements = size["parameters"] + size["buffer_elements"]
        assert size["float16_bytes"] == 2 * elements and size["float32_bytes"] == 4 * elements
    # The published fp16 file of TencentARC/t2i-adapter-sketch-sdxl-1.0 is 158 MB.
    assert 150e6 < sizes["t2i_adapter"]["float16_bytes"] < 165e6
    assert "| sketch T2I-Adapter" in result["report"] and "Computed, not measured" in result["report"]
    assert json.loads(out.read_text())["control_models"] == result["control_models"]
