"""``prepare-data``: turn folders of photos per identity into a PhotoMaker training set (the paper's pipeline).

Stages, each a plain function below, in the order they run on every image:

1. ``read``: decode the photo (EXIF applied, size limits);
2. ``detect``: find faces; drop photos without one, or where no single face dominates;
3. ``face_size``: drop faces smaller than ``min_face_size`` (shorter side of the detector's box);
4. ``verify``: drop photos whose face embedding is far from the identity's medoid embedding;
5. ``crop``: crop to an SDXL bucket with the face covering at least ``min_face_share``, resize;
6. ``mask``: the face-and-hair mask (offline) or a segmentation model's person mask;
7. ``caption``: the given caption, a captioning model's, or the template, with the class word marked;
8. ``embedding``: for PhotoMaker v2, the raw 512-d InsightFace embedding of the training image.

Output (``DATA``): ``manifest.jsonl`` (one line per kept image), ``report.jsonl`` (one line per dropped image
with its stage and reason), ``settings.json`` (the settings the folder was made with), ``images/``,
``masks/``, ``embeddings/`` (v2) and ``verification/`` (the face-recognition embedding of each kept image, so
that a later run can verify new photos of an identity against it without detecting the old ones again).
Lines are appended as images finish, so a second run resumes: images already in the manifest or the report are
not processed again, and a run with different settings is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from photomaker.errors import IDImageError, ImageRejected, TrainingDataError
from photomaker.faces import Face, FaceAnalyzer, get_face_analyzer
from photomaker.images import load_image
from photomaker.prompt import DEFAULT_TRIGGER_WORD
from photomaker.train.captions import Captioner, make_caption
from photomaker.train.crop import apply_crop, plan_crop, sdxl_buckets
from photomaker.train.masks import SegmentationMasker, face_hair_mask

logger = logging.getLogger(__name__)

STAGES = ("read", "detect", "face_size", "verify", "crop", "mask", "caption", "embedding")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST, REPORT, SETTINGS = "manifest.jsonl", "report.jsonl", "settings.json"
OUTPUT_FOLDERS = ("images", "masks", "embeddings", "verification")
CLASS_FILE = "class.txt"
CAPTION_SUFFIX = ".txt"
V2_EMBEDDING_DIM = 512
WEAK_FACE_SCORE_SHARE = 0.25
"""Detections scoring below this share of the photo's best detection are not faces that compete for it."""
_SAFE_NAME = re.compile(r"^[\w][\w.\- ]*$")


@dataclass(frozen=True)
class PrepareDataConfig:
    """Every setting that changes the output; its JSON form is ``DATA/settings.json``."""

    resolution: int = 1024
    min_face_size: int = 256
    max_second_face_ratio: float = 0.5
    """A second face whose box area is at least this share of the largest one's means no face dominates."""
    max_id_distance: float | None = None
    """Largest distance to the identity's medoid; None: the face backend's same-person threshold (dlib 0.6,
    InsightFace cosine distance 0.6)."""
    min_face_share: float = 0.10
    class_word: str = "person"
    trigger_word: str = DEFAULT_TRIGGER_WORD
    pm_version: int = 1
    face_backend: str = "dlib"
    mask_model: str | None = None
    mask_labels: tuple[str, ...] = ("person",)
    caption_model: str | None = None

    def __post_init__(self) -> None:
        sdxl_buckets(self.resolution)  # validates the resolution
        if self.min_face_size < 1:
            raise TrainingDataError(f"min_face_size must be at least 1 pixel, got {self.min_face_size}")
        if not 0.0 < self.max_second_face_ratio <= 1.0:
            raise TrainingDataError(f"max_second_face_ratio must be in (0, 1], got {self.max_second_face_ratio}")
        if not 0.0 < self.min_face_share <= 1.0:
            raise TrainingDataError(f"min_face_share must be in (0, 1], e.g. 0.1 for 10 %, got {self.min_face_share}")
        if self.pm_version not in (1, 2):
            raise TrainingDataError(f"pm_version must be 1 or 2, got {self.pm_version}")
        check_class_word(self.class_word, self.trigger_word, where="--class-word")


