"""Helpers for the face tests: example photos, synthetic images, and tiny ONNX stand-ins for buffalo_l.

The stand-ins have the real models' interfaces (SCRFD det_10g: 1x3xSxS in, 9 outputs for strides 8/16/32
with 2 anchors per location; ArcFace w600k_r50: 1x3x112x112 in, 1x512 out) and simple, known behaviour, so
the pre-processing, decoding, alignment and embedding code can be checked exactly without the real files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ASTRONAUT = EXAMPLES / "astronaut.png"
GRACE_HOPPER = EXAMPLES / "grace_hopper.jpg"

MARKER_THRESHOLD = 0.9
"""The synthetic detector fires where a stride cell holds a pixel whose red value, normalised as SCRFD's
input, exceeds this (red above ~243): a pure red square marks "the face"."""


@dataclass
class SyntheticDetector:
    """What the synthetic SCRFD model outputs wherever it sees a red marker (on the active stride only)."""

    stride: int = 32
    distances: tuple[float, float, float, float] = (1.0, 1.5, 1.0, 2.0)  # left, top, right, bottom / stride
    offsets: tuple[tuple[float, float], ...] = field(
        default=((-0.5, -0.5), (0.5, -0.5), (0.0, 0.2), (-0.4, 0.9), (0.4, 0.9))  # keypoints / stride
    )
    max_input_size: int = 100_000
    """No output at all for inputs larger than this (to exercise the detection-size fallback)."""


def build_scrfd_model(path: Path, spec: SyntheticDetector) -> None:
    """Write an ONNX model with det_10g's input and 9 outputs whose scores mark red areas of the input."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    const("ch_start", np.array([0], np.int64))
    const("ch_end", np.array([1], np.int64))
    const("ch_axis", np.array([1], np.int64))
    nodes.append(helper.make_node("Slice", ["input.1", "ch_start", "ch_end", "ch_axis"], ["red"]))
    # gate = clip(max_input_size + 1 - S, 0, 1): 1 when the input is small enough, else 0
    nodes.append(helper.make_node("Shape", ["input.1"], ["shape"]))
    nodes.append(helper.make_node("Gather", ["shape", const("idx3", np.array(3, np.int64))], ["side_i"]))
    nodes.append(helper.make_node("Cast", ["side_i"], ["side"], to=TensorProto.FLOAT))
    nodes.append(
        helper.make_node("Sub", [const("limit", np.array(spec.max_input_size + 1.0, np.float32)), "side"], ["room"])
    )
    nodes.append(
        helper.make_node(
            "Clip", ["room", const("zero", np.array(0, np.float32)), const("one", np.array(1, np.float32))], ["gate"]
        )
    )
    const("flat1", np.array([-1, 1], np.int64))
    const("flat4", np.array([-1, 4], np.int64))
    const("flat10", np.array([-1, 10], np.int64))
    outputs = {"score": [], "bbox": [], "kps": []}
    for stride in (8, 16, 32):
        s = f"s{stride}"
        active = 1.0 if stride == spec.stride else 0.0
        nodes.append(
            helper.make_node("MaxPool", ["red"], [f"{s}_pool"], kernel_shape=[stride, stride], strides=[stride, stride])
        )
        nodes.append(
            helper.make_node("Sub", [f"{s}_pool", const(f"{s}_t", np.array(MARKER_THRESHOLD, np.float32))], [f"{s}_d"])
        )
        nodes.append(helper.make_node("Mul", [f"{s}_d", const(f"{s}_gain", np.array(50.0, np.float32))], [f"{s}_g"]))
        nodes.append(helper.make_node("Sigmoid", [f"{s}_g"], [f"{s}_sig"]))
        nodes.append(
            helper.make_node("Mul", [f"{s}_sig", const(f"{s}_on", np.array(active, np.float32))], [f"{s}_on_sig"])
        )
        nodes.append(helper.make_node("Mul", [f"{s}_on_sig", "gate"], [f"{s}_map"]))  # [1,1,h,w]
        nodes.append(helper.make_node("Mul", [f"{s}_pool", "zero"], [f"{s}_zeros"]))
        for kind, values in (
            ("score", None),
            ("bbox", np.array(spec.distances, np.float32)),
            ("kps", np.array(spec.offsets, np.float32).ravel()),
        ):
            if values is None:
                source, width = f"{s}_map", 1
            else:
                width = values.size
                nodes.append(
                    helper.make_node(
                        "Add",
                        [f"{s}_zeros", const(f"{s}_{kind}_v", values.reshape(1, width, 1, 1))],
                        [f"{s}_{kind}_map"],
                    )
                )
                source = f"{s}_{kind}_map"
            # [1,C,h,w] -> [1,h,w,1,C] -> two anchors [1,h,w,2,C] -> [N, C], anchor index fastest
            nodes.append(helper.make_node("Transpose", [source], [f"{s}_{kind}_t"], perm=[0, 2, 3, 1]))
            nodes.append(
                helper.make_node(
                    "Unsqueeze", [f"{s}_{kind}_t", const(f"{s}_{kind}_ax", np.array([3], np.int64))], [f"{s}_{kind}_u"]
                )
            )
            nodes.append(helper.make_node("Concat", [f"{s}_{kind}_u", f"{s}_{kind}_u"], [f"{s}_{kind}_a"], axis=3))
            out = f"{kind}_{stride}"
            nodes.append(helper.make_node("Reshape", [f"{s}_{kind}_a", f"flat{width}"], [out]))
            outputs[kind].append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [f"N{stride}", width]))
    graph = helper.make_graph(
        nodes,
        "synthetic_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "S", "S"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        initializer=inits,
    )
    _save(graph, path)


def recogniser_weights(seed: int = 0) -> np.ndarray:
    """The fixed linear map of the synthetic ArcFace: 14x14 average-pooled input (3*8*8 = 192) -> 512."""
    return np.random.default_rng(seed).normal(0.0, 1.0, (192, 512)).astype(np.float32)


def build_arcface_model(path: Path, seed: int = 0) -> None:
    """Write an ONNX model with w600k_r50's interface: 1x3x112x112 -> 1x512, a fixed linear map."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[14, 14], strides=[14, 14]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "weights"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["B", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["B", 512])],
        initializer=[numpy_helper.from_array(recogniser_weights(seed), "weights")],
    )
    _save(graph, path)


def expected_embedding(chip: np.ndarray, seed: int = 0) -> np.ndarray:
    """What the synthetic ArcFace must output for an aligned RGB chip, computed independently in numpy."""
    normalised = (chip.astype(np.float64) - 127.5) / 127.5  # HxWx3, RGB, as the network expects
    pooled = normalised.reshape(8, 14, 8, 14, 3).mean(axis=(1, 3))  # 8x8x3
    return pooled.transpose(2, 0, 1).reshape(-1) @ recogniser_weights(seed).astype(np.float64)


def _save(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def red_marker_image(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A black RGB image with a pure red rectangle (x0, y0, x1, y1): "the face" for the synthetic detector."""
    image = np.zeros((height, width, 3), np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1, 0] = 255
    return image
