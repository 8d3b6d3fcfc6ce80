"""The control, start-photo and style-image parameters of `/generate` through gradio_client, against a running
`python app.py --tiny` (tiny random-weight control models, offline).

Every mode makes images and records its settings in the PNG; each bad input of issue 11 is refused with a
message that says what to change, and the server keeps serving; malformed payloads name the parameter and the
format it takes. The handlers' small helpers are tested without a server at the end.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw

import app
from photomaker import app_support, presets
from photomaker.control_images import coco_to_openpose, draw_openpose
from photomaker.fields import REQUEST_FIELDS
from photomaker.metadata import read_parameters

pytest.register_assert_rewrite("app_server", "robust_app")
from app_server import AppServer, photos_payload  # noqa: E402 (after register_assert_rewrite)
from robust_app import GENERATE_PARAMETERS, call_raw, gallery_value, upload  # noqa: E402

pytest_plugins = ["app_server"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ASTRONAUT = EXAMPLES / "astronaut.png"
SIZE = 64
STEPS = 2


def generate_args(**overrides) -> dict:
    """A valid, quick `/generate` call (one 64x64 image, 2 steps); keyword overrides replace parameters."""
    args = dict(
        id_photos=photos_payload([ASTRONAUT]),
        prompt="a photo of a woman img smiling",
        num_steps=STEPS,
        num_outputs=1,
        seed=42,
        randomize_seed=False,
        width=SIZE,
        height=SIZE,
    )
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def client(app_server: AppServer):
    return app_server.client()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Drawings, masks and a faceless photo, written once."""
    folder = tmp_path_factory.mktemp("control-pictures")

    def save(name: str, image: Image.Image) -> Path:
        path = folder / name
        image.save(path)
        return path

    sketch = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(sketch).ellipse((30, 20, 98, 110), outline="black", width=4)
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((32, 16, 96, 80), fill=255)
    gradient = np.tile(np.linspace(40, 220, 160, dtype=np.uint8), (120, 1))
    return {
        "sketch": save("doodle.png", sketch),
        "mask": save("mask.png", mask),
        "black mask": save("black.png", Image.new("L", (128, 128), 0)),
        "white mask": save("white.png", Image.new("L", (128, 128), 255)),
        "no face": save("sky.png", Image.fromarray(np.stack([gradient] * 3, axis=-1))),
        "wide": save("wide.png", Image.open(ASTRONAUT).convert("RGB").resize((192, 96))),
        "strokes layer": save("layer.png", _strokes_layer()),
        "skeleton": save("skeleton.png", _skeleton()),
    }


def _strokes_layer() -> Image.Image:
    """A canvas layer as the image editor sends it: black strokes on a transparent background."""
    layer = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    ImageDraw.Draw(layer).line((10, 10, 118, 118), fill=(0, 0, 0, 255), width=5)
    return layer


def _skeleton() -> Image.Image:
    """A ready-made OpenPose skeleton of a standing person (COCO keypoints drawn in OpenPose colours)."""
    keypoints = np.array(
        [
            (64, 20),
            (60, 17),
            (68, 17),
            (56, 19),
            (72, 19),
            (50, 40),
            (78, 40),
            (44, 60),
            (84, 60),
            (40, 80),
            (88, 80),
            (54, 80),
            (74, 80),
            (54, 100),
            (74, 100),
            (54, 120),
            (74, 120),
        ],
        dtype=np.float32,
    )
    return draw_openpose((128, 128), [coco_to_openpose(keypoints, np.ones(17, dtype=np.float32))])


def generated(client, **overrides) -> tuple[dict, str]:
    """Generate one image; its stored parameters (checked to be a 64x64 PNG) and the notes shown."""
    images, seed, _, notes = client.predict(**generate_args(**overrides), api_name="/generate")
    assert len(images) == 1 and seed == 42
    with Image.open(images[0]["image"]) as image:
        assert (image.format, image.size) == ("PNG", (SIZE, SIZE))
    return read_parameters(images[0]["image"]), notes


# ------------------------------------------------------------------------------------------- the signature


