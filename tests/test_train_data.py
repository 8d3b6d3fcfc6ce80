"""prepare-data: every stage on real public-domain portraits (dlib backend), the output format, and resuming."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from faces_fixtures import ASTRONAUT, GRACE_HOPPER
from PIL import Image
from train_data_fixtures import (
    EXPECTED_DROPS,
    GIVEN_CAPTION,
    KEPT_EILEEN,
    eileen_photos,
    open_image,
    write_identity_folders,
)

from photomaker.errors import ImageRejected, ModelLoadError, TrainingDataError
from photomaker.faces import Face, FaceAnalyzer, get_face_analyzer
from photomaker.train.captions import Captioner, make_caption, mark_class_word, template_caption
from photomaker.train.crop import SDXL_BUCKETS_1024, apply_crop, plan_crop, sdxl_buckets
from photomaker.train.data import (
    PrepareDataConfig,
    PrepareSummary,
    check_face_size,
    detect_subject_face,
    find_identity_outliers,
    identity_distance,
    list_sources,
    prepare_data,
)
from photomaker.train.masks import SegmentationMasker, face_hair_mask

TEST_CONFIG = PrepareDataConfig(resolution=256, min_face_size=64)


class CountingAnalyzer(FaceAnalyzer):
    """The real dlib analyzer, counting its calls (to prove that a resumed run does not redo work)."""

    def __init__(self, inner: FaceAnalyzer) -> None:
        self.inner = inner
        self.name, self.embedding_dim = inner.name, inner.embedding_dim
        self.threshold_metric, self.same_person_threshold = inner.threshold_metric, inner.same_person_threshold
        self.licence = inner.licence
        self.detect_calls = 0

    def detect(self, rgb: np.ndarray) -> list[Face]:
        self.detect_calls += 1
        return self.inner.detect(rgb)

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        return self.inner.embed(rgb, face)


@pytest.fixture(scope="module")
def dlib_analyzer() -> FaceAnalyzer:
    return get_face_analyzer("dlib")


@pytest.fixture(scope="module")
def prepared(
    tmp_path_factory: pytest.TempPathFactory, dlib_analyzer: FaceAnalyzer
) -> tuple[Path, Path, PrepareSummary]:
    """The example identities prepared once: (src, data, summary)."""
    root = tmp_path_factory.mktemp("prepare")
    src = write_identity_folders(root)
    summary = prepare_data(src, root / "data", TEST_CONFIG, face_analyzer=dlib_analyzer, progress=False)
    return src, root / "data", summary


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(open_image(path).convert("RGB"))


# ---- stage functions ----------------------------------------------------------------------------------------


def test_buckets_are_sdxl_s_at_1024_and_multiples_of_32_near_the_resolution_squared() -> None:
    assert sdxl_buckets(1024) == list(SDXL_BUCKETS_1024)
    small = sdxl_buckets(256)
    assert (256, 256) in small and len(set(small)) == len(small)
    for width, height in small:
        assert width % 32 == 0 and height % 32 == 0
        assert 0.75 < width * height / 256**2 < 1.3
    with pytest.raises(TrainingDataError, match="multiple of 32"):
        sdxl_buckets(300)


@pytest.mark.parametrize(
    ("size", "face", "share"),
    [
        ((512, 512), (179, 83, 267, 171), 0.10),
        ((512, 600), (161, 137, 377, 353), 0.10),
        ((1600, 600), (700, 200, 800, 300), 0.10),
        ((600, 1600), (250, 100, 350, 200), 0.25),
        ((300, 300), (20, 40, 280, 290), 0.10),
    ],
)
def test_crop_holds_the_face_at_the_share_inside_the_photo_at_a_bucket_aspect(
    size: tuple[int, int], face: tuple[int, int, int, int], share: float
) -> None:
    buckets = sdxl_buckets(256)
    crop = plan_crop(size, face, min_face_share=share, buckets=buckets)
    left, top, right, bottom = crop.box
    assert 0 <= left and 0 <= top and right <= size[0] and bottom <= size[1]
    assert left <= face[0] and top <= face[1] and right >= face[2] and bottom >= face[3]
    assert crop.size in buckets
    assert abs(math.log((right - left) / (bottom - top) / (crop.size[0] / crop.size[1]))) < 0.02
    face_area = (face[2] - face[0]) * (face[3] - face[1])
    assert crop.face_share == pytest.approx(face_area / ((right - left) * (bottom - top)))
    assert crop.face_share >= share
    image = apply_crop(Image.new("RGB", size), crop)
    assert image.size == crop.size


def test_wide_photo_gets_a_landscape_bucket_and_the_largest_allowed_crop() -> None:
    crop = plan_crop((1600, 600), (700, 200, 800, 300), min_face_share=0.01, buckets=sdxl_buckets(1024))
    assert crop.size[0] > crop.size[1]
    assert crop.box[3] - crop.box[1] == 600  # as tall as the photo: the share allows more than the photo


def test_detection_finds_the_portrait_and_refuses_no_face_and_two_faces(
    dlib_analyzer: FaceAnalyzer, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = eileen_photos()
    face = detect_subject_face(np.asarray(photos["original"]), dlib_analyzer)
    assert 170 < face.bbox[0] < 190 and 75 < face.bbox[1] < 95 and 80 < face.width < 100
    for stem in ("noise", "blank"):
        with pytest.raises(ImageRejected, match="no face found") as caught:
            detect_subject_face(np.asarray(photos[stem]), dlib_analyzer)
        assert caught.value.stage == "detect"
    with pytest.raises(ImageRejected, match=r"2 faces and none dominates: the second is \d+%"):
        detect_subject_face(np.asarray(photos["two_faces"]), dlib_analyzer)
    # a clearly smaller second face does not disqualify the photo (the analyser's own confidence filter is
    # lifted so that the small, weaker face is seen at all: the size rule is what is tested here)
    monkeypatch.setattr(dlib_analyzer, "min_relative_score", 0.0)
    group = photos["two_faces"].copy()
    group.paste((128, 128, 128), (512, 0, 1024, 512))
    group.paste(photos["mirror"].resize((256, 256)), (640, 128))
    assert len(dlib_analyzer.detect(np.asarray(group))) >= 2
    assert detect_subject_face(np.asarray(group), dlib_analyzer).bbox[0] < 512


def test_face_size_rejects_faces_below_the_minimum(dlib_analyzer: FaceAnalyzer) -> None:
    face = detect_subject_face(np.asarray(eileen_photos()["small_face"]), dlib_analyzer)
    check_face_size(face, 40)
    with pytest.raises(ImageRejected, match=r"the face is \d+x\d+ px, smaller than 64 px") as caught:
        check_face_size(face, 64)
    assert caught.value.stage == "face_size"


def test_verification_flags_the_other_person_with_its_distance(dlib_analyzer: FaceAnalyzer) -> None:
    photos = eileen_photos()
    embeddings = []
    for stem in (*KEPT_EILEEN, "wrong_person"):
        rgb = np.asarray(photos[stem])
        embeddings.append(dlib_analyzer.embed(rgb, detect_subject_face(rgb, dlib_analyzer)))
    outliers = find_identity_outliers(embeddings, lambda a, b: identity_distance(dlib_analyzer, a, b), 0.6)
    assert list(outliers) == [len(KEPT_EILEEN)]
    assert "from the identity's medoid (more than 0.6)" in outliers[len(KEPT_EILEEN)]
    two = find_identity_outliers(embeddings[-2:], lambda a, b: identity_distance(dlib_analyzer, a, b), 0.6)
    assert set(two) == {0, 1} and "cannot tell which" in two[0]
    assert find_identity_outliers(embeddings[:2], lambda a, b: identity_distance(dlib_analyzer, a, b), 0.6) == {}


def test_face_hair_mask_covers_the_face_grows_upward_and_feathers() -> None:
    box = (100, 120, 160, 180)
    mask = np.asarray(face_hair_mask((256, 320), box))
    assert mask.shape == (320, 256)
    assert (mask[box[1] : box[3], box[0] + 10 : box[2] - 10] == 255).all()
    assert mask[box[1] - 30, 130] == 255  # hair above the box
    assert mask[box[3] + 30, 130] == 0  # well below the chin
    assert mask[0, 0] == 0 and mask[-1, -1] == 0
    assert ((mask > 0) & (mask < 255)).any()  # a soft edge
    tilted = np.asarray(face_hair_mask((256, 320), box, np.array([[110, 140], [150, 160], [0, 0], [0, 0], [0, 0]])))
    assert not np.array_equal(tilted, mask)


def test_captions_mark_the_class_word_or_are_rejected() -> None:
    assert mark_class_word(GIVEN_CAPTION, "woman", "img") == "a photo of a woman img smiling in a spacesuit"
    assert mark_class_word("A Woman  at work", "woman", "img") == "A Woman img at work"
    assert mark_class_word("a woman img at work", "man", "img") == "a woman img at work"
    with pytest.raises(ImageRejected, match="has no class word 'woman'") as caught:
        mark_class_word("an astronaut", "woman", "img")
    assert caught.value.stage == "caption"
    with pytest.raises(ImageRejected, match="img"):
        mark_class_word("img of a woman", "woman", "img")
    assert mark_class_word("a lady in a spacesuit", "woman", "img", from_model=True) == "a woman img in a spacesuit"
    image = Image.new("RGB", (8, 8))
    assert make_caption(image, None, "man", "img") == template_caption("man", "img") == "a photo of a man img"
    assert make_caption(image, None, "person", "img", captioner=lambda _: "a man on a bench") == (
        "a person img on a bench"
    )


def test_model_loaders_explain_what_to_do_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="(?s)captioning model 'no-such-org/no-such-blip'.*local folder"):
        Captioner("no-such-org/no-such-blip")
    with pytest.raises(ModelLoadError, match="(?s)segmentation model 'no-such-org/no-such-seg'.*face-and-hair"):
        SegmentationMasker("no-such-org/no-such-seg")


def _save_tiny_person_segformer(folder: Path) -> Path:
    """A random-weight SegFormer with labels background/person whose bias makes every pixel "person"."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    config = SegformerConfig(
        num_channels=3,
        num_encoder_blocks=1,
        depths=[1],
        sr_ratios=[1],
        hidden_sizes=[8],
        patch_sizes=[3],
        strides=[2],
        num_attention_heads=[1],
        mlp_ratios=[1],
        decoder_hidden_size=8,
        id2label={0: "background", 1: "person"},
        label2id={"background": 0, "person": 1},
    )
    model = SegformerForSemanticSegmentation(config)
    model.decode_head.classifier.bias.data[:] = 0.0
    model.decode_head.classifier.bias.data[1] = 50.0
    model.save_pretrained(folder)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_segmentation_masker_loads_a_local_model_and_checks_its_labels(tmp_path: Path) -> None:
    folder = _save_tiny_person_segformer(tmp_path)
    with pytest.raises(ModelLoadError, match="no label hair; pass --mask-labels with some of: background, person"):
        SegmentationMasker(str(folder), labels=("hair",))
    mask = SegmentationMasker(str(folder), labels=("person",))(Image.new("RGB", (48, 40), (90, 30, 30)))
    assert mask.mode == "L" and mask.size == (48, 40) and np.asarray(mask).min() == 255


