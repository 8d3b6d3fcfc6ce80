"""The app's `/generate` API through gradio_client, against a running `python app.py --tiny`.

One valid call returns the requested images (PNG files carrying their parameters) and the seed used; every bad
input is refused with a message that says what is wrong, and the server keeps serving afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gradio_client.exceptions import AppError
from PIL import Image

from photomaker.metadata import read_parameters

pytest.register_assert_rewrite("app_server")
from app_server import AppServer, photos_payload  # noqa: E402 (after register_assert_rewrite)

pytest_plugins = ["app_server"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ASTRONAUT = EXAMPLES / "astronaut.png"
HOPPER = EXAMPLES / "grace_hopper.jpg"
# The tiny models accept any step count from 1, and their time grows fast with the size: keep both small.
SIZE = 64
STEPS = 2


def generate_args(**overrides) -> dict:
    """A valid, quick `/generate` call; keyword overrides replace single parameters."""
    args = dict(
        id_photos=photos_payload([ASTRONAUT]),
        prompt="a photo of a woman img smiling",
        negative_prompt="blurry",
        style="Photographic (Default)",
        aspect_ratio="Instagram (1:1)",
        num_steps=STEPS,
        style_strength=20,
        num_outputs=2,
        guidance_scale=5.0,
        seed=1234,
        randomize_seed=False,
        width=SIZE,
        height=SIZE,
    )
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def client(app_server: AppServer):
    return app_server.client()


def test_valid_generate_returns_images_then_seed(client) -> None:
    images, seed, crops, notes = client.predict(
        **generate_args(id_photos=photos_payload([ASTRONAUT, HOPPER]), num_outputs=3), api_name="/generate"
    )
    assert seed == 1234
    assert len(images) == 3
    stored = []
    for item in images:
        assert item["caption"].startswith("identity")
        with Image.open(item["image"]) as image:
            assert image.format == "PNG"
            assert image.size == (SIZE, SIZE)
        stored.append(read_parameters(item["image"]))  # what a downloaded PNG carries
    assert sorted(p["seed"] for p in stored) == [1234, 1235, 1236]  # image k is remade alone from seed + k
    for parameters in stored:
        assert parameters["prompt"] == "a photo of a woman img smiling"
        assert parameters["negative_prompt"] == "blurry"
        assert (parameters["num_steps"], parameters["guidance_scale"], parameters["style_strength"]) == (STEPS, 5, 20)
        assert parameters["style"] == "Photographic (Default)"
        assert (parameters["width"], parameters["height"]) == (SIZE, SIZE)
        assert parameters["pm_version"] == 1 and parameters["base_model"]
    assert len(crops) == 2  # the two ID photos as the encoder saw them
    assert "woman img smiling" in notes


@pytest.mark.parametrize("preset", ["lightning-8", "hyper-sd-8"])
def test_fast_mode_runs_offline_in_tiny_mode(client, preset: str) -> None:
    images, seed, _, notes = client.predict(**generate_args(fast_mode=preset, num_outputs=1), api_name="/generate")
    parameters = read_parameters(images[0]["image"])
    assert (parameters["fast"], parameters["num_steps"], parameters["seed"]) == (preset, 8, seed)
    # Only the guidance-free preset ignores the negative prompt, and the page says so.
    assert ("negative prompt has no effect" in notes) == (preset == "lightning-8")


def test_randomized_seed_is_reported(client) -> None:
    _, seed, _, _ = client.predict(**generate_args(num_outputs=1, randomize_seed=True), api_name="/generate")
    assert isinstance(seed, (int, float)) and 0 <= seed < 2**31


def test_missing_trigger_is_inserted_and_reported(client) -> None:
    images, _, _, notes = client.predict(
        **generate_args(prompt="a photo of a woman in a garden", num_outputs=1), api_name="/generate"
    )
    assert len(images) == 1
    assert "woman img in a garden" in notes


def _not_an_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "holiday.jpg"
    path.write_text("this is a text file, not a photo")
    return path


BAD_INPUTS = {
    "no photos": (dict(id_photos=[]), r"photo"),
    "five photos": (dict(id_photos=photos_payload([ASTRONAUT, HOPPER, ASTRONAUT, HOPPER, ASTRONAUT])), r"4"),
    "not an image": ("not-an-image", r"holiday\.jpg"),
    "steps too high": (dict(num_steps=1000), r"1000"),
    "steps zero": (dict(num_steps=0), r"\b0\b"),
    "guidance too high": (dict(guidance_scale=50), r"50"),
    "guidance negative": (dict(guidance_scale=-1), r"-1"),
    "unknown style": (dict(style="Baroque Nightmare"), r"Baroque Nightmare"),
    "unknown aspect ratio": (dict(aspect_ratio="Square (1:1)", width=0, height=0), r"Square \(1:1\)"),
    "size not a multiple of 8": (dict(width=100), r"multiple of 8"),
    "size too small": (dict(width=16), r"width.*16"),
    "no class word": (dict(prompt="a beautiful landscape with mountains"), r"class word"),
    "two triggers": (dict(prompt="a man img and a woman img"), r"img"),
    "empty prompt": (dict(prompt="   "), r"[Pp]rompt"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_specific_error_and_server_keeps_serving(
    case: str, client, app_server: AppServer, tmp_path_factory
) -> None:
    overrides, pattern = BAD_INPUTS[case]
    if overrides == "not-an-image":
        overrides = dict(id_photos=photos_payload([_not_an_image(tmp_path_factory)]))
    with pytest.raises(AppError) as refused:
        client.predict(**generate_args(**overrides), api_name="/generate")
    message = str(refused.value)
    assert re.search(pattern, message), f"{case}: unhelpful message {message!r}"
    assert app_server.is_alive()


def test_still_generates_after_bad_inputs(client) -> None:
    images, seed, _, _ = client.predict(**generate_args(num_outputs=1, seed=7), api_name="/generate")
    assert len(images) == 1 and seed == 7


def test_helper_events_are_hidden_from_the_api(client) -> None:
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(endpoints) == ["/generate"]
    parameters = [p["parameter_name"] for p in endpoints["/generate"]["parameters"]]
    assert parameters[:11] == [
        "id_photos",
        "prompt",
        "negative_prompt",
        "style",
        "aspect_ratio",
        "num_steps",
        "style_strength",
        "num_outputs",
        "guidance_scale",
        "seed",
        "randomize_seed",
    ]


def test_bare_files_and_file_caption_pairs_are_accepted_as_photos(client) -> None:
    """`id_photos=[handle_file(path)]` is the first thing a gradio_client user tries."""
    from gradio_client import handle_file

    for photos in (
        [handle_file(str(ASTRONAUT)), handle_file(str(HOPPER))],
        [[handle_file(str(ASTRONAUT)), "me"], [handle_file(str(HOPPER)), None]],
    ):
        images, _, crops, _ = client.predict(**generate_args(id_photos=photos, num_outputs=1), api_name="/generate")
        assert len(images) == 1 and len(crops) == 2


MALFORMED_PAYLOADS = {
    "a path string instead of a list": (dict(id_photos=str(ASTRONAUT)), r"id_photos takes a list of image files"),
    "a bare path in the list": (dict(id_photos=[str(ASTRONAUT)]), r"handle_file\('me\.jpg'\)"),
    "a dict without a path": (dict(id_photos=[{"caption": "me"}]), r"\{'image': handle_file"),
    "a number in the list": (dict(id_photos=[42]), r"got 42 in the list"),
    "second person as a string": (dict(mix_photos="someone.jpg"), r"mix_photos takes a list of image files"),
    # The --tiny app takes steps from 1, and the message says so.
    "steps as text": (dict(num_steps="many"), r"Sampling steps: expected a whole number from 1 to 100"),
    "seed as a list": (dict(seed=[1, 2]), r"Seed: expected a whole number"),
}


@pytest.mark.parametrize("case", list(MALFORMED_PAYLOADS))
def test_malformed_payloads_get_a_message_showing_the_expected_format(case: str, client, app_server: AppServer) -> None:
    overrides, pattern = MALFORMED_PAYLOADS[case]
    with pytest.raises(AppError) as refused:
        client.predict(**generate_args(**overrides), api_name="/generate")
    message = str(refused.value)
    assert "upstream Gradio app has raised an exception" not in message
    assert re.search(pattern, message), f"{case}: unhelpful message {message!r}"
    assert app_server.is_alive()