@dataclass(frozen=True)
class SourceImage:
    """One photo to prepare: its identity, file, optional caption and class word, and its output name."""

    identity: str
    path: Path
    caption: str | None
    class_word: str
    stem: str

    @property
    def key(self) -> str:
        """How the manifest and the report name the photo (its absolute path)."""
        return str(self.path.resolve())


@dataclass
class PrepareSummary:
    """Counts of one run: photos seen, already done by an earlier run, kept now, dropped now per stage."""

    seen: int = 0
    already_done: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def line(self) -> str:
        drops = ", ".join(f"{stage} {self.dropped.get(stage, 0)}" for stage in STAGES)
        return (
            f"prepare-data: {self.seen} seen, {self.already_done} done before, {self.kept} kept, "
            f"{sum(self.dropped.values())} dropped ({drops})"
        )


@dataclass
class _Candidate:
    """A photo that passed the face stages, waiting for identity verification."""

    source: SourceImage
    face: Face
    embedding: np.ndarray


def check_class_word(word: str, trigger_word: str, *, where: str) -> str:
    """A class word is one word, not the trigger; returns it stripped."""
    word = word.strip()
    if not re.fullmatch(r"[A-Za-z]+", word) or word == trigger_word:
        raise TrainingDataError(
            f"{where}: the class word must be a single plain word such as 'man', 'woman' or 'person' (not the "
            f"trigger word {trigger_word!r}), got {word!r}"
        )
    return word


# ---- input --------------------------------------------------------------------------------------------------


def list_sources(
    src: str | Path, class_word: str = "person", trigger_word: str = DEFAULT_TRIGGER_WORD
) -> list[SourceImage]:
    """The photos of ``src``: a folder with one sub-folder per identity, or a JSONL manifest.

    Folder layout: ``SRC/<identity>/<photo>`` with an optional ``<photo stem>.txt`` caption beside each photo
    and an optional ``class.txt`` (the identity's class word). Manifest lines:
    ``{"identity", "image", "caption"?, "class_word"?}``, image paths relative to the manifest's folder.
    """
    src = Path(src)
    if src.is_dir():
        sources = _list_folder(src, class_word, trigger_word)
    elif src.is_file():
        sources = _list_manifest(src, class_word, trigger_word)
    else:
        raise TrainingDataError(
            f"{src} does not exist; pass a folder with one sub-folder of photos per identity, or a JSONL manifest"
        )
    if not sources:
        raise TrainingDataError(
            f"{src} holds no photos ({', '.join(IMAGE_SUFFIXES)}); put each identity's photos in a sub-folder "
            "named after it"
        )
    return sources


def _list_folder(src: Path, default_class: str, trigger_word: str) -> list[SourceImage]:
    """Every file of every identity folder except captions: one of an unknown type is reported by the ``read``
    stage rather than skipped unseen, so nothing the user put there is lost silently."""
    outside = sorted(p.name for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    if outside:
        logger.warning(
            "%s: %d file(s) outside the identity folders are not read (move each photo into its "
            "identity's sub-folder): %s",
            src,
            len(outside),
            ", ".join(outside[:10]),
        )
    sources = []
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        identity = _check_identity(folder.name, where=str(folder))
        class_word = default_class
        if (folder / CLASS_FILE).is_file():
            class_word = check_class_word(
                (folder / CLASS_FILE).read_text(encoding="utf-8"), trigger_word, where=str(folder / CLASS_FILE)
            )
        photos = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != CAPTION_SUFFIX
        )
        used: set[str] = set()
        for photo in photos:
            caption_file = photo.with_suffix(CAPTION_SUFFIX)
            caption = _read_caption(caption_file) if caption_file.is_file() else None
            sources.append(SourceImage(identity, photo, caption, class_word, _unique_stem(photo, used)))
    return sources


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrainingDataError(f"{path} is not UTF-8 text ({exc.reason}); save the caption as UTF-8") from exc


