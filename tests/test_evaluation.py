"""`photomaker.evaluation`: each metric against a value computed here by hand, and `eval` end to end on the tiny
models (noise images: no faces), with a two-setting sweep, resume, compare and JSON output."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from photomaker.errors import IDImageError, InvalidRequestError, PromptError
from photomaker.evaluation import (
    Scorers,
    add_eval_arguments,
    clip_image_embeddings,
    fid,
    run_eval_command,
    score_images,
    summarise,
)
from photomaker.evaluation.inputs import default_prompts_file, load_identities, load_prompts
from photomaker.evaluation.report import compare, markdown_table
from photomaker.evaluation.settings import build_settings, image_seed, parse_sweep
from photomaker.metadata import read_parameters

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ASTRONAUT = EXAMPLES / "astronaut.png"
GRACE_HOPPER = EXAMPLES / "grace_hopper.jpg"
SUMMARY_KEYS = {"face_sim", "face_div", "clip_t", "clip_i", "dino", "no_face_rate", "seconds_per_image", "n"}


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from photomaker.testing_eval import make_tiny_scorers

    return make_tiny_scorers(tmp_path_factory.mktemp("scorers"))


@pytest.fixture(scope="module")
def scorers(scorer_dirs: dict[str, Path]) -> Scorers:
    """CLIP and DINO only: references may be noise."""
    return Scorers.load(str(scorer_dirs["clip"]), str(scorer_dirs["dino"]), face_backend=None, device="cpu")


@pytest.fixture(scope="module")
def face_scorers(scorers: Scorers) -> Scorers:
    """The same models plus the dlib face backend (references must then show a face)."""
    from photomaker.faces import get_face_analyzer

    return Scorers(
        scorers.clip_model,
        scorers.clip_processor,
        scorers.dino_model,
        scorers.dino_processor,
        get_face_analyzer("dlib"),
        device="cpu",
    )


def noise(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Metrics, each against the models' own forward passes and torch ops
# ---------------------------------------------------------------------------------------------------------------


def test_clip_t_is_100_cosine_of_the_image_and_the_prompt_without_the_trigger(
    scorers: Scorers, scorer_dirs: dict[str, Path]
) -> None:
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(scorer_dirs["clip"]).eval()
    processor = AutoProcessor.from_pretrained(scorer_dirs["clip"])
    images = [noise(1), noise(2)]
    rows = score_images(images, ["a photo of a man img on a beach"] * 2, [noise(3)], scorers)

    with torch.no_grad():
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)

        def text_embed(text: str) -> torch.Tensor:
            ids = processor.tokenizer([text], return_tensors="pt")["input_ids"]
            return model.text_projection(model.text_model(input_ids=ids).pooler_output)

        expected = 100 * torch.cosine_similarity(image_embeds, text_embed("a photo of a man on a beach"))
        with_trigger = 100 * torch.cosine_similarity(image_embeds, text_embed("a photo of a man img on a beach"))
    assert [row["clip_t"] for row in rows] == pytest.approx(expected.tolist(), abs=1e-4)
    assert not torch.allclose(expected, with_trigger, atol=1e-3)  # the trigger word really was taken out


def test_clip_i_and_dino_average_the_cosine_to_each_reference(scorers: Scorers, scorer_dirs: dict[str, Path]) -> None:
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

    clip = CLIPModel.from_pretrained(scorer_dirs["clip"]).eval()
    clip_processor = AutoProcessor.from_pretrained(scorer_dirs["clip"]).image_processor
    dino = AutoModel.from_pretrained(scorer_dirs["dino"]).eval()
    dino_processor = AutoImageProcessor.from_pretrained(scorer_dirs["dino"])
    image, references = noise(4), [noise(5), noise(6, size=56)]
    row = score_images([image], ["a man img"], references, scorers)[0]

    with torch.no_grad():

        def clip_embed(pictures: list[Image.Image]) -> torch.Tensor:
            pixels = clip_processor(images=pictures, return_tensors="pt")["pixel_values"]
            return clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)

        def dino_embed(pictures: list[Image.Image]) -> torch.Tensor:
            pixels = dino_processor(images=pictures, return_tensors="pt")["pixel_values"]
            return dino(pixel_values=pixels).last_hidden_state[:, 0]

        clip_i = torch.cosine_similarity(clip_embed([image]), clip_embed(references)).mean()
        dino_sim = torch.cosine_similarity(dino_embed([image]), dino_embed(references)).mean()
    assert row["clip_i"] == pytest.approx(float(clip_i), abs=1e-5)
    assert row["dino"] == pytest.approx(float(dino_sim), abs=1e-5)
    assert row["face_found"] is None and row["face_sim"] is None  # no face backend, no face numbers


def test_noise_has_no_face(face_scorers: Scorers) -> None:
    row = score_images([noise(7)], ["a man img"], [ASTRONAUT], face_scorers)[0]
    assert (row["face_found"], row["face_sim"], row["face_div"]) == (False, None, None)


def mirrored_recrop(path: Path) -> Image.Image:
    image = ImageOps.mirror(Image.open(path).convert("RGB"))
    width, height = image.size
    return image.crop((width // 10, 0, width, height * 9 // 10))


def test_face_sim_and_face_div_on_the_example_portraits(face_scorers: Scorers) -> None:
    analyzer = face_scorers.face_analyzer
    assert analyzer is not None

    def embed(image: Image.Image) -> np.ndarray:
        rgb = np.asarray(image.convert("RGB"))
        return analyzer.embed(rgb, analyzer.detect(rgb)[0])

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    same, other = mirrored_recrop(ASTRONAUT), Image.open(GRACE_HOPPER).convert("RGB")
    rows = score_images([same, other], ["a woman img"] * 2, [ASTRONAUT], face_scorers)

    reference = embed(Image.open(ASTRONAUT))
    assert rows[0]["face_sim"] == pytest.approx(cosine(embed(same), reference), abs=1e-5)
    assert rows[1]["face_sim"] == pytest.approx(cosine(embed(other), reference), abs=1e-5)
    assert rows[0]["face_sim"] > rows[1]["face_sim"]
    # Both images are one group (same prompt): Face Div is 1 - cosine of their two faces, on both rows.
    expected_div = 1 - cosine(embed(same), embed(other))
    assert rows[0]["face_div"] == rows[1]["face_div"] == pytest.approx(expected_div, abs=1e-5)


def test_face_div_spans_every_prompt_of_an_identity(face_scorers: Scorers, tmp_path: Path) -> None:
    from photomaker.evaluation.inputs import Identity
    from photomaker.evaluation.runner import EvalPlan, plan_items

    analyzer = face_scorers.face_analyzer
    assert analyzer is not None
    same, other = mirrored_recrop(ASTRONAUT), Image.open(GRACE_HOPPER).convert("RGB")
    rows = score_images([same, other], ["a woman img", "a woman img on a beach"], [ASTRONAUT], face_scorers)
    faces = [analyzer.embed(np.asarray(image), analyzer.detect(np.asarray(image))[0]) for image in (same, other)]
    expected = 1 - analyzer.similarity(*faces)
    assert rows[0]["face_div"] == rows[1]["face_div"] == pytest.approx(expected, abs=1e-5)
    # The eval run scores one identity's images under one setting together, across its prompts.
    plan = EvalPlan(
        [Identity("ann", (ASTRONAUT,)), Identity("bob", (GRACE_HOPPER,))],
        ["a {class} img", "a {class} img on a beach"],
        build_settings(["style_strength=20,30"]),
        2,
        1,
    )
    groups = {item.group for item in plan_items(plan, tmp_path)}
    assert groups == {
        (setting, name) for setting in ("style_strength=20", "style_strength=30") for name in ("ann", "bob")
    }


def test_summarise_counts_each_face_div_group_once_and_the_images_without_a_face() -> None:
    def row(group: str, face_sim: float | None, face_div: float | None, seconds: float) -> dict:
        return {
            "group": group,
            "face_sim": face_sim,
            "face_found": face_sim is not None,
            "face_div": face_div,
            "clip_t": 20.0,
            "clip_i": 0.5,
            "dino": 0.25,
            "seconds": seconds,
        }

    rows = [row("a", 0.6, 0.3, 1.0), row("a", 0.4, 0.3, 2.0), row("a", None, 0.3, 3.0), row("b", 0.8, 0.9, 6.0)]
    summary = summarise(rows)
    assert summary["face_sim"] == pytest.approx(0.6)  # (0.6 + 0.4 + 0.8) / 3 images with a face
    assert summary["face_div"] == pytest.approx(0.6)  # (0.3 + 0.9) / 2 groups, not weighted by images
    assert summary["no_face_rate"] == pytest.approx(0.25)
    assert summary["seconds_per_image"] == pytest.approx(3.0)
    assert (summary["clip_t"], summary["n"]) == (pytest.approx(20.0), 4)


def test_fid_matches_the_frechet_distance_of_the_clip_embeddings(
    scorers: Scorers, scorer_dirs: dict[str, Path]
) -> None:
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(scorer_dirs["clip"]).eval()
    processor = AutoProcessor.from_pretrained(scorer_dirs["clip"]).image_processor
    wide = [
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 96, 3), dtype=np.uint8))
        for seed in range(23, 27)
    ]  # each image is embedded as it is, not squeezed to the first one's size
    generated, real = [noise(seed) for seed in range(10, 16)], [noise(seed) for seed in range(20, 23)] + wide
    with torch.no_grad():

        def features(images: list[Image.Image]) -> torch.Tensor:
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).double()

        a, b = features(generated), features(real)
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(A B) = tr sqrt(sqrt(A) B sqrt(A)), the symmetric form (eigh, not eigvals)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    trace_root = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    expected = float(((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root)

    assert fid(generated, real, scorers) == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert fid(generated, clip_image_embeddings(real, scorers), scorers) == pytest.approx(expected, rel=1e-3, abs=1e-4)
    with pytest.raises(InvalidRequestError, match="at least 2 generated and 2 real"):
        fid(generated[:1], real, scorers)


# ---------------------------------------------------------------------------------------------------------------
# Inputs and sweeps
# ---------------------------------------------------------------------------------------------------------------


def test_the_shipped_prompts_are_40_valid_prompts_with_a_class_placeholder() -> None:
    prompts = load_prompts()
    assert len(prompts) == 40 and len(set(prompts)) == 40
    assert all("{class}" in prompt and " img" in prompt for prompt in prompts)
    assert default_prompts_file().is_file()


def test_a_bad_prompt_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na photo of a {class} img\n\na photo of a {class} on a boat\n")
    with pytest.raises(PromptError, match=r"prompts.txt line 4 \('a photo of a \{class\} on a boat'\)"):
        load_prompts(path)


def test_identities_read_their_photos_and_class_word(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / "b.jpg").write_bytes(b"")
    (tmp_path / "bob" / "a.png").write_bytes(b"")
    (tmp_path / "bob" / "c.heic").write_bytes(b"")
    (tmp_path / "bob" / "class.txt").write_text("man\n")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "1.webp").write_bytes(b"")
    with caplog.at_level("WARNING", logger="photomaker.evaluation.inputs"):
        identities = load_identities(tmp_path)
    assert "bob: c.heic not used" in caplog.text  # said, not skipped silently
    assert [(i.name, [p.name for p in i.photos], i.class_word) for i in identities] == [
        ("ann", ["1.webp"], "person"),
        ("bob", ["a.png", "b.jpg"], "man"),
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(IDImageError, match="empty' has no photos"):
        load_identities(tmp_path)


def test_sweeps_make_a_grid_of_settings_and_unknown_keys_get_a_suggestion() -> None:
    settings = build_settings(["style_strength=20,30", "num_references=1,4", "adapter=a.bin"])
    assert [setting.label for setting in settings] == [
        "style_strength=20, num_references=1, adapter=a.bin",
        "style_strength=20, num_references=4, adapter=a.bin",
        "style_strength=30, num_references=1, adapter=a.bin",
        "style_strength=30, num_references=4, adapter=a.bin",
    ]
    assert (settings[3].request, settings[3].num_references, settings[3].service) == (
        {"style_strength": 30.0},
        4,
        {"adapter": "a.bin"},
    )
    assert parse_sweep("fast=none,lcm") == ("fast", [("none", None), ("lcm", "lcm")])
    with pytest.raises(InvalidRequestError, match="Did you mean 'style_strength'"):
        parse_sweep("style_strenght=20")
    with pytest.raises(InvalidRequestError, match="'x' is not a valid num_steps"):
        parse_sweep("steps=20,x")


def test_the_seed_depends_on_identity_prompt_and_image_only() -> None:
    seeds = {
        image_seed(0, identity, prompt, image)
        for identity in ("ann", "bob")
        for prompt in range(3)
        for image in range(4)
    }
    assert len(seeds) == 24
    assert image_seed(0, "ann", 2, 3) == image_seed(0, "ann", 2, 3) != image_seed(1, "ann", 2, 3)


def test_compare_prints_the_differences_per_setting() -> None:
    mine = {"default": {"face_sim": 0.62, "clip_t": 26.0, "n": 4}}
    theirs = {"default": {"face_sim": 0.60, "clip_t": 27.5, "n": 4}}
    table = compare(mine, theirs)
    assert "| default | +2.00 | -1.50 |" in table
    with pytest.raises(InvalidRequestError, match="no setting in common"):
        compare({"a": {}, "b": {}}, {"c": {}})


def test_an_image_made_with_other_settings_is_made_again(tmp_path: Path) -> None:
    from photomaker.evaluation.inputs import Identity
    from photomaker.evaluation.runner import EvalPlan, generate_items, plan_items, recorded_parameters
    from photomaker.service import GeneratedImage, GenerationResult

    made: list[tuple[str, int, int]] = []

    def fake_generate(request):  # records what reached the model, returns a plain image
        made.append((request.prompt, request.seed, request.num_steps))
        return GenerationResult([GeneratedImage(noise(request.seed % 100, 8), {"seed": request.seed})], request.seed)

    identity = Identity("ann", (ASTRONAUT, GRACE_HOPPER), "woman")
    plan = EvalPlan(
        [identity],
        ["a {class} img"],
        build_settings([]),
        images_per_prompt=2,
        num_references=1,
        request={"num_steps": 30},
    )
    items = plan_items(plan, tmp_path)
    assert generate_items(items, plan, lambda setting: fake_generate) == 2
    assert made == [("a woman img", items[0].seed, 30), ("a woman img", items[1].seed, 30)]
    assert all(recorded_parameters(item) is not None for item in items)
    changed = plan_items(
        EvalPlan([identity], ["a {class} img"], build_settings([]), 2, 1, request={"num_steps": 40}), tmp_path
    )
    assert [item.path for item in changed] == [item.path for item in items]
    assert all(recorded_parameters(item) is None for item in changed)  # same files, other settings: made again
    with pytest.raises(IDImageError, match="'ann' has 2 photos but 3 references are asked"):
        plan_items(EvalPlan([identity], ["a {class} img"], build_settings([]), 2, 3), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# End to end on the tiny models
# ---------------------------------------------------------------------------------------------------------------


def eval_args(root: Path, tiny: Path, scorer_dirs: dict[str, Path], *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(
        [
            "--ids",
            str(root / "ids"),
            "--prompts",
            str(root / "prompts.txt"),
            "--out",
            str(root / "out"),
            "--tiny",
            str(tiny),
            "--face-backend",
            "none",
            "--images-per-prompt",
            "2",
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
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def eval_run(tiny_models_dir: Path, scorer_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One identity (the astronaut, a woman), one prompt, 2 images, swept over 2 style strengths."""
    root = tmp_path_factory.mktemp("eval")
    (root / "ids" / "astronaut").mkdir(parents=True)
    (root / "ids" / "astronaut" / "photo.png").write_bytes(ASTRONAUT.read_bytes())
    (root / "ids" / "astronaut" / "class.txt").write_text("woman")
    (root / "prompts.txt").write_text("a photo of a {class} img on a beach\n")
    (root / "real").mkdir()
    for photo in (ASTRONAUT, GRACE_HOPPER):
        (root / "real" / photo.name).write_bytes(photo.read_bytes())
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = run_eval_command(
            eval_args(
                root, tiny_models_dir, scorer_dirs, "--sweep", "style_strength=20,40", "--fid-real", str(root / "real")
            )
        )
    return {"root": root, "status": status, "stdout": stdout.getvalue(), "tiny": tiny_models_dir}


