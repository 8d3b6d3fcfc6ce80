"""bench/bench_control.py on the tiny models: each mode timed against diffusers' plain pipeline of its kind."""

from __future__ import annotations

import json
from pathlib import Path

from bench import bench_control


def test_bench_control_reports_a_ratio_per_mode(tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "control.json"
    result = bench_control.main([
        "--models", "tiny", "--dir", str(tiny_models_dir), "--steps", "2", "--repeats", "1",
        "--modes", "controlnet", "inpaint", "--json", str(out),
    ])
    assert set(result["modes"]) == {"controlnet", "inpaint"}
    for mode in result["modes"].values():
        assert len(mode["plain_s"]) == len(mode["photomaker_s"]) == 1
        assert mode["ratio"] > 0
    assert "| controlnet" in result["report"] and "<= 1.03x" in result["report"]
    assert json.loads(out.read_text())["modes"]["inpaint"]["ratio"] == result["modes"]["inpaint"]["ratio"]