def _list_manifest(src: Path, default_class: str, trigger_word: str) -> list[SourceImage]:
    sources = []
    used: dict[str, set[str]] = {}
    for number, text in enumerate(src.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{src} line {number}"
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainingDataError(f"{where} is not JSON ({exc}); write one JSON object per line") from exc
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("identity"), str)
            or not isinstance(entry.get("image"), str)
        ):
            raise TrainingDataError(
                f'{where} needs string fields "identity" and "image" (optional "caption", "class_word"), got {text!r}'
            )
        identity = _check_identity(entry["identity"], where=where)
        class_word = check_class_word(str(entry.get("class_word") or default_class), trigger_word, where=where)
        caption = entry.get("caption")
        photo = src.parent / entry["image"]
        stem = _unique_stem(photo, used.setdefault(identity, set()))
        sources.append(SourceImage(identity, photo, None if caption is None else str(caption), class_word, stem))
    return sources


def _check_identity(name: str, *, where: str) -> str:
    if not _SAFE_NAME.fullmatch(name):
        raise TrainingDataError(
            f"{where}: identity {name!r} cannot name an output folder; use letters, digits, '.', '-', '_' and "
            "spaces, starting with a letter or digit"
        )
    return name


def _unique_stem(photo: Path, used: set[str]) -> str:
    """The photo's stem, made unique within its identity (``a.jpg`` and ``a.png`` become ``a`` and ``a_png``)."""
    stem = re.sub(r"[^\w.\-]", "_", photo.stem) or "image"
    candidate, number = stem, 1
    while candidate in used:
        candidate = f"{stem}_{photo.suffix.lstrip('.').lower()}" if number == 1 else f"{stem}_{number}"
        number += 1
    used.add(candidate)
    return candidate


# ---- stages -------------------------------------------------------------------------------------------------


def read_photo(source: SourceImage) -> Image.Image:
    """Stage ``read``: the decoded RGB photo."""
    try:
        return load_image(source.path, name=source.path.name)
    except (IDImageError, OSError) as exc:
        raise ImageRejected("read", str(exc)) from exc


def detect_subject_face(
    rgb: np.ndarray,
    analyzer: FaceAnalyzer,
    max_second_face_ratio: float = 0.5,
    weak_score_share: float = WEAK_FACE_SCORE_SHARE,
) -> Face:
    """Stage ``detect``: the photo's one dominant face.

    Detections scoring below ``weak_score_share`` of the best score are ignored first (dlib's HOG finds
    shirt folds and flags at margins near 0 beside real faces near 1.5). Of the rest, the largest box is the
    subject; a second one whose area is at least ``max_second_face_ratio`` of the subject's means the photo has
    no single subject.
    """
    faces = analyzer.detect(rgb)
    if not faces:
        raise ImageRejected("detect", f"no face found ({analyzer.name} detector)")
    best_score = max(face.score for face in faces)
    faces = [face for face in faces if face.score >= weak_score_share * best_score]  # still largest first
    if len(faces) > 1 and faces[1].area >= max_second_face_ratio * faces[0].area:
        ratio = faces[1].area / faces[0].area
        raise ImageRejected(
            "detect",
            f"{len(faces)} faces and none dominates: the second is {ratio:.0%} of the largest's area "
            f"(at most {max_second_face_ratio:.0%} allowed)",
        )
    return faces[0]


def check_face_size(face: Face, min_face_size: int) -> None:
    """Stage ``face_size``: the face box's shorter side is at least ``min_face_size`` pixels."""
    side = min(face.width, face.height)
    if side < min_face_size:
        raise ImageRejected(
            "face_size", f"the face is {face.width:.0f}x{face.height:.0f} px, smaller than {min_face_size} px"
        )