def test_new_parameters_follow_the_old_ones_in_the_table_order(client) -> None:
    endpoint = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]
    names = [parameter["parameter_name"] for parameter in endpoint["parameters"]]
    assert names[: len(GENERATE_PARAMETERS)] == list(GENERATE_PARAMETERS)  # old positional calls stay valid
    new = [item.api_name for item in REQUEST_FIELDS if item.api_name not in GENERATE_PARAMETERS]
    assert names[len(GENERATE_PARAMETERS) :] == new
    assert {
        "control_type",
        "control_image",
        "control_scale",
        "init_image",
        "strength",
        "mask_image",
        "style_image",
        "style_image_scale",
        "control_start",
        "control_end",
        "mask_face",
    } <= set(new)
    optional = {parameter["parameter_name"]: parameter["parameter_has_default"] for parameter in endpoint["parameters"]}
    assert all(optional[name] for name in new), "a new parameter is required: old calls would be refused"


def test_old_positional_call_without_the_new_parameters_makes_text_to_image(client) -> None:
    positional = [generate_args().get(name) for name in GENERATE_PARAMETERS]
    defaults = {
        "negative_prompt": "",
        "style": "Photographic (Default)",
        "aspect_ratio": "Instagram (1:1)",
        "style_strength": 20,
        "guidance_scale": 5.0,
        "crop_faces": True,
        "mix_photos": [],
        "mix_strength": 0.5,
        "fast_mode": "",
        "best_of": 1,
    }
    positional = [
        defaults.get(name, value) if value is None else value
        for name, value in zip(GENERATE_PARAMETERS, positional, strict=True)
    ]
    images, seed, _, _ = client.predict(*positional, api_name="/generate")
    parameters = read_parameters(images[0]["image"])
    assert seed == 42 and parameters["control_type"] == "" and parameters["init_image"] is None


def test_old_raw_http_call_with_the_old_parameter_count_still_generates(app_server: AppServer) -> None:
    """A script posting the 18 values `/generate` took before (robust_app pins them) over plain HTTP."""
    event, outputs = call_raw(app_server.url, gallery_value(upload(app_server.url, ASTRONAUT), "astronaut.png"))
    assert event == "complete", outputs
    images, seed = outputs[0], outputs[1]
    assert len(images) == 1 and seed == 1


# ------------------------------------------------------------------------------------------ every mode


def test_canny_control_from_a_photo(client) -> None:
    parameters, _ = generated(
        client,
        control_type="canny",
        control_image=handle_file(str(ASTRONAUT)),
        control_scale=0.8,
        control_start=0.1,
        control_end=0.9,
    )
    assert parameters["control_type"] == "canny"
    assert parameters["control_image"] == "astronaut.png"  # a bare file reaches the library by path, named
    assert (parameters["control_scale"], parameters["control_start"], parameters["control_end"]) == (0.8, 0.1, 0.9)


def test_depth_control_from_a_photo(client) -> None:
    parameters, _ = generated(client, control_type="depth", control_image=handle_file(str(ASTRONAUT)))
    assert parameters["control_type"] == "depth"


def test_pose_control_from_a_ready_made_skeleton(client, pictures: dict[str, Path]) -> None:
    """The tiny random pose model finds nobody in a photo (a bad input below); a skeleton is used as it is."""
    parameters, notes = generated(client, control_type="pose", control_image=handle_file(str(pictures["skeleton"])))
    assert parameters["control_type"] == "pose" and "already an OpenPose skeleton" in notes


def test_sketch_from_a_drawing_file(client, pictures: dict[str, Path]) -> None:
    parameters, _ = generated(
        client,
        control_type="sketch",
        control_image=handle_file(str(pictures["sketch"])),
        control_scale=0.7,
        control_end=0.8,
    )
    assert (parameters["control_type"], parameters["control_scale"], parameters["control_end"]) == ("sketch", 0.7, 0.8)


def test_sketch_from_an_image_editor_value(client, pictures: dict[str, Path]) -> None:
    """What the page's canvas sends: strokes on a transparent layer, no background."""
    layer = handle_file(str(pictures["strokes layer"]))
    parameters, _ = generated(
        client,
        control_type="sketch",
        control_scale=0.7,
        control_end=0.8,
        control_image={"background": None, "layers": [layer], "composite": layer},
    )
    assert parameters["control_type"] == "sketch"


