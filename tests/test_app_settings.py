"""app.py's own settings, without a server: flags and their environment variables, the --help text and README
table that document them, and the GPU time reserved on ZeroGPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import app
from photomaker import presets
from photomaker.service import ENV_VARIABLES, GenerationRequest

README = Path(__file__).resolve().parent.parent / "README.md"
SERVER_VARIABLES = (
    "GRADIO_SERVER_NAME",
    "GRADIO_SERVER_PORT",
    "PHOTOMAKER_SHARE",
    "PHOTOMAKER_MAX_QUEUE",
    "PHOTOMAKER_CONCURRENCY",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*SERVER_VARIABLES, *ENV_VARIABLES):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GRADIO_SERVER_PORT", "80a"),
        ("GRADIO_SERVER_PORT", "70000"),
        ("PHOTOMAKER_MAX_QUEUE", "twenty"),
        ("PHOTOMAKER_MAX_QUEUE", "0"),
        ("PHOTOMAKER_CONCURRENCY", "1.5"),
        ("PHOTOMAKER_SHARE", "maybe"),
    ],
)
def test_bad_server_variable_stops_with_a_message_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        app.parse_args([])
    assert stopped.value.code == 2
    assert f"{name}={value!r} is not valid" in capsys.readouterr().err


def test_server_variables_and_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.max_queue, args.concurrency) == ("127.0.0.1", 7860, False, 20, 1)
    for value, share in (("on", True), ("YES", True), ("1", True), ("off", False), ("0", False)):
        monkeypatch.setenv("PHOTOMAKER_SHARE", value)
        assert app.parse_args([]).share is share
    monkeypatch.setenv("PHOTOMAKER_MAX_QUEUE", "5")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "8080")
    args = app.parse_args(["--max-queue", "7"])
    assert (args.max_queue, args.port) == (7, 8080)  # the flag wins over its variable
    with pytest.raises(SystemExit):
        app.parse_args(["--concurrency", "0"])
    assert "argument --concurrency: use a whole number of at least 1" in capsys.readouterr().err


def test_help_names_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    """README: "`python app.py --help` lists them all"."""
    with pytest.raises(SystemExit):
        app.parse_args(["--help"])
    text = capsys.readouterr().out
    missing = [name for name in (*ENV_VARIABLES, *SERVER_VARIABLES) if name not in text]
    assert not missing, f"python app.py --help does not mention {missing}"


def test_readme_configuration_table_names_every_variable() -> None:
    section = README.read_text(encoding="utf-8").split("## Configuration", 1)[1].split("\n## ", 1)[0]
    in_table = set(re.findall(r"^\|.*?\| `([A-Z_]+)", section, re.MULTILINE))
    missing = [name for name in (*ENV_VARIABLES, *SERVER_VARIABLES) if name not in in_table]
    assert not missing, f"README's configuration table lacks {missing}"


def test_gpu_seconds_grows_with_steps_images_and_pixels() -> None:
    base = presets.gpu_seconds(50, 1, 1024, 1024)
    assert presets.gpu_seconds(100, 1, 1024, 1024) > base
    assert presets.gpu_seconds(50, 2, 1024, 1024) > base
    assert presets.gpu_seconds(50, 1, 1024, 1024, best_of=3) > base
    assert presets.gpu_seconds(50, 1, 2048, 2048) > base
    assert base == int(presets.GPU_BASE_SECONDS + presets.GPU_SECONDS_PER_STEP_MEGAPIXEL * 50 * 1024 * 1024 / 1e6)
    # Before validation: odd values are bounded, never raise.
    for odd in ((None, "x", None, 1024), (float("nan"), -3, 10**9, 10**9), (10**6, 10**6, 1, 1)):
        assert (
            presets.GPU_BASE_SECONDS <= presets.gpu_seconds(*odd) <= presets.gpu_seconds(100, 4, 2048, 2048, best_of=4)
        )


@pytest.mark.parametrize("preset", list(presets.FAST_PRESETS))
def test_gpu_seconds_in_fast_mode_counts_the_preset_steps(preset: str) -> None:
    steps = presets.FAST_PRESETS[preset].steps
    assert presets.gpu_seconds(50, 2, 1024, 1024, fast=preset) == presets.gpu_seconds(steps, 2, 1024, 1024)
    label = presets.FAST_PRESETS[preset].label
    assert presets.gpu_seconds(80, 2, 1024, 1024, fast=label) == presets.gpu_seconds(steps, 2, 1024, 1024)
    # An unknown preset is refused by validation later; meanwhile the steps given are reserved.
    assert presets.gpu_seconds(50, 2, 1024, 1024, fast="turbo-1") == presets.gpu_seconds(50, 2, 1024, 1024)


def test_zerogpu_reservation_of_a_fast_request_is_for_the_preset_steps() -> None:
    """The app's slider still says 50 steps when fast mode is chosen; the reservation must be for 8."""
    request = GenerationRequest(
        id_images=[],
        prompt="a man img",
        num_steps=50,
        num_outputs=2,
        aspect_ratio="Instagram (1:1)",
        fast="lightning-8",
    )
    assert app.gpu_duration(request) == presets.gpu_seconds(8, 2, 1024, 1024)
    standard = GenerationRequest(
        id_images=[], prompt="a man img", num_steps=50, num_outputs=2, best_of=2, width=512, height=768
    )
    assert app.gpu_duration(standard) == presets.gpu_seconds(50, 2, 512, 768, best_of=2)


@pytest.mark.parametrize(("spelling", "version"), [("1", 1), ("v1", 1), ("v2", 2)])
def test_pm_version_flag_takes_the_reference_spelling(spelling: str, version: int) -> None:
    args = app.parse_args(["--pm-version", spelling, "--face-backend", "insightface"])
    assert app.service_config(args).pm_version == version


def test_app_and_cli_offer_the_same_model_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from photomaker.flags import MODEL_FLAGS

    with pytest.raises(SystemExit):
        app.parse_args(["--help"])
    text = capsys.readouterr().out
    assert [item.flag for item in MODEL_FLAGS if item.flag not in text] == []