def identity_distance(analyzer: FaceAnalyzer, a: np.ndarray, b: np.ndarray) -> float:
    """Distance on the backend's own scale: euclidean for dlib, cosine distance (1 - similarity) for ArcFace."""
    if analyzer.threshold_metric == "distance":
        return analyzer.distance(a, b)
    return 1.0 - analyzer.similarity(a, b)


def default_max_id_distance(analyzer: FaceAnalyzer) -> float:
    """The backend's same-person threshold as a distance."""
    if analyzer.threshold_metric == "distance":
        return analyzer.same_person_threshold
    return 1.0 - analyzer.same_person_threshold


def find_identity_outliers(
    embeddings: Sequence[np.ndarray],
    distance: Callable[[np.ndarray, np.ndarray], float],
    max_distance: float,
    candidates: Iterable[int] | None = None,
) -> dict[int, str]:
    """Stage ``verify``: {index: reason} for the ``candidates`` far from the identity's medoid embedding.

    The medoid (the embedding with the smallest summed distance to all others) stands for the identity: unlike
    the mean, a few wrong-person photos cannot drag it. With two photos there is no majority: if they are
    farther apart than ``max_distance`` both are reported. ``candidates`` defaults to all indices (earlier
    kept photos take part in the medoid but are not judged again).
    """
    count = len(embeddings)
    indices = list(range(count)) if candidates is None else list(candidates)
    if count < 2:
        return {}
    pairwise = np.array([[distance(a, b) for b in embeddings] for a in embeddings])
    if count == 2:
        if pairwise[0, 1] <= max_distance:
            return {}
        reason = (
            f"the identity's only two faces are {pairwise[0, 1]:.3f} apart (more than {max_distance:g}); "
            "cannot tell which is the person"
        )
        return {index: reason for index in indices}
    medoid = int(pairwise.sum(axis=1).argmin())
    return {
        index: (
            f"face embedding is {pairwise[index, medoid]:.3f} from the identity's medoid "
            f"(more than {max_distance:g}): probably another person"
        )
        for index in indices
        if pairwise[index, medoid] > max_distance
    }


def v2_face_embedding(image: Image.Image, analyzer: FaceAnalyzer) -> np.ndarray:
    """Stage ``embedding``: the raw 512-d InsightFace embedding of the training image's largest face."""
    rgb = np.asarray(image.convert("RGB"))
    faces = analyzer.detect(rgb)
    if not faces:
        raise ImageRejected("embedding", f"the {analyzer.name} detector finds no face in the cropped training image")
    return np.asarray(analyzer.embed(rgb, faces[0]), dtype=np.float32).reshape(V2_EMBEDDING_DIM)


# ---- output folder ------------------------------------------------------------------------------------------


