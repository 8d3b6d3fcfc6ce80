"""Control images from what users have: edges, sketches, poses, depth maps and inpainting masks.

Every maker takes a PIL image (or, for drawings and masks, a Gradio ImageEditor value) and returns a PIL image
in the convention its control model was trained on. :func:`prepare_control_image` is the one entry point the
service calls: it fits the user's image to the output size (telling the user when it had to) and dispatches on
the control type. The pose and depth estimators wrap transformers models; their loading lives in
:mod:`photomaker.control_models`.

Fitting rule: a control image of another aspect ratio is **centre-cropped** to the output's aspect ratio and
then resized (``fit="crop"``, the default, so the layout fills the frame), or **padded with black** around the
resized image (``fit="pad"``, keeps everything; black means "no control" for edges, poses and sketches).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from photomaker.errors import (
    ControlImageError,
    ControlModelUnavailableError,
    IDImageError,
    MaskError,
    NoFaceError,
)
from photomaker.images import load_image

if TYPE_CHECKING:
    from photomaker.faces import FaceAnalyzer

CONTROL_TYPES: tuple[str, ...] = ("pose", "canny", "depth", "sketch")
FitMode = Literal["crop", "pad"]

DEFAULT_CANNY_LOW = 100
DEFAULT_CANNY_HIGH = 200
SKETCH_THRESHOLD = 0.5
"""The reference's v2 demo binarises the canvas at half intensity before it reaches the sketch adapter."""
ASPECT_TOLERANCE = 0.01
"""Aspect ratios within 1 % count as equal: resizing then distorts the image by less than a pixel in 100."""

# OpenPose BODY_18 order: nose, neck, r/l shoulder-elbow-wrist, r/l hip-knee-ankle, r/l eye, r/l ear.
OPENPOSE_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
COCO_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
NECK = OPENPOSE_KEYPOINT_NAMES.index("neck")
OPENPOSE_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
"""Pairs of OpenPose keypoint indices, in the order (and so with the colours) OpenPose draws them."""
OPENPOSE_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
"""RGB colour of keypoint ``i`` and of limb ``i``; limbs are drawn at 60 % of it, keypoints at full strength."""
LIMB_COLOR_FACTOR = 0.6
METRIC_DEPTH_MODEL_TYPES = frozenset({"zoedepth", "glpn", "depth_pro", "prompt_depth_anything"})
"""transformers depth models whose ``predicted_depth`` is a distance (far = large), not inverse depth."""
MIN_DISTANCE = 1e-3
"""Distances are clamped to this before inverting (bicubic upsampling can undershoot to zero or below)."""
OPENPOSE_STROKE_PER_512 = 4
"""OpenPose maps are drawn with 4 px limbs and dots on a 512 px (short side) canvas; larger maps scale them."""


@dataclass(frozen=True)
class ControlImage:
    """A control image ready for a pipeline, and what was done to the user's image to get it."""

    image: Image.Image
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Sentences for the user (resized, cropped, skeleton used as is); empty when nothing needed saying."""


@dataclass(frozen=True)
class PersonPose:
    """One person's COCO-17 keypoints in pixel coordinates of the image they were found in."""

    keypoints: np.ndarray
    """(17, 2) float (x, y) in :data:`COCO_KEYPOINT_NAMES` order."""
    scores: np.ndarray
    """(17,) confidence per keypoint."""


# ----------------------------------------------------------------------------------------------- fitting


