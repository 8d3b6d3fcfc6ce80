"""`python -m photomaker generate / score / make-tiny`: what a user sees on the terminal and on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from photomaker.cli import main
from photomaker.metadata import read_parameters

ROOT = Path(__file__).resolve().parent.parent
ASTRONAUT = ROOT / "examples" / "astronaut.png"
GRACE_HOPPER = ROOT / "examples" / "grace_hopper.jpg"


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI sets these only when unset; setting them here keeps its choice from leaking into other tests."""
    for name, value in (
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
    ):
        monkeypatch.setenv(name, value)


def test_generate_writes_pngs_that_carry_their_parameters(
    tiny_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    status = main(
        [
            "generate",
            "--tiny",
            str(tiny_models_dir),
            "--face-backend",
            "none",
            "--id-image",
            str(ASTRONAUT),
            "--prompt",
            "a photo of a woman",
            "--style",
            "(No style)",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            "7",
            "--num-outputs",
            "2",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()

    assert status == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[-1] == "seed: 7"
    paths = [Path(line) for line in lines[:-1]]
    assert sorted(path.name for path in paths) == ["seed-7.png", "seed-8.png"]
    assert all(path.parent == out and path.is_file() for path in paths)
    params = read_parameters(out / "seed-8.png")
    assert (params["prompt"], params["seed"], params["num_steps"]) == ("a photo of a woman img", 8, 2)
    # The trigger word was added for the user, and they are told; the progress bar followed the denoising.
    assert "warning:" in captured.err and "img" in captured.err
    assert "Denoising" in captured.err and "2/2" in captured.err


def test_fast_mode_runs_offline_on_the_tiny_models(
    tiny_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    status = main(
        [
            "generate",
            "--tiny",
            str(tiny_models_dir),
            "--face-backend",
            "none",
            "--fast",
            "--id-image",
            str(ASTRONAUT),
            "--prompt",
            "a photo of a woman img",
            "--negative-prompt",
            "blurry",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "3",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()

    assert status == 0, captured.err
    params = read_parameters(out / "seed-3.png")
    assert (params["fast"], params["num_steps"], params["guidance_scale"]) == ("lightning-8", 8, 0.0)
    # The default preset samples without guidance: the user is told that the negative prompt does nothing.
    assert "so your negative prompt has no effect" in captured.err


def test_a_user_mistake_exits_2_with_the_message_and_no_traceback(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "photomaker",
            "generate",
            "--id-image",
            str(ASTRONAUT),
            "--prompt",
            "a man img",
            "--style",
            "Nope",
            "--out",
            str(tmp_path / "out"),
            "--tiny",
            str(tmp_path / "tiny"),
        ],
        check=False,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "Nope" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "tiny").exists()  # refused before any model was loaded or written


def test_a_missing_photo_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = main(
        ["generate", "--id-image", str(tmp_path / "me.jpg"), "--prompt", "a man img", "--out", str(tmp_path / "out")]
    )
    assert status == 2
    assert capsys.readouterr().err == f"error: photo '{tmp_path / 'me.jpg'}' not found.\n"


def score_json(capsys: pytest.CaptureFixture, *references: Path, image: Path, err_contains: str = "") -> dict:
    args = ["score", *[arg for ref in references for arg in ("--reference", str(ref))], "--image", str(image)]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    assert err_contains in captured.err
    return json.loads(captured.out)


def test_score_says_a_mirrored_copy_is_the_same_person_and_another_person_is_not(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    mirrored = tmp_path / "mirrored.png"
    ImageOps.mirror(Image.open(ASTRONAUT)).save(mirrored)

    same = score_json(capsys, ASTRONAUT, image=mirrored)
    other = score_json(capsys, ASTRONAUT, image=GRACE_HOPPER)

    assert same["same_person"] is True and isinstance(same["similarity"], float)
    assert other["same_person"] is False
    assert same["similarity"] > other["similarity"]


def test_score_warns_about_a_reference_photo_with_two_faces(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    group = tmp_path / "group.png"
    canvas = Image.new("RGB", (900, 520), (128, 128, 128))
    canvas.paste(Image.open(ASTRONAUT).convert("RGB").crop((130, 30, 320, 230)).resize((228, 240)), (40, 140))
    canvas.paste(Image.open(GRACE_HOPPER).convert("RGB").crop((100, 80, 440, 420)), (500, 90))
    canvas.save(group)

    result = score_json(capsys, group, image=GRACE_HOPPER, err_contains="2 faces found; using the largest one")
    assert result["same_person"] is True  # the larger face, Grace Hopper's, is the reference
    assert result["warnings"] == [f"reference photo 1 ({group}): 2 faces found; using the largest one"]


def test_score_names_the_photo_without_a_face(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blank = tmp_path / "wall.png"
    Image.new("RGB", (200, 200), (120, 130, 140)).save(blank)

    assert main(["score", "--reference", str(ASTRONAUT), "--image", str(blank), "--json"]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and "wall.png" in captured.err and "no face" in captured.err


def test_make_tiny_prints_the_model_paths(tiny_models_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["make-tiny", str(tiny_models_dir)]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert printed == {
        "base": str(tiny_models_dir / "base"),
        "v1": str(tiny_models_dir / "photomaker-v1.bin"),
        "v2": str(tiny_models_dir / "photomaker-v2.bin"),
        "fast_loras": str(tiny_models_dir / "fast-loras"),
        "control": str(tiny_models_dir / "control"),
    }
    assert all(Path(path).exists() for path in printed.values())


def test_control_flags_generate_with_the_control_map_and_record_it(
    tiny_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    status = main(
        [
            "generate",
            "--tiny",
            str(tiny_models_dir),
            "--face-backend",
            "none",
            "--id-image",
            str(ASTRONAUT),
            "--prompt",
            "a photo of a woman img",
            "--style",
            "(No style)",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            "5",
            "--num-outputs",
            "1",
            "--control",
            "canny",
            "--control-image",
            str(GRACE_HOPPER),
            "--control-scale",
            "0.8",
            "--control-start",
            "0.1",
            "--control-end",
            "0.9",
            "--style-image",
            str(GRACE_HOPPER),
            "--style-image-scale",
            "0.5",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()

    assert status == 0, captured.err
    params = read_parameters(out / "seed-5.png")
    assert (params["control_type"], params["control_image"], params["control_scale"]) == (
        "canny",
        "grace_hopper.jpg",
        0.8,
    )
    assert (params["control_start"], params["control_end"], params["style_image_scale"]) == (0.1, 0.9, 0.5)
    assert "warning: The control image (512x600) has another aspect ratio" in captured.err


MASK = ROOT / "tests" / "data" / "mask_face_box.png"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--control", "pose"], "Control type 'pose' needs a control image (--control-image)"),
        (["--control-image", str(GRACE_HOPPER)], "no control type: choose pose, canny, depth or sketch"),
        (
            ["--control", "canny", "--control-image", str(GRACE_HOPPER), "--init-image", str(ASTRONAUT)],
            "Control (canny) together with a start photo is not supported",
        ),
        (["--mask", str(MASK)], "A mask needs a start photo (init_image, --init-image)"),
        (["--init-image", str(ASTRONAUT), "--mask", str(MASK), "--mask-face"], "Give either a mask or mask_face"),
        (["--init-image", str(ASTRONAUT), "--mask", "WHITE"], "the mask is all white"),
        (["--init-image", str(ASTRONAUT), "--strength", "1.5"], "strength must be between 0 and 1, got 1.5"),
        (
            ["--control", "canny", "--control-image", str(GRACE_HOPPER), "--control-scale", "3"],
            "control_scale must be between 0 and 2, got 3",
        ),
        (["--style-image", "nowhere.png"], "style image 'nowhere.png' (--style-image) not found"),
    ],
)
def test_bad_control_input_exits_2_with_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    """Refused before the model is loaded (offline, the default model's load fails in the background)."""
    Image.new("L", (32, 32), 255).save(tmp_path / "white.png")
    flags = [str(tmp_path / "white.png") if flag == "WHITE" else flag for flag in flags]
    status = main(
        [
            "generate",
            "--face-backend",
            "none",
            "--id-image",
            str(ASTRONAUT),
            "--prompt",
            "a man img",
            "--out",
            str(tmp_path / "out"),
            *flags,
        ]
    )
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()
