"""bench/bench_control.py on the tiny models: each mode timed against diffusers' plain pipeline of its kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bench_control, common


def test_bench_control_reports_paired_ratios_per_mode(tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "control.json"
    result = bench_control.main(
        [
            "--models",
            "tiny",
            "--dir",
            str(tiny_models_dir),
            "--steps",
            "2",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--modes",
            "controlnet",
            "inpaint",
            "--json",
            str(out),
        ]
    )
    assert set(result["modes"]) == {"controlnet", "inpaint"}
    for mode in result["modes"].values():
        for clock in (mode["wall"], mode["cpu"]):
            assert len(clock["plain_s"]) == len(clock["photomaker_s"]) == len(clock["paired_ratios"]) == 2
            assert all(seconds > 0 for seconds in clock["plain_s"] + clock["photomaker_s"])
        # One torch thread: a call's CPU time cannot exceed its wall time by more than timer granularity.
        assert all(c <= w + 0.05 for c, w in zip(mode["cpu"]["plain_s"], mode["wall"]["plain_s"], strict=True))
        extra = common.median(mode["cpu"]["extra_s"])
        assert mode["real_size_ratio"] == bench_control.real_size_ratio(extra)
    assert "| controlnet" in result["report"] and "<= 1.03x" in result["report"]
    assert "ratio (paired) [spread]" in result["report"] and "| CPU time" in result["report"]
    assert "Computed for a real-size call at 50 steps" in result["report"]
    assert json.loads(out.read_text())["modes"]["inpaint"]["cpu"] == result["modes"]["inpaint"]["cpu"]


def test_summary_pairs_the_calls_of_each_repeat() -> None:
    # Repeat 0's PhotoMaker call hit a burst of load; repeat 1 ran slow on both sides.
    summary = bench_control.summarise([1.0, 3.0, 1.1], [1.5, 3.06, 1.122])
    assert summary["paired_ratios"] == pytest.approx([1.5, 1.02, 1.02])
    assert summary["paired_ratio"] == pytest.approx(1.02)
    assert summary["ratio"] == pytest.approx(1.5 / 1.1)  # the ratio of medians takes the burst in
    assert summary["min_ratio"] == pytest.approx(1.122 / 1.0)
    assert summary["extra_s"] == pytest.approx([0.5, 0.06, 0.022])


def test_real_size_ratio_adds_the_extra_and_the_prompt_surgery_to_a_real_50_step_call() -> None:
    plain = (
        bench_control.REAL_BEFORE_UNET_S + 50 * bench_control.REAL_UNET_STEP_S + bench_control.REAL_AFTER_LAST_STEP_S
    )
    expected = (plain + 0.5 + bench_control.REAL_PROMPT_SURGERY_S) / plain
    assert bench_control.real_size_ratio(0.5) == pytest.approx(expected)
    # A negative extra is noise around no cost, not a saving to credit PhotoMaker with.
    assert bench_control.real_size_ratio(-0.3) == bench_control.real_size_ratio(0.0)
