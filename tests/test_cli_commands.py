"""``python -m photomaker eval | prepare-data | train``: help, a tiny run of each through the main CLI, exit 2 on a
user's mistake, train's shared model flags, and validation scored by evaluation's code into metrics and TensorBoard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faces_fixtures import ASTRONAUT, GRACE_HOPPER
from PIL import Image, ImageOps
from train_fixtures import write_dataset

from photomaker.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine, more threads make the tiny models many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from photomaker.testing_eval import make_tiny_scorers

    return make_tiny_scorers(tmp_path_factory.mktemp("scorers"))


# ---------------------------------------------------------------------------------------------------------------
# Help and flags
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "own_flags"),
    [
        ("eval", ("--ids", "--prompts", "--clip-model", "--sweep")),
        ("prepare-data", ("src", "--min-face-size", "--class-word", "--mask-model")),
        ("train", ("--data", "--init", "--val-clip-model", "--report-to")),
    ],
)
def test_each_command_shows_its_help_through_python_m_photomaker(command: str, own_flags: tuple[str, ...]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "photomaker", command, "--help"],
        check=False,
        cwd=ROOT,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"usage: python -m photomaker {command}")
    for flag in own_flags:
        assert flag in run.stdout, flag
    if command != "prepare-data":  # eval and train load the model as generate does, with generate's flags
        for shared in ("--tiny DIR", "--base-model ID_OR_PATH", "[PHOTOMAKER_BASE_MODEL]", "--face-model-dir"):
            assert shared in run.stdout, shared


def test_train_reads_generate_s_model_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from photomaker.config import DEFAULT_BASE_MODEL
    from photomaker.errors import InvalidRequestError
    from photomaker.train.cli_args import config_from_args

    parser = build_parser()
    base = ["train", "--data", "D", "--out", "O"]
    monkeypatch.delenv("PHOTOMAKER_BASE_MODEL", raising=False)
    monkeypatch.delenv("PHOTOMAKER_VERSION", raising=False)
    monkeypatch.delenv("PHOTOMAKER_TINY_DIR", raising=False)
    plain = config_from_args(parser.parse_args(base))
    assert (plain.base_model, plain.tiny_dir, plain.pm_version) == (DEFAULT_BASE_MODEL, None, 1)
    assert plain.vision_model == "openai/clip-vit-large-patch14"

    given = config_from_args(
        parser.parse_args([*base, "--pm-version", "v2", "--base-model", "me/sdxl", "--face-model-dir", "faces"])
    )
    assert (given.base_model, given.pm_version, given.face_model_dir) == ("me/sdxl", 2, "faces")

    monkeypatch.setenv("PHOTOMAKER_BASE_MODEL", "env/sdxl")
    monkeypatch.setenv("PHOTOMAKER_VERSION", "2")
    from_env = config_from_args(parser.parse_args(base))
    assert (from_env.base_model, from_env.pm_version) == ("env/sdxl", 2)
    assert config_from_args(parser.parse_args([*base, "--base-model", "flag/sdxl"])).base_model == "flag/sdxl"

    monkeypatch.setenv("PHOTOMAKER_TINY_DIR", "tiny")
    tiny = config_from_args(parser.parse_args(base))
    assert (tiny.tiny_dir, tiny.vision_model) == ("tiny", None)  # tiny: random vision tower, nothing downloaded

    monkeypatch.setenv("PHOTOMAKER_VERSION", "two")
    with pytest.raises(InvalidRequestError, match="PHOTOMAKER_VERSION='two' is not valid: use 1, 2, v1 or v2"):
        config_from_args(parser.parse_args(base))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "{tmp}", "--out", "{tmp}/out", "--tiny", "{tmp}/tiny"], "No manifest"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/out", "--max-steps", "0"], "--max-steps must be at least 1"),
        (["prepare-data", "{tmp}/missing", "--out", "{tmp}/data"], "missing"),
        (["eval", "--ids", "{tmp}/missing", "--out", "{tmp}/out", "--tiny", "{tmp}/tiny"], "missing"),
    ],
)
def test_a_user_s_mistake_exits_2_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main([part.replace("{tmp}", str(tmp_path)) for part in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# Tiny runs through the main CLI
# ---------------------------------------------------------------------------------------------------------------


def test_prepare_data_keeps_the_example_portraits_and_drops_a_photo_without_a_face(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, data = tmp_path / "src", tmp_path / "data"
    for identity, photo in (("eileen", ASTRONAUT), ("grace", GRACE_HOPPER)):
        (src / identity).mkdir(parents=True)
        image = Image.open(photo).convert("RGB")
        image.save(src / identity / "a.png")
        ImageOps.mirror(image).save(src / identity / "b.png")
    Image.new("RGB", (256, 256), (128, 128, 128)).save(src / "grace" / "blank.png")
    (src / "grace" / "class.txt").write_text("woman")

    code = main(
        ["prepare-data", str(src), "--out", str(data), "--resolution", "256", "--min-face-size", "64", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "5 seen" in out and "4 kept" in out and "1 dropped" in out
    lines = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    assert sorted((line["identity"], Path(line["source"]).name) for line in lines) == [
        ("eileen", "a.png"),
        ("eileen", "b.png"),
        ("grace", "a.png"),
        ("grace", "b.png"),
    ]
    assert {line["identity"]: line["caption"] for line in lines} == {
        "eileen": "a photo of a person img",
        "grace": "a photo of a woman img",
    }
    for line in lines:
        assert (data / line["image"]).is_file() and (data / line["mask"]).is_file()
        assert max(Image.open(data / line["image"]).size) <= 512
    dropped = [json.loads(line) for line in (data / "report.jsonl").read_text().splitlines()]
    assert [(Path(row["source"]).name, row["stage"]) for row in dropped] == [("blank.png", "detect")]


def test_eval_runs_on_the_tiny_models_and_prints_the_summary(
    tmp_path: Path, tiny_models_dir: Path, scorer_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ids" / "eileen").mkdir(parents=True)
    (tmp_path / "ids" / "eileen" / "photo.png").write_bytes(ASTRONAUT.read_bytes())
    (tmp_path / "prompts.txt").write_text("a photo of a {class} img in a garden\n")
    out = tmp_path / "out"

    code = main(
        [
            "eval",
            "--ids",
            str(tmp_path / "ids"),
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--out",
            str(out),
            "--tiny",
            str(tiny_models_dir),
            "--face-backend",
            "none",
            "--metric-face-backend",
            "none",
            "--images-per-prompt",
            "1",
            "--num-references",
            "1",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--clip-model",
            str(scorer_dirs["clip"]),
            "--dino-model",
            str(scorer_dirs["dino"]),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    (setting,) = summary
    assert summary[setting]["n"] == 1
    for metric in ("clip_t", "clip_i", "dino"):
        assert isinstance(summary[setting][metric], float), metric
    assert summary[setting]["face_sim"] is None  # no face backend asked for
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and Image.open(out / rows[0]["path"]).size == (64, 64)
    assert json.loads((out / "summary.json").read_text())[setting]["clip_t"] == pytest.approx(
        summary[setting]["clip_t"]
    )


def _scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in OUT's TensorBoard event files, by tag: [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in out.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return found


def test_train_runs_two_steps_validates_with_evaluation_s_scores_and_writes_tensorboard(
    tmp_path: Path, tiny_models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from photomaker.evaluation import Scorers, score_images
    from photomaker.train.validation import TINY_SCORERS_DIR

    data = write_dataset(tmp_path / "data", {"alice": 3, "carol": 2})
    out = tmp_path / "out"
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--tiny",
            str(tiny_models_dir),
            "--device",
            "cpu",
            "--lora-rank",
            "4",
            "--max-steps",
            "2",
            "--lr-warmup-steps",
            "0",
            "--checkpoint-every",
            "100",
            "--validate-every",
            "2",
            "--val-identities",
            "carol",
            "--val-steps",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == str(out / "photomaker.bin")
    assert (out / "photomaker.bin").is_file()

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line.get("kind")) for line in lines] == [(1, None), (2, None), (2, "validation")]
    validation = lines[2]
    metrics = validation["metrics"]
    assert metrics["n"] == 1
    assert metrics["face_sim"] is None and metrics["no_face_rate"] == 1.0  # dlib sees no face in tiny noise
    assert validation["scores"] == {"carol": None}

    # The numbers are evaluation's: the same scorers on the saved image and carol's photos give them again.
    scorers = Scorers.load(
        str(tiny_models_dir / TINY_SCORERS_DIR / "clip"),
        str(tiny_models_dir / TINY_SCORERS_DIR / "dino"),
        face_backend=None,
        device="cpu",
    )
    grid = Image.open(out / validation["grid"]).convert("RGB")
    generated = grid.crop((64, 0, 128, 64))
    references = [Image.open(data / "images" / "carol" / name).convert("RGB") for name in ("000.png", "001.png")]
    (row,) = score_images([generated], ["a photo of a man img"], references, scorers)
    for metric in ("clip_t", "clip_i", "dino"):
        assert metrics[metric] == pytest.approx(row[metric], abs=1e-4), metric

    scalars = _scalars(out)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    assert scalars["train/loss"][0][1] == pytest.approx(lines[0]["loss"], rel=1e-5)
    for metric in ("clip_t", "clip_i", "dino", "no_face_rate"):
        assert scalars[f"val/{metric}"] == [(2, pytest.approx(metrics[metric], rel=1e-5))], metric
    assert "val/face_sim" not in scalars  # None: not logged as a number


def test_accelerate_launch_runs_train_through_python_m_photomaker(tmp_path: Path, tiny_models_dir: Path) -> None:
    data = write_dataset(tmp_path / "data", {"alice": 2, "bob": 2})
    out = tmp_path / "out"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "photomaker",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--tiny",
        str(tiny_models_dir),
        "--device",
        "cpu",
        "--lora-rank",
        "4",
        "--max-steps",
        "1",
        "--lr-warmup-steps",
        "0",
        "--report-to",
        "none",
    ]
    run = subprocess.run(launch, check=False, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == str(out / "photomaker.bin")
    assert set(torch.load(out / "photomaker.bin", weights_only=True)) == {"id_encoder", "lora_weights"}


def test_validation_scorers_without_clip_or_dino_give_face_scores_only() -> None:
    """Outside --tiny, validation scores faces alone unless --val-clip-model / --val-dino-model are given."""
    from types import SimpleNamespace

    from photomaker.evaluation import score_images, summarise
    from photomaker.train.validation import load_validation_scorers

    config = SimpleNamespace(
        val_clip_model=None,
        val_dino_model=None,
        tiny_dir=None,
        val_face_backend="dlib",
        face_model_dir=None,
        trigger_word="img",
        pm_version=1,
    )
    scorers = load_validation_scorers(config, "cpu")
    assert scorers.clip_model is None and scorers.dino_model is None
    astronaut = Image.open(ASTRONAUT).convert("RGB")
    rows = score_images(
        [ImageOps.mirror(astronaut), Image.open(GRACE_HOPPER).convert("RGB")],
        ["a photo of a woman img"] * 2,
        [astronaut],
        scorers,
    )
    assert [(row["clip_t"], row["clip_i"], row["dino"]) for row in rows] == [(None, None, None)] * 2
    assert rows[0]["face_sim"] > rows[1]["face_sim"]  # the same person scores higher than another one
    summary = summarise(rows)
    assert summary["clip_t"] is None and summary["dino"] is None and summary["no_face_rate"] == 0.0