def fit_to_size(
    image: Image.Image,
    width: int,
    height: int,
    *,
    fit: FitMode = "crop",
    what: str = "control image",
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> tuple[Image.Image, str | None]:
    """Resize ``image`` to ``width`` x ``height``; a different aspect is centre-cropped or black-padded.

    Returns the image and a note for the user when anything changed (None when it already had that size).
    """
    if width <= 0 or height <= 0:
        raise ControlImageError(f"the output size must be positive, got {width}x{height}")
    if fit not in ("crop", "pad"):
        raise ControlImageError(f"unknown fit {fit!r}; use 'crop' or 'pad'")
    source_w, source_h = image.size
    if (source_w, source_h) == (width, height):
        return image, None
    same_aspect = abs(source_w * height - source_h * width) <= ASPECT_TOLERANCE * source_h * width
    if same_aspect:
        note = f"The {what} ({source_w}x{source_h}) was resized to {width}x{height}, the output size."
        return image.resize((width, height), resample), note
    if fit == "crop":
        scale = max(width / source_w, height / source_h)
        crop_w, crop_h = round(width / scale), round(height / scale)
        left, top = (source_w - crop_w) // 2, (source_h - crop_h) // 2
        fitted = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), resample)
        note = (
            f"The {what} ({source_w}x{source_h}) has another aspect ratio than the {width}x{height} output: its "
            f"centre ({crop_w}x{crop_h}) was cropped and resized to {width}x{height}."
        )
        return fitted, note
    scale = min(width / source_w, height / source_h)
    inner_w, inner_h = max(1, round(source_w * scale)), max(1, round(source_h * scale))
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(image.resize((inner_w, inner_h), resample), ((width - inner_w) // 2, (height - inner_h) // 2))
    note = (
        f"The {what} ({source_w}x{source_h}) has another aspect ratio than the {width}x{height} output: it was "
        f"resized to {inner_w}x{inner_h} and padded with black."
    )
    return canvas, note


# ------------------------------------------------------------------------------------------------ edges


def canny_edges(
    image: Image.Image, *, low_threshold: int = DEFAULT_CANNY_LOW, high_threshold: int = DEFAULT_CANNY_HIGH
) -> Image.Image:
    """OpenCV Canny edges as white lines on black, 3 channels, as canny ControlNets were trained on."""
    import cv2

    if not 0 <= low_threshold <= high_threshold:
        raise ControlImageError(
            f"canny thresholds must satisfy 0 <= low <= high, got low={low_threshold}, high={high_threshold}"
        )
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low_threshold, high_threshold)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


# ----------------------------------------------------------------------------------- drawings and masks


def flatten_drawing(value: Any, what: str = "the drawing") -> Image.Image:
    """One image from a drawing: a PIL image, an array, a path, or a Gradio ImageEditor/Sketchpad dict.

    For the editor's ``{"background", "layers", "composite"}`` the composite is used when present, else the
    layers are composited over the background; either keeps the alpha channel, which holds the strokes when
    the canvas is transparent.
    """
    if isinstance(value, Mapping):
        composite = value.get("composite")
        if composite is not None:
            return _as_image(composite, "the canvas's composite")
        layers = _layers(value)
        background = value.get("background")
        if background is None and not layers:
            raise ControlImageError("the canvas is empty: draw on it or upload an image")
        base = (
            _as_image(background, "the canvas's background").convert("RGBA")
            if background is not None
            else Image.new("RGBA", layers[0].size)
        )
        for layer in layers:
            base.alpha_composite(layer.resize(base.size) if layer.size != base.size else layer)
        return base
    return _as_image(value, what)


def stroke_mask(drawing: Image.Image, *, strokes: Literal["dark", "light", "sparse"] = "dark") -> np.ndarray:
    """Where the drawing has strokes, as floats in [0, 1] (1 = stroke).

    An image whose alpha channel is not fully opaque is a canvas layer: its strokes are the alpha. Otherwise
    the strokes are the dark pixels (a pencil drawing), the light ones (a mask painted white), or, with
    ``"sparse"``, whichever of the two covers less of a sketch (its background is the majority).
    """
    if drawing.mode in ("RGBA", "LA", "PA") or "transparency" in drawing.info:
        alpha = np.asarray(drawing.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha.astype(np.float32) / 255.0
    luminance = np.asarray(drawing.convert("L")).astype(np.float32) / 255.0
    if strokes == "sparse":
        strokes = "light" if luminance.mean() < 0.5 else "dark"
    return 1.0 - luminance if strokes == "dark" else luminance


def sketch_to_adapter_input(
    drawing: Any, width: int | None = None, height: int | None = None, *, fit: FitMode = "crop"
) -> ControlImage:
    """The T2I sketch adapter's input: white strokes on black, binarised at 0.5, 3 channels.

    ``drawing`` is dark strokes on a light background, light strokes on a dark one (an adapter input made
    elsewhere), a transparent canvas (strokes in alpha), or an ImageEditor dict, whose painted layers are
    the strokes whatever their colour and whatever the background (an uploaded drawing without painted
    layers is read as a drawing). Raises :class:`ControlImageError` when there is no stroke.
    """
    layers = _layers(drawing) if isinstance(drawing, Mapping) else []
    painted = _painted_strokes(layers, drawing.get("background")) if layers else None
    if painted is not None and painted.any():
        mask = painted
    else:
        mask = stroke_mask(flatten_drawing(drawing), strokes="sparse")
    grey = Image.fromarray((mask * 255.0).round().astype(np.uint8), mode="L")
    notes: list[str] = []
    if width is not None and height is not None:
        grey, note = fit_to_size(grey, width, height, fit=fit, what="sketch", resample=Image.Resampling.BILINEAR)
        notes += [note] if note else []
    binary = np.asarray(grey).astype(np.float32) / 255.0 > SKETCH_THRESHOLD
    if not binary.any():
        raise ControlImageError(
            "the sketch is empty: draw dark strokes on a light background (or on the transparent canvas)"
        )
    white_on_black = np.where(binary, 255, 0).astype(np.uint8)
    return ControlImage(Image.fromarray(np.stack([white_on_black] * 3, axis=-1)), tuple(notes))


def check_mask(mask: Image.Image) -> Image.Image:
    """An inpainting mask as L with 255 = regenerate; refuses masks that would do nothing or everything."""
    grey = np.asarray(mask.convert("L"))
    selected = grey >= 128
    if not selected.any():
        raise MaskError(
            "the mask is empty (nothing painted, or all black): paint the region to regenerate (white on a "
            "black mask image), or use 'mask the face'"
        )
    if selected.all():
        raise MaskError(
            "the mask is all white, so the whole photo would be regenerated: paint only the region to change, "
            "or use img2img (no mask) instead"
        )
    return Image.fromarray(grey, mode="L")


def prepare_mask(mask: Any, width: int, height: int, *, fit: FitMode = "crop") -> ControlImage:
    """A user's mask at the output size: L, 255 = regenerate.

    Accepts a white-on-black image, a transparent canvas whose strokes are in alpha, or an ImageEditor dict.
    For the dict, the strokes painted on its layers are the mask (the background is the target photo the
    user painted over, never a mask); a dict without layers carries an uploaded mask image as its background.
    Raises :class:`MaskError` for an empty or all-white mask.
    """
    layers = _layers(mask) if isinstance(mask, Mapping) else []
    if layers:
        values = _painted_strokes(layers, mask.get("background"))
    else:
        source = mask.get("background") if isinstance(mask, Mapping) else mask
        if source is None:
            raise MaskError("the mask is empty: paint the region to regenerate, or use 'mask the face'")
        values = stroke_mask(flatten_drawing(source), strokes="light")
    grey = Image.fromarray((values * 255.0).round().astype(np.uint8), mode="L")
    grey, note = fit_to_size(grey, width, height, fit=fit, what="mask", resample=Image.Resampling.BILINEAR)
    return ControlImage(check_mask(grey), (note,) if note else ())


def _layers(value: Mapping[str, Any]) -> list[Image.Image]:
    """An ImageEditor value's layers as RGBA, transparent where nothing was painted.

    An editor with ``image_mode="RGB"`` drops the layers' alpha and leaves black where the layer was
    transparent, so a layer without alpha counts its non-black pixels as painted.
    """
    layers = []
    for raw in value.get("layers") or ():
        layer = _as_image(raw, "a canvas layer")
        if layer.mode != "RGBA":
            rgb = np.asarray(layer.convert("RGB"))
            alpha = np.where(rgb.any(axis=-1), 255, 0).astype(np.uint8)
            layer = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
        layers.append(layer)
    return layers


def _painted_strokes(layers: Sequence[Image.Image], background: Any) -> np.ndarray:
    """The union of an ImageEditor value's painted strokes in [0, 1], at the background's size."""
    size = _as_image(background, "the canvas's background").size if background is not None else layers[0].size
    alphas = [np.asarray(layer.resize(size) if layer.size != size else layer)[..., 3] for layer in layers]
    return np.max(alphas, axis=0).astype(np.float32) / 255.0


def face_mask(
    image_size: tuple[int, int],
    face_bbox: Sequence[float],
    *,
    region: Literal["face", "face_and_hair"] = "face",
    grow: float = 0.15,
    feather: float = 0.1,
) -> Image.Image:
    """An inpainting mask (L, 255 = regenerate) covering a face box: an ellipse grown and feathered.

    ``grow`` widens the box by that fraction of its size on every side, so that jaw and forehead are
    included; ``"face_and_hair"`` also extends it upwards by 60 % and sideways by 25 % of the face's size.
    ``feather`` is the blur radius as a fraction of the face's size, so the new face blends into the photo.
    The fully-covered core keeps the grown box (feathering spreads outwards).
    """
    width, height = image_size
    x0, y0, x1, y1 = (float(v) for v in face_bbox)
    face_w, face_h = x1 - x0, y1 - y0
    if face_w <= 0 or face_h <= 0:
        raise MaskError(f"the face box {tuple(face_bbox)} is empty: x1 must exceed x0 and y1 must exceed y0")
    if grow < 0 or feather < 0:
        raise MaskError(f"grow and feather must be >= 0, got grow={grow}, feather={feather}")
    if region not in ("face", "face_and_hair"):
        raise MaskError(f"unknown face mask region {region!r}; use 'face' or 'face_and_hair'")
    top_extra = 0.6 if region == "face_and_hair" else 0.0
    side_extra = 0.25 if region == "face_and_hair" else 0.0
    box = (
        x0 - (grow + side_extra) * face_w,
        y0 - (grow + top_extra) * face_h,
        x1 + (grow + side_extra) * face_w,
        y1 + grow * face_h,
    )
    radius = feather * max(face_w, face_h)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    if radius > 0:
        # Dilate by the blur radius first, so the blur's 50 % line sits outside the grown ellipse.
        size = 2 * math.ceil(radius) + 1
        mask = mask.filter(ImageFilter.MaxFilter(size)).filter(ImageFilter.GaussianBlur(radius / 2))
    return mask


def mask_face(
    photo: Image.Image,
    analyzer: FaceAnalyzer,
    *,
    region: Literal["face", "face_and_hair"] = "face",
    grow: float = 0.15,
    feather: float = 0.1,
) -> Image.Image:
    """The "mask the face" button: :func:`face_mask` around the largest face the analyzer finds in ``photo``.

    Raises :class:`NoFaceError` when the target photo has no face.
    """
    rgb = np.asarray(photo.convert("RGB"))
    faces = analyzer.detect(rgb)
    if not faces:
        raise NoFaceError(
            "no face was found in the target photo, so 'mask the face' has nothing to mask: draw the mask "
            "yourself, or use a photo where the face is visible and at least about 80 pixels wide"
        )
    largest = faces[0]  # analyzers return faces largest first
    return face_mask(photo.size, largest.bbox, region=region, grow=grow, feather=feather)


# ------------------------------------------------------------------------------------------------- pose


def coco_to_openpose(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO-17 keypoints and scores -> OpenPose-18; the neck is the shoulders' midpoint (their lower score)."""
    keypoints = np.asarray(keypoints, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if keypoints.shape != (len(COCO_KEYPOINT_NAMES), 2) or scores.shape != (len(COCO_KEYPOINT_NAMES),):
        raise ControlImageError(
            f"expected 17 COCO keypoints (17, 2) and scores (17,), got {keypoints.shape} and {scores.shape}"
        )
    out_points = np.zeros((len(OPENPOSE_KEYPOINT_NAMES), 2), dtype=np.float32)
    out_scores = np.zeros(len(OPENPOSE_KEYPOINT_NAMES), dtype=np.float32)
    for index, name in enumerate(OPENPOSE_KEYPOINT_NAMES):
        if index == NECK:
            left, right = COCO_KEYPOINT_NAMES.index("left_shoulder"), COCO_KEYPOINT_NAMES.index("right_shoulder")
            out_points[index] = (keypoints[left] + keypoints[right]) / 2
            out_scores[index] = min(scores[left], scores[right])
        else:
            coco_index = COCO_KEYPOINT_NAMES.index(name)
            out_points[index] = keypoints[coco_index]
            out_scores[index] = scores[coco_index]
    return out_points, out_scores


def draw_openpose(
    image_size: tuple[int, int],
    people: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    score_threshold: float = 0.3,
    stick_width: int | None = None,
    keypoint_radius: int | None = None,
) -> Image.Image:
    """OpenPose skeletons on black: limbs as filled ellipses at 60 % colour, then keypoints as full-colour dots.

    ``people`` holds (OpenPose-18 keypoints (18, 2), scores (18,)) per person; keypoints scoring below
    ``score_threshold`` and limbs touching them are left out, as OpenPose does. Limb half-width and dot
    radius default to 4 px per 512 px of the short side, the thickness pose ControlNets were trained on.
    """
    import cv2

    width, height = image_size
    default_stroke = max(1, round(OPENPOSE_STROKE_PER_512 * min(width, height) / 512))
    stick_width = stick_width or default_stroke
    keypoint_radius = keypoint_radius or default_stroke
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    # Python floats (tolist), so that round() gives the ints OpenCV wants.
    skeletons = [
        (np.asarray(points, dtype=np.float64).tolist(), np.asarray(scores) >= score_threshold)
        for points, scores in people
    ]
    # Every person's limbs first, then every keypoint, so no limb covers anyone's joints (as OpenPose draws).
    for points, visible in skeletons:
        for limb_index, (a, b) in enumerate(OPENPOSE_LIMBS):
            if not (visible[a] and visible[b]):
                continue
            (xa, ya), (xb, yb) = points[a], points[b]
            length = math.hypot(xb - xa, yb - ya)
            angle = math.degrees(math.atan2(yb - ya, xb - xa))
            centre = (round((xa + xb) / 2), round((ya + yb) / 2))
            polygon = cv2.ellipse2Poly(centre, (round(length / 2), stick_width), round(angle), 0, 360, 1)
            color = tuple(int(c * LIMB_COLOR_FACTOR) for c in OPENPOSE_COLORS[limb_index])
            cv2.fillConvexPoly(canvas, polygon, color)
    for points, visible in skeletons:
        for index, (x, y) in enumerate(points):
            if visible[index]:
                cv2.circle(canvas, (round(x), round(y)), keypoint_radius, OPENPOSE_COLORS[index], -1)
    return Image.fromarray(canvas)


def looks_like_pose_skeleton(image: Image.Image) -> bool:
    """True for a ready-made OpenPose map: mostly black, and what is not black is saturated colour.

    Canny maps (white on black) and photos fail the test, so they go through pose estimation instead.
    """
    rgb = np.asarray(image.convert("RGB")).astype(np.int16)
    brightest = rgb.max(axis=-1)
    lit = brightest > 32
    if lit.mean() > 0.4 or not lit.any():
        return False
    saturation = (brightest - rgb.min(axis=-1))[lit] / brightest[lit]
    return float((saturation > 0.6).mean()) > 0.8


class _TransformersVisionModel:
    """A transformers vision model with its image processor, run on the model's own device and dtype."""

    def __init__(self, model: torch.nn.Module, processor: Any):
        self.model = model
        self.processor = processor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> _TransformersVisionModel:
        self.model.to(device=device, dtype=dtype)
        return self

    def _run(self, inputs: Mapping[str, torch.Tensor]) -> Any:
        """The model's output for the processor's ``pixel_values``, moved to where the model's weights are."""
        parameter = next(self.model.parameters())
        pixel_values = inputs["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
        with torch.inference_mode():
            return self.model(pixel_values=pixel_values)


class PersonDetector(_TransformersVisionModel):
    """Finds people with a transformers object detector (e.g. RT-DETR on COCO), for top-down pose models."""

    def __init__(self, model: torch.nn.Module, processor: Any, threshold: float = 0.5):
        labels = {int(index): str(name).lower() for index, name in model.config.id2label.items()}
        if "person" not in labels.values():
            raise ControlModelUnavailableError(
                f"the person detector {model.config.name_or_path!r} has no 'person' class: use a COCO detector "
                "(PHOTOMAKER_PERSON_DETECTOR), or 'none' to take the whole photo as the person's box"
            )
        super().__init__(model, processor)
        self.threshold = threshold
        self.person_labels = {index for index, name in labels.items() if name == "person"}

    def detect(self, image: Image.Image) -> list[tuple[float, float, float, float]]:
        """(x0, y0, x1, y1) of each person scoring at least ``threshold``, most confident first."""
        outputs = self._run(self.processor(images=image.convert("RGB"), return_tensors="pt"))
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        result = self.processor.post_process_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(image.height, image.width)]
        )[0]
        people = [
            (score, tuple(float(v) for v in box))
            for score, label, box in zip(
                result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist(), strict=True
            )
            if int(label) in self.person_labels
        ]
        return [box for _, box in sorted(people, key=lambda item: -item[0])]


class PoseEstimator(_TransformersVisionModel):
    """Finds people's keypoints with a transformers ViTPose model (COCO-17), in the person boxes it is given.

    ViTPose is top-down: it needs a box per person. With a ``detector`` the boxes are its person detections;
    without one, the caller's boxes or the whole image are used (right for the usual single-person photo).
    """

    def __init__(self, model: torch.nn.Module, processor: Any, detector: PersonDetector | None = None):
        super().__init__(model, processor)
        self.detector = detector

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PoseEstimator:
        super().to(device, dtype)
        if self.detector is not None:
            self.detector.to(device, dtype)
        return self

    def person_boxes(self, image: Image.Image) -> list[tuple[float, float, float, float]]:
        """(x0, y0, x1, y1) of each detected person, or the whole image when there is no detector."""
        if self.detector is None:
            return [(0.0, 0.0, float(image.width), float(image.height))]
        return self.detector.detect(image)

    def estimate(self, image: Image.Image, boxes: Sequence[Sequence[float]] | None = None) -> list[PersonPose]:
        """COCO-17 keypoints of each person in ``image``; ``boxes`` (x0, y0, x1, y1) skip the detector."""
        image = image.convert("RGB")
        xyxy = [tuple(float(v) for v in box) for box in boxes] if boxes is not None else self.person_boxes(image)
        if not xyxy:
            return []
        coco_boxes = [[[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in xyxy]]
        outputs = self._run(self.processor(image, boxes=coco_boxes, return_tensors="pt"))
        outputs.heatmaps = outputs.heatmaps.float()
        results = self.processor.post_process_pose_estimation(outputs, boxes=coco_boxes)[0]
        return [
            PersonPose(keypoints=result["keypoints"].cpu().numpy(), scores=result["scores"].cpu().numpy())
            for result in results
        ]


def pose_map(
    photo: Image.Image,
    estimator: PoseEstimator,
    *,
    boxes: Sequence[Sequence[float]] | None = None,
    score_threshold: float = 0.3,
) -> Image.Image:
    """An OpenPose-convention skeleton map of the people in ``photo``, the size of ``photo``.

    Raises :class:`ControlImageError` when no person (no keypoint above the threshold) is found.
    """
    people = estimator.estimate(photo, boxes=boxes)
    converted = [coco_to_openpose(person.keypoints, person.scores) for person in people]
    if not any((scores >= score_threshold).any() for _, scores in converted):
        raise ControlImageError(
            "no person's pose was found in the pose image: use a photo where the body is visible, or a "
            "ready-made OpenPose skeleton (coloured limbs on black)"
        )
    return draw_openpose(photo.size, converted, score_threshold=score_threshold)


# ------------------------------------------------------------------------------------------------ depth


class DepthEstimator(_TransformersVisionModel):
    """Depth with a transformers depth model (DPT, Depth Anything, ...), as inverse depth: near = large.

    Relative models (MiDaS DPT, Depth Anything "relative") already predict inverse depth; metric ones
    (Depth Anything "metric", ZoeDepth, GLPN, Depth Pro) predict distance, which is inverted here, so that
    the depth map is near = white whichever model ``PHOTOMAKER_DEPTH_MODEL`` names.
    """

    def __init__(self, model: torch.nn.Module, processor: Any):
        super().__init__(model, processor)
        config = model.config
        self.predicts_distance = (
            getattr(config, "depth_estimation_type", None) == "metric" or config.model_type in METRIC_DEPTH_MODEL_TYPES
        )

    def estimate(self, image: Image.Image) -> np.ndarray:
        """(height, width) float32 inverse depth (larger = nearer, relative scale), at the image's size."""
        image = image.convert("RGB")
        outputs = self._run(self.processor(images=image, return_tensors="pt"))
        depth = outputs.predicted_depth.float().unsqueeze(1)
        depth = torch.nn.functional.interpolate(depth, size=(image.height, image.width), mode="bicubic")
        if self.predicts_distance:
            depth = 1.0 / depth.clamp_min(MIN_DISTANCE)
        return depth[0, 0].cpu().numpy()


def depth_map(photo: Image.Image, estimator: DepthEstimator) -> Image.Image:
    """The depth ControlNet's input: depth min-max normalised to 0-255, 3 channels, the size of ``photo``."""
    depth = estimator.estimate(photo)
    low, high = float(depth.min()), float(depth.max())
    scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
    grey = (scaled * 255.0).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1))


# ----------------------------------------------------------------------------------------------- entry


def prepare_control_image(
    control_type: str,
    image: Any,
    width: int,
    height: int,
    *,
    fit: FitMode = "crop",
    pose_estimator: PoseEstimator | None = None,
    depth_estimator: DepthEstimator | None = None,
    canny_low: int = DEFAULT_CANNY_LOW,
    canny_high: int = DEFAULT_CANNY_HIGH,
) -> ControlImage:
    """The control image for ``control_type`` from the user's image, at ``width`` x ``height``, with notes.

    The user's image is fitted to the output size first (see the module docstring), so edges and skeletons
    are drawn at the output's resolution. A ready-made OpenPose skeleton is used as is for ``"pose"``.
    """
    if control_type not in CONTROL_TYPES:
        raise ControlImageError(f"unknown control type {control_type!r}; choose one of {', '.join(CONTROL_TYPES)}")
    if image is None:
        raise ControlImageError(f"control type {control_type!r} needs a control image: upload or draw one")
    if control_type == "sketch":
        return sketch_to_adapter_input(image, width, height, fit=fit)
    picture = flatten_drawing(image, what="the control image").convert("RGB")
    fitted, note = fit_to_size(picture, width, height, fit=fit)
    notes = [note] if note else []
    if control_type == "canny":
        return ControlImage(canny_edges(fitted, low_threshold=canny_low, high_threshold=canny_high), tuple(notes))
    if control_type == "pose":
        if looks_like_pose_skeleton(picture):
            notes.append("The pose image is already an OpenPose skeleton, so it was used as is.")
            return ControlImage(fitted, tuple(notes))
        if pose_estimator is None:
            raise ControlImageError("a pose estimator is needed to find the pose in a photo; none was given")
        return ControlImage(pose_map(fitted, pose_estimator), tuple(notes))
    if depth_estimator is None:
        raise ControlImageError("a depth estimator is needed to make a depth map; none was given")
    return ControlImage(depth_map(fitted, depth_estimator), tuple(notes))


def _as_image(value: Any, what: str) -> Image.Image:
    """A decoded image with ``load_image``'s limits, keeping the alpha channel that holds a canvas's strokes."""
    try:
        return load_image(value, name=what, keep_alpha=True)
    except IDImageError as exc:
        raise ControlImageError(str(exc)) from exc