class DataFolder:
    """``DATA``: the append-only manifest and report, and the settings they were made with."""

    def __init__(self, root: str | Path, settings: dict, *, overwrite: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        settings_path = self.root / SETTINGS
        if overwrite:
            for name in (MANIFEST, REPORT, SETTINGS):
                (self.root / name).unlink(missing_ok=True)
            for name in OUTPUT_FOLDERS:
                shutil.rmtree(self.root / name, ignore_errors=True)
        if settings_path.is_file():
            earlier = json.loads(settings_path.read_text(encoding="utf-8"))
            changed = sorted(k for k in set(earlier) | set(settings) if earlier.get(k) != settings.get(k))
            if changed:
                details = "; ".join(f"{k}: {earlier.get(k)!r} -> {settings.get(k)!r}" for k in changed)
                raise TrainingDataError(
                    f"{self.root} was prepared with other settings ({details}); use a new --out folder, or "
                    "--overwrite to prepare everything again"
                )
        else:
            settings_path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self.kept = self._read(MANIFEST)
        self.dropped = self._read(REPORT)

    def _read(self, name: str) -> dict[str, dict]:
        """The records of a JSONL file by source; a last line cut short by an interrupted run is removed."""
        path = self.root / name
        if not path.is_file():
            return {}
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            complete = text[: text.rfind("\n") + 1]
            logger.warning(
                "removing the unfinished last line of %s (an interrupted run): %r", path, text[len(complete) :][:80]
            )
            path.write_text(complete, encoding="utf-8")
            text = complete
        records = {}
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                record = json.loads(line)
                records[record["source"]] = record
            except (ValueError, KeyError, TypeError) as exc:
                raise TrainingDataError(
                    f"{path} line {number} is not a prepare-data record ({exc!r}); fix or delete that line, or "
                    "use --overwrite to prepare everything again"
                ) from exc
        return records

    def is_done(self, source: SourceImage) -> bool:
        return source.key in self.kept or source.key in self.dropped

    def kept_verification_embeddings(self, identity: str) -> list[np.ndarray]:
        return [
            np.load(self.root / record["verification"])
            for record in self.kept.values()
            if record["identity"] == identity and (self.root / record.get("verification", "")).is_file()
        ]

    def append(self, name: str, record: dict) -> None:
        with open(self.root / name, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        (self.kept if name == MANIFEST else self.dropped)[record["source"]] = record

    def output_path(self, kind: str, source: SourceImage, suffix: str) -> tuple[Path, str]:
        relative = f"{kind}/{source.identity}/{source.stem}{suffix}"
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, relative


# ---- the pipeline -------------------------------------------------------------------------------------------


def _keep_earlier_outputs(pending: list[SourceImage], folder: DataFolder) -> list[SourceImage]:
    """`pending` with new output names where an image kept by an earlier run already has theirs.

    Output names are made unique among the photos listed now, so a photo added later (``a.bmp`` beside a kept
    ``a.jpg``) can be given the name of an earlier photo's files and would overwrite them.
    """
    used: dict[str, set[str]] = {}
    for record in folder.kept.values():
        used.setdefault(record["identity"], set()).add(Path(record["image"]).stem)
    clashes = [source.stem in used.get(source.identity, set()) for source in pending]
    for source, clash in zip(pending, clashes, strict=True):
        if not clash:
            used.setdefault(source.identity, set()).add(source.stem)
    return [
        replace(source, stem=_unique_stem(source.path, used[source.identity])) if clash else source
        for source, clash in zip(pending, clashes, strict=True)
    ]


def prepare_data(
    src: str | Path,
    out: str | Path,
    config: PrepareDataConfig = PrepareDataConfig(),
    *,
    face_analyzer: FaceAnalyzer | None = None,
    embedding_analyzer: FaceAnalyzer | None = None,
    masker: Callable[[Image.Image], Image.Image] | None = None,
    captioner: Callable[[Image.Image], str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> PrepareSummary:
    """Run every stage on every photo of ``src`` not yet done in ``out``; returns this run's counts.

    Models are built from ``config`` unless passed in (``face_analyzer`` for detection and verification,
    ``embedding_analyzer`` for v2's 512-d embeddings, ``masker``, ``captioner``); ``device`` is where the
    segmentation and captioning models run (transformers' default when None).
    """
    from tqdm.auto import tqdm

    sources = list_sources(src, config.class_word, config.trigger_word)
    folder = DataFolder(out, json.loads(json.dumps(asdict(config))), overwrite=overwrite)
    analyzer = face_analyzer or get_face_analyzer(config.face_backend)  # type: ignore[arg-type]
    if config.pm_version == 2:
        embedding_analyzer = embedding_analyzer or get_face_analyzer("insightface")
        if embedding_analyzer.embedding_dim != V2_EMBEDDING_DIM:
            raise TrainingDataError(
                f"PhotoMaker v2 needs {V2_EMBEDDING_DIM}-d InsightFace embeddings; the {embedding_analyzer.name} "
                f"backend gives {embedding_analyzer.embedding_dim}-d ones"
            )
    if masker is None and config.mask_model is not None:
        masker = SegmentationMasker(config.mask_model, config.mask_labels, device=device)
    if captioner is None and config.caption_model is not None:
        captioner = Captioner(config.caption_model, device=device)
    max_distance = config.max_id_distance if config.max_id_distance is not None else default_max_id_distance(analyzer)
    buckets = sdxl_buckets(config.resolution)

    summary = PrepareSummary(seen=len(sources))
    pending = _keep_earlier_outputs([s for s in sources if not folder.is_done(s)], folder)
    summary.already_done = len(sources) - len(pending)
    by_identity: dict[str, list[SourceImage]] = {}
    for source in pending:
        by_identity.setdefault(source.identity, []).append(source)

    def drop(source: SourceImage, rejection: ImageRejected) -> None:
        logger.info("dropped %s at %s: %s", source.path, rejection.stage, rejection.reason)
        folder.append(
            REPORT,
            {"source": source.key, "identity": source.identity, "stage": rejection.stage, "reason": rejection.reason},
        )
        summary.dropped[rejection.stage] += 1
        bar.update(1)

    with tqdm(
        total=len(sources),
        initial=summary.already_done,
        desc="prepare-data",
        unit="image",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for identity, identity_sources in by_identity.items():
            candidates: list[_Candidate] = []
            for source in identity_sources:
                try:
                    rgb = np.asarray(read_photo(source))
                    face = detect_subject_face(rgb, analyzer, config.max_second_face_ratio)
                    check_face_size(face, config.min_face_size)
                    candidates.append(_Candidate(source, face, analyzer.embed(rgb, face)))
                except ImageRejected as rejection:
                    drop(source, rejection)
            earlier = folder.kept_verification_embeddings(identity)
            outliers = find_identity_outliers(
                earlier + [c.embedding for c in candidates],
                lambda a, b: identity_distance(analyzer, a, b),
                max_distance,
                candidates=range(len(earlier), len(earlier) + len(candidates)),
            )
            for index, candidate in enumerate(candidates, start=len(earlier)):
                try:
                    if index in outliers:
                        raise ImageRejected("verify", outliers[index])
                    record = _make_training_image(
                        candidate, folder, config, buckets, masker, captioner, embedding_analyzer
                    )
                except ImageRejected as rejection:
                    drop(candidate.source, rejection)
                    continue
                folder.append(MANIFEST, record)
                summary.kept += 1
                bar.update(1)
    return summary


def _make_training_image(
    candidate: _Candidate,
    folder: DataFolder,
    config: PrepareDataConfig,
    buckets: list[tuple[int, int]],
    masker: Callable[[Image.Image], Image.Image] | None,
    captioner: Callable[[Image.Image], str] | None,
    embedding_analyzer: FaceAnalyzer | None,
) -> dict:
    """Stages crop to embedding for one verified photo; writes its files and returns its manifest record."""
    source, face = candidate.source, candidate.face
    photo = read_photo(source)
    crop = plan_crop(photo.size, face.bbox, min_face_share=config.min_face_share, buckets=buckets)
    image = apply_crop(photo, crop)
    if masker is not None:
        mask = masker(image)
    else:
        mask = face_hair_mask(crop.size, crop.face_box, crop.map_points(face.landmarks))
    caption = make_caption(image, source.caption, source.class_word, config.trigger_word, captioner)
    embedding_path = None
    if config.pm_version == 2:
        assert embedding_analyzer is not None
        embedding = v2_face_embedding(image, embedding_analyzer)
        path, embedding_path = folder.output_path("embeddings", source, ".npy")
        np.save(path, embedding)
    image_path, image_relative = folder.output_path("images", source, ".png")
    mask_path, mask_relative = folder.output_path("masks", source, ".png")
    verification_path, verification_relative = folder.output_path("verification", source, ".npy")
    image.save(image_path)
    mask.save(mask_path)
    np.save(verification_path, np.asarray(candidate.embedding, np.float32))
    return {
        "identity": source.identity,
        "image": image_relative,
        "mask": mask_relative,
        "caption": caption,
        "class_word": source.class_word,
        "trigger_word": config.trigger_word,
        "face_box": list(crop.face_box),
        "width": crop.size[0],
        "height": crop.size[1],
        "source": source.key,
        "face_embedding": embedding_path,
        "verification": verification_relative,
    }


# ---- command line -------------------------------------------------------------------------------------------


def add_prepare_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``prepare-data`` options (defaults from :class:`PrepareDataConfig`)."""
    defaults = PrepareDataConfig()
    parser.add_argument(
        "src",
        type=Path,
        help="folder with one sub-folder of photos per identity, or a JSONL "
        'manifest of {"identity", "image", "caption"?, "class_word"?}',
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder DATA (created; resumed if present)")
    parser.add_argument(
        "--class-word",
        default=defaults.class_word,
        help="class word of identities without class.txt or a manifest class_word (default %(default)s)",
    )
    parser.add_argument("--trigger-word", default=defaults.trigger_word, help="default %(default)s")
    parser.add_argument(
        "--resolution",
        type=int,
        default=defaults.resolution,
        help="side of the square SDXL bucket; the other buckets scale with it (default %(default)s)",
    )
    parser.add_argument(
        "--min-face-size",
        type=int,
        default=defaults.min_face_size,
        help="smallest face box side kept, in pixels of the photo (default %(default)s)",
    )
    parser.add_argument(
        "--max-second-face-ratio",
        type=float,
        default=defaults.max_second_face_ratio,
        help="drop photos whose second face has at least this share of the largest face's area (default %(default)s)",
    )
    parser.add_argument(
        "--max-id-distance",
        type=float,
        default=None,
        help="largest face-embedding distance to the identity's medoid (default: the face "
        "backend's same-person threshold)",
    )
    parser.add_argument(
        "--min-face-share",
        type=float,
        default=defaults.min_face_share,
        help="smallest share of the crop's area covered by the face box (default %(default)s)",
    )
    parser.add_argument(
        "--face-backend",
        choices=("dlib", "insightface"),
        default=defaults.face_backend,
        help="detection and verification backend (default %(default)s)",
    )
    parser.add_argument(
        "--pm-version",
        type=int,
        choices=(1, 2),
        default=defaults.pm_version,
        help="2 also saves the 512-d InsightFace embedding of every image (default %(default)s)",
    )
    parser.add_argument(
        "--mask-model",
        default=None,
        help="transformers image-segmentation model (Hub id or folder) for the person masks, e.g. "
        "facebook/mask2former-swin-large-coco-panoptic; default: the offline face-and-hair mask",
    )
    parser.add_argument(
        "--mask-labels",
        default=",".join(defaults.mask_labels),
        help="comma-separated segment labels that make up the mask (default %(default)s)",
    )
    parser.add_argument(
        "--caption-model",
        default=None,
        help="transformers image-to-text model (Hub id or folder) for photos without a caption, "
        "e.g. Salesforce/blip-image-captioning-large; default: the template caption",
    )
    parser.add_argument(
        "--device", default=None, help="device of the segmentation and captioning models, e.g. cuda (default: CPU)"
    )
    parser.add_argument("--overwrite", action="store_true", help="forget earlier results in --out and start again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def run_prepare_data_command(args: argparse.Namespace) -> int:
    """Run ``prepare-data`` from parsed arguments; prints the summary line; returns the exit status."""
    config = PrepareDataConfig(
        resolution=args.resolution,
        min_face_size=args.min_face_size,
        max_second_face_ratio=args.max_second_face_ratio,
        max_id_distance=args.max_id_distance,
        min_face_share=args.min_face_share,
        class_word=args.class_word,
        trigger_word=args.trigger_word,
        pm_version=args.pm_version,
        face_backend=args.face_backend,
        mask_model=args.mask_model,
        mask_labels=tuple(label.strip() for label in args.mask_labels.split(",") if label.strip()),
        caption_model=args.caption_model,
    )
    summary = prepare_data(
        args.src, args.out, config, overwrite=args.overwrite, progress=not args.no_progress, device=args.device
    )
    print(summary.line())
    return 0