def test_pipeline_uses_the_segmentation_model_and_the_captioner(tmp_path: Path, dlib_analyzer: FaceAnalyzer) -> None:
    model = _save_tiny_person_segformer(tmp_path / "segformer")
    src = tmp_path / "src" / "grace"
    src.mkdir(parents=True)
    open_image(GRACE_HOPPER).save(src / "portrait.png")
    config = PrepareDataConfig(resolution=256, min_face_size=64, mask_model=str(model), class_word="woman")
    captioned: list[tuple[int, int]] = []

    def captioner(image: Image.Image) -> str:
        captioned.append(image.size)
        return "a lady in uniform"

    summary = prepare_data(
        tmp_path / "src", tmp_path / "data", config, face_analyzer=dlib_analyzer, captioner=captioner, progress=False
    )
    assert summary.kept == 1
    (record,) = _jsonl(tmp_path / "data" / "manifest.jsonl")
    assert record["caption"] == "a woman img in uniform"
    assert captioned == [(record["width"], record["height"])]  # the model saw the training image
    assert np.asarray(open_image(tmp_path / "data" / record["mask"])).min() == 255  # the model's mask, not the ellipse


# ---- the whole pipeline -------------------------------------------------------------------------------------


def test_every_drop_is_reported_with_its_stage_and_reason(prepared: tuple[Path, Path, PrepareSummary]) -> None:
    _, data, summary = prepared
    report = {Path(r["source"]).stem: r for r in _jsonl(data / "report.jsonl")}
    assert {stem: r["stage"] for stem, r in report.items()} == EXPECTED_DROPS
    assert all(r["identity"] == "eileen" and r["reason"] for r in report.values())
    assert "from the identity's medoid" in report["wrong_person"]["reason"]
    assert "no class word 'woman'" in report["no_class_word"]["reason"]
    assert summary.kept == len(KEPT_EILEEN) + 2 and summary.seen == len(KEPT_EILEEN) + len(EXPECTED_DROPS) + 2
    assert summary.dropped == {"detect": 3, "face_size": 1, "verify": 1, "caption": 1}
    assert summary.line().startswith(
        f"prepare-data: {summary.seen} seen, 0 done before, {summary.kept} kept, 6 dropped (read 0, detect 3, "
    )