def test_null_strengths_take_the_defaults_of_the_mode(client, pictures: dict[str, Path]) -> None:
    """The sliders' API defaults are concrete numbers; null asks for the mode's own default, as the CLI does."""
    parameters, _ = generated(
        client,
        control_type="sketch",
        control_image=handle_file(str(pictures["sketch"])),
        control_scale=None,
        control_end=None,
    )
    assert (parameters["control_scale"], parameters["control_end"]) == (
        presets.SKETCH_SCALE_DEFAULT,
        presets.SKETCH_END_DEFAULT,
    )
    parameters, _ = generated(
        client, init_image=handle_file(str(ASTRONAUT)), mask_image=handle_file(str(pictures["mask"])), strength=None
    )
    assert parameters["strength"] == presets.INPAINT_STRENGTH_DEFAULT


def test_img2img_from_a_start_photo(client) -> None:
    parameters, notes = generated(client, init_image=handle_file(str(ASTRONAUT)), strength=0.75)
    assert parameters["strength"] == 0.75 and parameters["init_image"] == "astronaut.png"
    assert parameters["mask_image"] is None and "512x512" in notes  # the photo was fitted to 64x64, and said so


def test_inpaint_with_a_mask_file(client, pictures: dict[str, Path]) -> None:
    parameters, _ = generated(
        client, init_image=handle_file(str(ASTRONAUT)), mask_image=handle_file(str(pictures["mask"])), strength=0.9
    )
    assert parameters["mask_image"] == "mask.png" and parameters["strength"] == 0.9


def test_inpaint_with_the_face_masked_automatically(client) -> None:
    parameters, _ = generated(client, init_image=handle_file(str(ASTRONAUT)), mask_face=True)
    assert parameters["mask_face"] is True


def test_style_image_with_its_strength(client) -> None:
    parameters, _ = generated(client, style_image=handle_file(str(ASTRONAUT)), style_image_scale=0.4)
    assert parameters["style_image"] and parameters["style_image_scale"] == 0.4


def test_a_control_image_of_another_size_is_fitted_and_the_user_told(client, pictures: dict[str, Path]) -> None:
    _, notes = generated(client, control_type="canny", control_image=handle_file(str(pictures["wide"])))
    assert re.search(r"192x96.*64x64", notes), notes


# ------------------------------------------------------------------------------------------ bad inputs