def test_tiny_run_writes_every_column_and_noise_has_no_faces(eval_run: dict) -> None:
    out = eval_run["root"] / "out"
    assert eval_run["status"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["style_strength=20", "style_strength=40"]
    for values in summary.values():
        assert set(values) == SUMMARY_KEYS | {"fid"}
        assert values["no_face_rate"] == 1.0 and values["n"] == 2
        assert values["fid"] > 0  # noise is far from two portraits
        assert values["face_sim"] is None and values["face_div"] is None  # no face anywhere
        assert all(math.isfinite(values[key]) for key in ("clip_t", "clip_i", "dino", "seconds_per_image"))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert {
            "setting",
            "identity",
            "prompt_index",
            "image_index",
            "seed",
            "path",
            "face_sim",
            "face_div",
            "clip_t",
            "clip_i",
            "dino",
            "seconds",
        } <= set(row)
        assert row["prompt"] == "a photo of a woman img on a beach"
        assert Image.open(out / row["path"]).size == (64, 64)
    assert "| style_strength=20 |" in eval_run["stdout"]
    assert "| setting | Face Sim | Face Div | CLIP-T | CLIP-I | DINO | FID |" in eval_run["stdout"]
    plot = Image.open(out / "face_sim_vs_clip_t.png")
    assert plot.size == (640, 480)


def test_both_settings_use_the_same_seeds(eval_run: dict) -> None:
    out = eval_run["root"] / "out"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_setting = {
        setting: [(row["image_index"], row["seed"]) for row in rows if row["setting"] == setting]
        for setting in ("style_strength=20", "style_strength=40")
    }
    assert by_setting["style_strength=20"] == by_setting["style_strength=40"]
    assert len({seed for _, seed in by_setting["style_strength=20"]}) == 2
    for row in rows:  # the PNG was generated with the seed and setting the row says
        parameters = read_parameters(out / row["path"])
        assert parameters["seed"] == row["seed"]
        assert parameters["style_strength"] == float(row["setting"].split("=")[1])


def test_a_rerun_makes_and_scores_nothing_again_and_prints_json(
    eval_run: dict, scorer_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import photomaker.evaluation.metrics
    import photomaker.service

    out = eval_run["root"] / "out"
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*.png") if "images" in path.parts}

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run must not generate or score again")

    monkeypatch.setattr(photomaker.service.PhotoMakerService, "generate", forbidden)
    monkeypatch.setattr(photomaker.evaluation.metrics.Scorers, "load", forbidden)
    status = run_eval_command(
        eval_args(
            eval_run["root"],
            eval_run["tiny"],
            scorer_dirs,
            "--sweep",
            "style_strength=20,40",
            "--json",
            "--compare",
            str(out / "summary.json"),
        )
    )
    captured = capsys.readouterr()
    assert status == 0
    assert {path: path.stat().st_mtime_ns for path in before} == before
    assert json.loads(captured.out) == json.loads((out / "summary.json").read_text())
    assert "0 images made, 4 already there" in captured.err
    assert "| style_strength=20 | - | - | +0.00 | +0.00 | +0.00 |" in captured.err  # compared with itself


def test_markdown_table_shows_cosines_times_100() -> None:
    table = markdown_table({"default": {"face_sim": 0.618, "clip_t": 26.1, "n": 4, "no_face_rate": 0.0}})
    assert "| default | 61.80 | 26.10 | 0.00 | 4 |" in table


def test_the_plot_has_one_point_per_setting_with_face_sim(tmp_path: Path) -> None:
    from photomaker.evaluation.report import plot_tradeoff

    summary = {
        "low": {"clip_t": 27.0, "face_sim": 0.5},
        "high": {"clip_t": 24.0, "face_sim": 0.7},
        "faceless": {"clip_t": 25.0, "face_sim": None},
    }
    pixels = np.asarray(Image.open(plot_tradeoff(summary, tmp_path / "plot.png")).convert("RGB")).reshape(-1, 3)
    colours = {tuple(pixel) for pixel in pixels}
    assert (0x1F, 0x77, 0xB4) in colours and (0xD6, 0x27, 0x28) in colours  # the two placed settings
    assert (0x2C, 0xA0, 0x2C) not in colours  # the third colour is unused: "faceless" is listed, not placed


def test_earlier_scores_are_kept_only_for_the_same_references_and_group(tmp_path: Path, scorers: Scorers) -> None:
    from photomaker.evaluation.inputs import Identity
    from photomaker.evaluation.runner import RESULTS_FILE, EvalPlan, generate_items, plan_items, score_groups
    from photomaker.service import GeneratedImage, GenerationResult

    def fake_generate(request):
        return GenerationResult([GeneratedImage(noise(request.seed % 100, 8), {"seed": request.seed})], request.seed)

    photos = []
    for seed in (30, 31):
        photos.append(tmp_path / f"ref{seed}.png")
        noise(seed).save(photos[-1])
    spec = {"clip": "tiny", "dino": "tiny", "face_backend": None}
    loads: list[int] = []

    def load_scorers() -> Scorers:
        loads.append(1)
        return scorers

    def score(identity: Identity, images_per_prompt: int) -> list[dict]:
        plan = EvalPlan([identity], ["a {class} img"], build_settings([]), images_per_prompt, num_references=1)
        items = plan_items(plan, tmp_path / "out")
        generate_items(items, plan, lambda setting: fake_generate)
        rows = score_groups([items], tmp_path / "out", spec, load_scorers)
        (tmp_path / "out" / RESULTS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return rows

    one_photo = score(Identity("ann", (photos[0],)), 2)
    assert score(Identity("ann", (photos[0],)), 2) == one_photo and len(loads) == 1  # nothing changed: kept
    # A second photo changes no generated image (the generator still sees only the first) but every CLIP-I.
    two_photos = score(Identity("ann", tuple(photos)), 2)
    assert len(loads) == 2
    assert two_photos[0]["clip_i"] != pytest.approx(one_photo[0]["clip_i"], abs=1e-6)
    # One image per prompt: the first image is the same, but its group (and so its Face Div) is not.
    score(Identity("ann", tuple(photos)), 1)
    assert len(loads) == 3


def test_the_model_set_by_the_environment_is_part_of_every_image_fingerprint(
    tmp_path: Path, scorer_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from photomaker.cli import service_config
    from photomaker.evaluation.command import build_plan
    from photomaker.evaluation.runner import plan_items

    (tmp_path / "ids" / "ann").mkdir(parents=True)
    (tmp_path / "ids" / "ann" / "photo.png").write_bytes(ASTRONAUT.read_bytes())
    (tmp_path / "prompts.txt").write_text("a photo of a {class} img\n")

    def fingerprints(adapter: str) -> list[str]:
        monkeypatch.setenv("PHOTOMAKER_ADAPTER", adapter)
        args = eval_args(tmp_path, tmp_path / "tiny", scorer_dirs)
        return [item.fingerprint for item in plan_items(build_plan(args, service_config(args)), tmp_path / "out")]

    assert fingerprints("a.bin") == fingerprints("a.bin")
    assert set(fingerprints("a.bin")).isdisjoint(fingerprints("b.bin"))  # another adapter: every image made again
    # the same path trained further (new contents): made again, not reused
    checkpoint = tmp_path / "photomaker.bin"
    checkpoint.write_bytes(b"step 100")
    before = fingerprints(str(checkpoint))
    assert fingerprints(str(checkpoint)) == before
    checkpoint.write_bytes(b"step 2000, longer")
    assert set(fingerprints(str(checkpoint))).isdisjoint(before)


def test_generate_s_crop_and_best_of_flags_reach_every_request(tmp_path: Path, scorer_dirs: dict[str, Path]) -> None:
    from photomaker.cli import service_config
    from photomaker.evaluation.command import build_plan
    from photomaker.evaluation.runner import generation_request, plan_items

    (tmp_path / "ids" / "ann").mkdir(parents=True)
    (tmp_path / "ids" / "ann" / "photo.png").write_bytes(ASTRONAUT.read_bytes())
    (tmp_path / "prompts.txt").write_text("a photo of a {class} img\n")
    args = eval_args(tmp_path, tmp_path / "tiny", scorer_dirs, "--no-crop", "--best-of", "3")
    plan = build_plan(args, service_config(args))
    request = generation_request(plan_items(plan, tmp_path / "out")[0], plan)
    assert (request.crop_faces, request.best_of, request.num_steps) == (False, 3, 2)


def test_scoring_models_that_cannot_load_name_the_flag_and_the_offline_fix(
    tmp_path: Path, scorer_dirs: dict[str, Path]
) -> None:
    from photomaker.errors import ModelLoadError

    with pytest.raises(
        ModelLoadError,
        match=r"(?s)CLIP model \(CLIP-T, CLIP-I\) 'nobody/no-such-clip'.*--clip-model.*"
        r"hf download nobody/no-such-clip",
    ):
        Scorers.load("nobody/no-such-clip", str(scorer_dirs["dino"]), face_backend=None, device="cpu")
    with pytest.raises(ModelLoadError, match=r"(?s)DINO model '.*empty'.*--dino-model"):
        Scorers.load(str(scorer_dirs["clip"]), str(tmp_path / "empty"), face_backend=None, device="cpu")


def test_a_custom_trigger_word_is_taken_out_for_clip_t(scorer_dirs: dict[str, Path]) -> None:
    custom = Scorers.load(
        str(scorer_dirs["clip"]), str(scorer_dirs["dino"]), face_backend=None, device="cpu", trigger_word="ohwx"
    )
    assert custom.prompt_text("a photo of a man ohwx on a beach") == "a photo of a man on a beach"


EVAL_SCRIPT = """
import argparse, logging, sys
from photomaker.evaluation import add_eval_arguments, run_eval_command
parser = argparse.ArgumentParser()
add_eval_arguments(parser)
logging.basicConfig(level=logging.INFO, format="%(message)s")
sys.exit(run_eval_command(parser.parse_args(sys.argv[1:])))
"""


def test_two_accelerate_processes_share_the_groups_and_give_the_single_process_results(
    eval_run: dict, scorer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from test_batch import ROOT, free_port

    script = tmp_path / "eval_main.py"
    script.write_text(EVAL_SCRIPT)
    root = eval_run["root"]
    args = vars(eval_args(root, eval_run["tiny"], scorer_dirs))
    launch = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        "--ids",
        str(root / "ids"),
        "--prompts",
        str(root / "prompts.txt"),
        "--out",
        str(tmp_path / "out"),
        "--tiny",
        args["tiny"],
        "--face-backend",
        "none",
        "--images-per-prompt",
        "2",
        "--num-references",
        "1",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--clip-model",
        args["clip_model"],
        "--dino-model",
        args["dino_model"],
        "--sweep",
        "style_strength=20,40",
        "--json",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(launch, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    assert run.returncode == 0, run.stderr[-3000:]
    # One group (identity x prompt) per setting: each process makes one setting's two images.
    assert "process 0/2: 2 of 4 images to make" in run.stderr and "process 1/2: 2 of 4 images to make" in run.stderr
    single = [json.loads(line) for line in (root / "out" / "results.jsonl").read_text().splitlines()]
    double = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["setting"], r["image_index"], r["seed"], r["path"]) for r in double] == [
        (r["setting"], r["image_index"], r["seed"], r["path"]) for r in single
    ]
    for one, two in zip(single, double, strict=True):
        # Same seed and setting; thread counts differ (OMP_NUM_THREADS=1), so allow float noise of a pixel level.
        first = np.asarray(Image.open(root / "out" / one["path"])).astype(int)
        second = np.asarray(Image.open(tmp_path / "out" / two["path"])).astype(int)
        assert np.abs(first - second).max() <= 2, (one["path"], np.abs(first - second).max())
        assert two["clip_t"] == pytest.approx(one["clip_t"], abs=1e-3)