def test_manifest_lines_have_the_agreed_format_and_files(prepared: tuple[Path, Path, PrepareSummary]) -> None:
    _, data, _ = prepared
    manifest = _jsonl(data / "manifest.jsonl")
    assert sorted(Path(r["source"]).stem for r in manifest if r["identity"] == "eileen") == sorted(KEPT_EILEEN)
    buckets = sdxl_buckets(256)
    for record in manifest:
        stem = Path(record["source"]).stem
        assert record["image"] == f"images/{record['identity']}/{stem}.png"
        assert record["mask"] == f"masks/{record['identity']}/{stem}.png"
        assert record["face_embedding"] is None
        assert record["trigger_word"] == "img"
        assert Path(record["source"]).is_file()
        image, mask = open_image(data / record["image"]), open_image(data / record["mask"])
        assert image.mode == "RGB" and mask.mode == "L"
        assert image.size == mask.size == (record["width"], record["height"])
        assert (record["width"], record["height"]) in buckets
        x0, y0, x1, y1 = record["face_box"]
        assert all(isinstance(v, int) for v in record["face_box"])
        assert (x1 - x0) * (y1 - y0) / (record["width"] * record["height"]) >= TEST_CONFIG.min_face_share
        face_region = np.asarray(mask)[y0:y1, x0:x1]
        assert face_region.mean() > 240 and np.asarray(mask).mean() < 200
    eileen = {Path(r["source"]).stem: r for r in manifest if r["identity"] == "eileen"}
    grace = [r for r in manifest if r["identity"] == "grace"]
    assert eileen["original"]["caption"] == "a photo of a woman img smiling in a spacesuit"
    assert eileen["mirror"]["caption"] == "a photo of a woman img" and eileen["mirror"]["class_word"] == "woman"
    assert [r["caption"] for r in grace] == ["a photo of a person img"] * 2