BAD_INPUTS = {
    "control type without an image": (dict(control_type="pose"), r"needs a control image"),
    "image without a control type": (dict(control_image="astronaut"), r"no control type"),
    "empty mask": (dict(init_image="astronaut", mask_image="black mask"), r"mask is empty"),
    "all-white mask": (dict(init_image="astronaut", mask_image="white mask"), r"all white"),
    "no face with mask the face": (dict(init_image="no face", mask_face=True), r"no face was found"),
    "control with a start photo": (
        dict(control_type="canny", control_image="astronaut", init_image="astronaut"),
        r"Control \(canny\) together with a start photo is not supported",
    ),
    "mask and mask the face": (dict(init_image="astronaut", mask_image="mask", mask_face=True), r"not both"),
    "mask without a start photo": (dict(mask_image="mask"), r"needs a start photo"),
    "no person in the pose photo": (dict(control_type="pose", control_image="no face"), r"no person's pose"),
    "empty sketch": (dict(control_type="sketch", control_image="white mask"), r"sketch is empty"),
    "sketch with a start above 0": (
        dict(control_type="sketch", control_image="sketch", control_start=0.2),
        r"control_start must be 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_its_message_and_the_server_keeps_serving(
    case: str, client, app_server: AppServer, pictures: dict[str, Path]
) -> None:
    overrides, pattern = BAD_INPUTS[case]
    files = {**pictures, "astronaut": ASTRONAUT}
    overrides = {
        name: handle_file(str(files[value])) if name.endswith("_image") else value for name, value in overrides.items()
    }
    with pytest.raises(AppError) as refused:
        client.predict(**generate_args(**overrides), api_name="/generate")
    assert re.search(pattern, str(refused.value)), f"{case}: unhelpful message {refused.value}"
    assert app_server.is_alive()


MALFORMED_PAYLOADS = {
    "control image as a path string": (
        dict(control_type="canny", control_image=str(ASTRONAUT)),
        r"control_image takes one image file: handle_file\(",
    ),
    "start photo as a number": (dict(init_image=42), r"init_image takes one image file.*got 42"),
    "mask as a dict without a file": (
        dict(init_image=None, mask_image={"name": "mask"}),
        r"mask_image takes one image file",
    ),
    "style image as a list": (dict(style_image=["a.png"]), r"style_image takes one image file"),
    "unknown control type": (dict(control_type="scribble"), r"Control type: .*'scribble'"),
    "control strength as text": (dict(control_scale="strong"), r"Control strength: expected a number from 0 to 2"),
    "strength above 1": (dict(strength=1.5), r"Strength: .*1\.5"),
    "style image strength below 0": (dict(style_image_scale=-0.5), r"Style image strength: .*-0\.5"),
}


@pytest.mark.parametrize("case", list(MALFORMED_PAYLOADS))
def test_malformed_payloads_name_the_parameter_and_its_format(case: str, client, app_server: AppServer) -> None:
    overrides, pattern = MALFORMED_PAYLOADS[case]
    with pytest.raises(AppError) as refused:
        client.predict(**generate_args(**overrides), api_name="/generate")
    message = str(refused.value)
    assert "upstream Gradio app has raised an exception" not in message
    assert re.search(pattern, message, re.IGNORECASE), f"{case}: unhelpful message {message!r}"
    assert app_server.is_alive()


def test_still_generates_after_the_bad_inputs(client) -> None:
    parameters, _ = generated(client)
    assert parameters["control_type"] == ""


# -------------------------------------------------------------------------------- helpers, without a server


def test_an_untouched_canvas_is_no_image_and_a_painted_one_is_kept() -> None:
    blank = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert app_support.canvas_or_none({"background": None, "layers": [blank], "composite": blank}) is None
    assert app_support.canvas_or_none({"background": None, "layers": [], "composite": None}) is None
    painted = blank.copy()
    painted.putpixel((3, 3), (0, 0, 0, 255))
    drawing = {"background": None, "layers": [painted], "composite": painted}
    assert app_support.canvas_or_none(drawing) is drawing
    uploaded = {"background": Image.new("RGB", (32, 32)), "layers": [], "composite": None}
    assert app_support.canvas_or_none(uploaded) is uploaded  # an uploaded picture, black included
    assert app_support.canvas_or_none("photo.png") == "photo.png"


def test_an_unpainted_mask_canvas_is_an_empty_mask_but_an_uploaded_mask_is_kept() -> None:
    """The page's mask canvas shows the target photo as its background: unpainted, it is no mask at all."""
    photo = Image.new("RGBA", (32, 32), (200, 180, 160, 255))
    sent_by_the_page = {"background": photo, "layers": [], "composite": photo}
    assert app_support.canvas_or_none(sent_by_the_page, paint_only=True) == app_support.EMPTY_CANVAS
    stroke = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    stroke.putpixel((5, 5), (255, 255, 255, 255))
    painted = {**sent_by_the_page, "layers": [stroke]}
    assert app_support.canvas_or_none(painted, paint_only=True) is painted
    uploaded = {"background": Image.new("L", (32, 32)), "layers": [], "composite": None}  # a bare file via the API
    assert app_support.canvas_or_none(uploaded, paint_only=True) is uploaded


def test_sliders_restored_from_a_png_show_the_defaults_a_missing_value_stands_for() -> None:
    assert app.mode_defaults("sketch", inpaint=False) == {
        "control_scale": presets.SKETCH_SCALE_DEFAULT,
        "control_end": presets.SKETCH_END_DEFAULT,
        "strength": presets.IMG2IMG_STRENGTH_DEFAULT,
    }
    defaults = app.mode_defaults("pose", inpaint=True)
    assert (defaults["control_scale"], defaults["strength"]) == (
        presets.CONTROL_SCALE_DEFAULT,
        presets.INPAINT_STRENGTH_DEFAULT,
    )


def test_output_size_follows_width_and_height_else_the_aspect_ratio() -> None:
    assert app.output_size("Instagram (1:1)", 64, 72) == (64, 72)
    assert app.output_size("Widescreen TV / Landscape (16:9)", 0, 0) == (1024, 576)
    assert app.output_size("no such ratio", None, None) == (1024, 1024)
