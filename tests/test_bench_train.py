"""Smoke test of bench/bench_train.py on the tiny models: both steps run, train what they should, and report."""

from __future__ import annotations

import json

import torch

from bench import bench_train


def test_bench_train_reports_time_and_memory_ratios_of_photomaker_against_plain_lora(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        result = bench_train.main(
            ["--warmup", "0", "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "train.json")]
        )
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(True)
    trained = result["trained_parameters"]
    # PhotoMaker trains the same LoRA plus the ID encoder's heads and last vision layers.
    assert trained["photomaker"] > trained["plain"] > 0
    assert result["time_ratio"] == result["seconds_per_step"]["photomaker"] / result["seconds_per_step"]["plain"]
    assert result["memory_ratio"] > 0 and all(value > 0 for value in result["peak_rss"].values())
    assert "ratio PhotoMaker / plain" in capsys.readouterr().out
    assert json.loads((tmp_path / "train.json").read_text())["dtype"] == "float32"