def test_training_image_shows_the_detected_face_where_the_manifest_says(
    prepared: tuple[Path, Path, PrepareSummary], dlib_analyzer: FaceAnalyzer
) -> None:
    _, data, _ = prepared
    for record in _jsonl(data / "manifest.jsonl")[:3]:
        faces = dlib_analyzer.detect(_rgb(data / record["image"]))
        assert faces, record["image"]
        found = np.array(faces[0].bbox)
        assert np.abs(found - np.array(record["face_box"])).max() < 0.15 * (found[2] - found[0]), record["image"]


def test_a_second_run_resumes_without_detecting_again(
    prepared: tuple[Path, Path, PrepareSummary], dlib_analyzer: FaceAnalyzer
) -> None:
    src, data, first = prepared
    manifest_before = (data / "manifest.jsonl").read_text()
    counting = CountingAnalyzer(dlib_analyzer)
    again = prepare_data(src, data, TEST_CONFIG, face_analyzer=counting, progress=False)
    assert counting.detect_calls == 0
    assert (again.already_done, again.kept, sum(again.dropped.values())) == (first.seen, 0, 0)
    assert (data / "manifest.jsonl").read_text() == manifest_before
    # a new photo of an existing identity is the only one processed, and verified against the kept ones
    open_image(GRACE_HOPPER).save(src / "eileen" / "late_wrong.png")
    open_image(ASTRONAUT).rotate(-5).save(src / "eileen" / "late_right.png")
    try:
        late = prepare_data(src, data, TEST_CONFIG, face_analyzer=counting, progress=False)
    finally:
        (src / "eileen" / "late_wrong.png").unlink()
        (src / "eileen" / "late_right.png").unlink()
    assert counting.detect_calls == 2
    assert late.kept == 1 and late.dropped == {"verify": 1}
    assert _jsonl(data / "report.jsonl")[-1]["source"].endswith("late_wrong.png")


def test_an_interrupted_line_is_dropped_and_its_photo_done_again(tmp_path: Path, dlib_analyzer: FaceAnalyzer) -> None:
    src = tmp_path / "src" / "grace"
    src.mkdir(parents=True)
    open_image(GRACE_HOPPER).save(src / "a.png")
    open_image(GRACE_HOPPER).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(src / "b.png")
    prepare_data(tmp_path / "src", tmp_path / "data", TEST_CONFIG, face_analyzer=dlib_analyzer, progress=False)
    manifest = tmp_path / "data" / "manifest.jsonl"
    first, second = manifest.read_text().splitlines()
    manifest.write_text(first + "\n" + second[: len(second) // 2])  # killed while writing the second line
    counting = CountingAnalyzer(dlib_analyzer)
    resumed = prepare_data(tmp_path / "src", tmp_path / "data", TEST_CONFIG, face_analyzer=counting, progress=False)
    assert (resumed.already_done, resumed.kept, counting.detect_calls) == (1, 1, 1)
    assert manifest.read_text().splitlines() == [first, second]


def test_a_photo_added_later_never_overwrites_the_files_of_a_kept_one(
    tmp_path: Path, dlib_analyzer: FaceAnalyzer
) -> None:
    grace = tmp_path / "src" / "grace"
    grace.mkdir(parents=True)
    open_image(GRACE_HOPPER).save(grace / "a.jpg")
    prepare_data(tmp_path / "src", tmp_path / "data", TEST_CONFIG, face_analyzer=dlib_analyzer, progress=False)
    [first] = _jsonl(tmp_path / "data" / "manifest.jsonl")
    first_image = (tmp_path / "data" / first["image"]).read_bytes()
    # Sorted before a.jpg, the new photo would take its output name "a" if names were given afresh.
    open_image(GRACE_HOPPER).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(grace / "a.bmp")
    resumed = prepare_data(
        tmp_path / "src", tmp_path / "data", TEST_CONFIG, face_analyzer=dlib_analyzer, progress=False
    )
    assert (resumed.already_done, resumed.kept) == (1, 1)
    records = _jsonl(tmp_path / "data" / "manifest.jsonl")
    assert records[0] == first
    assert len({record["image"] for record in records}) == len({record["mask"] for record in records}) == 2
    assert (tmp_path / "data" / first["image"]).read_bytes() == first_image


def test_a_damaged_line_inside_the_manifest_is_named(tmp_path: Path) -> None:
    from photomaker.train.data import DataFolder

    DataFolder(tmp_path, {"resolution": 256})
    good = json.dumps({"source": "/photos/a.png", "identity": "a"})
    (tmp_path / "manifest.jsonl").write_text(good + '\n{"source": \n' + good + "\n")
    with pytest.raises(TrainingDataError, match=r"manifest.jsonl line 2 is not a prepare-data record.*--overwrite"):
        DataFolder(tmp_path, {"resolution": 256})
    (tmp_path / "manifest.jsonl").write_text(good + "\n[]\n")
    with pytest.raises(TrainingDataError, match="line 2"):
        DataFolder(tmp_path, {"resolution": 256})


def test_changed_settings_are_refused_and_overwrite_starts_again(tmp_path: Path, dlib_analyzer: FaceAnalyzer) -> None:
    src = tmp_path / "src" / "grace"
    src.mkdir(parents=True)
    open_image(GRACE_HOPPER).save(src / "portrait.png")
    prepare_data(tmp_path / "src", tmp_path / "data", TEST_CONFIG, face_analyzer=dlib_analyzer, progress=False)
    changed = PrepareDataConfig(resolution=256, min_face_size=64, min_face_share=0.2)
    with pytest.raises(TrainingDataError, match=r"other settings \(min_face_share: 0.1 -> 0.2\).*--overwrite"):
        prepare_data(tmp_path / "src", tmp_path / "data", changed, face_analyzer=dlib_analyzer, progress=False)
    redone = prepare_data(
        tmp_path / "src", tmp_path / "data", changed, face_analyzer=dlib_analyzer, overwrite=True, progress=False
    )
    assert redone.kept == 1 and redone.already_done == 0
    assert [p.name for p in (tmp_path / "data" / "images" / "grace").iterdir()] == ["portrait.png"]
    assert json.loads((tmp_path / "data" / "settings.json").read_text())["min_face_share"] == 0.2


def test_jsonl_manifest_input_with_captions_and_class_words(tmp_path: Path, dlib_analyzer: FaceAnalyzer) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    eileen = eileen_photos()
    for stem in ("original", "mirror", "rescale"):
        eileen[stem].save(photos / f"e_{stem}.png")
    open_image(GRACE_HOPPER).save(photos / "g.jpg")
    lines = [
        {"identity": "collins", "image": "photos/e_original.png", "caption": "a woman floating", "class_word": "woman"},
        {"identity": "collins", "image": "photos/e_mirror.png", "class_word": "woman"},
        {"identity": "collins", "image": "photos/e_rescale.png", "class_word": "woman"},
        {"identity": "hopper", "image": "photos/g.jpg"},
    ]
    manifest_in = tmp_path / "input.jsonl"
    manifest_in.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    summary = prepare_data(manifest_in, tmp_path / "data", TEST_CONFIG, face_analyzer=dlib_analyzer, progress=False)
    assert summary.kept == 4
    records = {r["image"]: r for r in _jsonl(tmp_path / "data" / "manifest.jsonl")}
    assert records["images/collins/e_original.png"]["caption"] == "a woman img floating"
    assert records["images/collins/e_mirror.png"]["caption"] == "a photo of a woman img"
    assert records["images/hopper/g.png"]["class_word"] == "person"


def test_bad_inputs_raise_errors_that_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="does not exist"):
        list_sources(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingDataError, match="holds no photos"):
        list_sources(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"identity": "a"}\n')
    with pytest.raises(TrainingDataError, match=r'line 1 needs string fields "identity" and "image"'):
        list_sources(bad)
    bad.write_text('{"identity": "../up", "image": "x.png"}\n')
    with pytest.raises(TrainingDataError, match="cannot name an output folder"):
        list_sources(bad)
    bad.write_text('{"identity": "a", "image": "x.png", "class_word": "two words"}\n')
    with pytest.raises(TrainingDataError, match="single plain word"):
        list_sources(bad)
    with pytest.raises(TrainingDataError, match="min_face_share must be in"):
        PrepareDataConfig(min_face_share=10)
    (tmp_path / "latin" / "ann").mkdir(parents=True)
    (tmp_path / "latin" / "ann" / "a.png").write_bytes(b"")
    (tmp_path / "latin" / "ann" / "a.txt").write_bytes("a photo of a person img in Orléans".encode("latin-1"))
    with pytest.raises(TrainingDataError, match=r"a.txt is not UTF-8 text .*save the caption as UTF-8"):
        list_sources(tmp_path / "latin")


def test_photos_of_other_types_are_read_and_unreadable_files_reported(
    tmp_path: Path, dlib_analyzer: FaceAnalyzer, caplog: pytest.LogCaptureFixture
) -> None:
    grace = tmp_path / "src" / "grace"
    grace.mkdir(parents=True)
    open_image(GRACE_HOPPER).save(grace / "portrait.tif")
    (grace / "scan.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (grace / ".DS_Store").write_bytes(b"\x00")  # hidden: the system's, not the user's
    open_image(GRACE_HOPPER).save(tmp_path / "src" / "loose.jpg")
    with caplog.at_level("WARNING", logger="photomaker.train.data"):
        summary = prepare_data(
            tmp_path / "src", tmp_path / "data", TEST_CONFIG, face_analyzer=dlib_analyzer, progress=False
        )
    assert (summary.seen, summary.kept, dict(summary.dropped)) == (2, 1, {"read": 1})
    assert [Path(r["source"]).name for r in _jsonl(tmp_path / "data" / "manifest.jsonl")] == ["portrait.tif"]
    [dropped] = _jsonl(tmp_path / "data" / "report.jsonl")
    assert (Path(dropped["source"]).name, dropped["stage"]) == ("scan.heic", "read")
    assert "not a readable image file" in dropped["reason"]
    assert "loose.jpg" in caplog.text and "not read" in caplog.text


def test_prepare_data_command_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from photomaker.cli import main

    src = tmp_path / "src" / "grace"
    src.mkdir(parents=True)
    open_image(GRACE_HOPPER).save(src / "portrait.png")
    (src / "portrait.txt").write_text("a man at a desk")
    code = main(
        [
            "prepare-data",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "data"),
            "--resolution",
            "256",
            "--min-face-size",
            "64",
            "--class-word",
            "man",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "prepare-data: 1 seen, 0 done before, 1 kept, 0 dropped (read 0, detect 0" in capsys.readouterr().out
    code = main(
        ["prepare-data", str(tmp_path / "src"), "--out", str(tmp_path / "data"), "--resolution", "512", "--no-progress"]
    )
    assert code == 2 and "resolution: 256 -> 512" in capsys.readouterr().err


def _synthetic_insightface(root: Path) -> FaceAnalyzer:
    """The InsightFace backend on the ONNX stand-ins of tests/faces_fixtures.py (a red patch is "the face")."""
    from faces_fixtures import SyntheticDetector, build_arcface_model, build_scrfd_model

    from photomaker.faces import insightface_backend as backend

    root.mkdir(parents=True, exist_ok=True)
    build_scrfd_model(root / backend.DETECTOR_FILE, SyntheticDetector())
    build_arcface_model(root / backend.RECOGNISER_FILE)
    return backend.InsightFaceAnalyzer(root, download=False)


def test_v2_saves_the_raw_512d_embedding_of_the_training_image(tmp_path: Path, dlib_analyzer: FaceAnalyzer) -> None:
    from faces_fixtures import red_marker_image

    from photomaker.train.data import v2_face_embedding

    insightface = _synthetic_insightface(tmp_path / "buffalo")
    marker = Image.fromarray(red_marker_image(128, 128, (40, 40, 88, 88)))
    embedding = v2_face_embedding(marker, insightface)
    rgb = np.asarray(marker)
    assert embedding.dtype == np.float32 and embedding.shape == (512,)
    np.testing.assert_array_equal(embedding, insightface.embed(rgb, insightface.detect(rgb)[0]))
    with pytest.raises(ImageRejected, match="finds no face in the cropped training image"):
        v2_face_embedding(Image.new("RGB", (128, 128)), insightface)

    src = tmp_path / "src" / "eileen"
    src.mkdir(parents=True)
    astronaut = np.asarray(open_image(ASTRONAUT).convert("RGB")).copy()
    astronaut[..., 0] = np.minimum(astronaut[..., 0], 200)  # the flag's red stripes would be "faces" too
    Image.fromarray(astronaut).save(src / "no_marker.png")
    astronaut[200:250, 120:170] = (255, 0, 0)  # on the suit, inside the training crop
    Image.fromarray(astronaut).save(src / "marked.png")
    Image.fromarray(astronaut[:, ::-1]).save(src / "marked_mirror.png")
    config = PrepareDataConfig(resolution=256, min_face_size=64, pm_version=2)
    summary = prepare_data(
        tmp_path / "src",
        tmp_path / "data",
        config,
        face_analyzer=dlib_analyzer,
        embedding_analyzer=insightface,
        progress=False,
    )
    assert summary.kept == 2 and summary.dropped == {"embedding": 1}
    for record in _jsonl(tmp_path / "data" / "manifest.jsonl"):
        stem = Path(record["source"]).stem
        assert record["face_embedding"] == f"embeddings/eileen/{stem}.npy"
        saved = np.load(tmp_path / "data" / record["face_embedding"])
        image = _rgb(tmp_path / "data" / record["image"])
        assert saved.dtype == np.float32 and saved.shape == (512,)
        np.testing.assert_allclose(saved, insightface.embed(image, insightface.detect(image)[0]), rtol=1e-6)
    with pytest.raises(TrainingDataError, match="v2 needs 512-d InsightFace embeddings; the dlib backend gives 128-d"):
        prepare_data(
            tmp_path / "src",
            tmp_path / "other",
            config,
            face_analyzer=dlib_analyzer,
            embedding_analyzer=dlib_analyzer,
            progress=False,
        )
