"""The web app in a real browser (headless Debian chromium via playwright) against `python app.py --tiny`.

A person uploads two photos, types a prompt, presses Generate and sees the requested number of images and the
seed used; a prompt without a class word shows the library's message. Screenshots go to `artifacts/`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from photomaker import presets
from photomaker.metadata import read_parameters, save_png

pytest.register_assert_rewrite("app_server")
from app_server import REPO_ROOT, AppServer  # noqa: E402 (after register_assert_rewrite)

pytest_plugins = ["app_server"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO_ROOT / "artifacts"
EXAMPLES = REPO_ROOT / "examples"
LOAD_TIMEOUT_MS = 240_000
GENERATE_TIMEOUT_MS = 240_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian chromium is not installed (apt-get install -y chromium chromium-driver); CI installs it",
)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_server: AppServer):
    """A fresh tab on the app, once the page says the model is ready."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1250})
    page.goto(app_server.url)
    expect(page.locator("#model-status")).to_contain_text("ready", timeout=LOAD_TIMEOUT_MS)
    yield page
    page.close()


def type_number(page, elem_id: str, value: int) -> None:
    """Type a value into a number field (or a slider's number box), as a user would, until the control has
    taken it (a slider's handle moves). On a loaded machine an update that lands while typing (the face-crop
    preview, the accordion opening) can re-render the box and drop the keystrokes; a user would type again."""
    from playwright.sync_api import expect

    box = page.locator(f"#{elem_id} input[type=number]")
    handle = page.locator(f"#{elem_id} input[type=range]")
    for attempt in range(3):
        box.fill(str(value))
        box.press("Enter")
        if not handle.count():
            return
        try:
            expect(handle).to_have_value(str(value), timeout=5_000)
            return
        except AssertionError:
            if attempt == 2:
                raise


def test_upload_two_photos_generate_shows_images_and_seed(page) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#tiny-banner")).to_contain_text("noise")
    page.locator("#id-photos input[type=file]").set_input_files(
        [str(EXAMPLES / "astronaut.png"), str(EXAMPLES / "grace_hopper.jpg")]
    )
    expect(page.locator("#id-photos img")).to_have_count(2)
    expect(page.locator("#face-crops img")).to_have_count(2, timeout=60_000)  # the crops preview

    page.locator("#prompt textarea").fill("a photo of a woman img as an astronaut, studio portrait")
    page.locator("#advanced").get_by_text("Advanced options").click()
    type_number(page, "num-outputs", 3)
    # The tiny CPU models are quick only when small: 2 steps (allowed in --tiny mode) at 128x128.
    type_number(page, "num-steps", 2)
    type_number(page, "width", 128)
    type_number(page, "height", 128)
    page.locator("#generate").click()

    results = page.locator("#results .grid-container img")
    expect(results).to_have_count(3, timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#results .caption-label").first).to_contain_text("identity")
    seed_box = page.locator("#seed-used input")
    expect(seed_box).to_have_value(re.compile(r"^\d+$"))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_generate.png"), full_page=True)


def test_removing_a_photo_updates_the_face_preview(page) -> None:
    from playwright.sync_api import expect

    page.locator("#id-photos input[type=file]").set_input_files(
        [str(EXAMPLES / "astronaut.png"), str(EXAMPLES / "grace_hopper.jpg")]
    )
    expect(page.locator("#face-crops img")).to_have_count(2, timeout=60_000)
    page.locator("#id-photos img").first.hover()
    page.locator("#id-photos").get_by_role("button", name="Delete image").first.click()
    expect(page.locator("#id-photos img")).to_have_count(1)
    expect(page.locator("#face-crops img")).to_have_count(1, timeout=60_000)


def test_prompt_without_class_word_shows_its_error(page) -> None:
    from playwright.sync_api import expect

    page.locator("#id-photos input[type=file]").set_input_files([str(EXAMPLES / "astronaut.png")])
    expect(page.locator("#id-photos img")).to_have_count(1)
    page.locator("#prompt textarea").fill("a beautiful landscape with mountains at dawn")
    page.locator("#generate").click()

    error = page.locator(".toast-body", has_text="class word")
    expect(error).to_be_visible(timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#results .grid-container img")).to_have_count(0)
    page.wait_for_timeout(800)  # let the message finish fading in before the screenshot
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_prompt_error.png"))


def test_png_download_restores_its_settings(page, app_server: AppServer) -> None:
    from gradio_client import handle_file
    from playwright.sync_api import expect

    images, _, _, _ = app_server.client().predict(
        id_photos=[{"image": handle_file(str(EXAMPLES / "astronaut.png"))}],
        prompt="a photo of a woman img on a sailing boat",
        negative_prompt="rain",
        style="Cinematic",
        aspect_ratio="Instagram (1:1)",
        num_steps=3,
        style_strength=30,
        num_outputs=2,
        guidance_scale=7.5,
        seed=99,
        randomize_seed=False,
        width=64,
        height=64,
        api_name="/generate",
    )
    second = images[1]["image"]  # a downloaded result; image k of a request was made from seed + k
    stored_seed = read_parameters(second)["seed"]
    assert stored_seed in (99, 100)
    page.locator("#reproduce").get_by_text("Reproduce from a PNG").click()
    page.locator("#png-file input[type=file]").set_input_files(second)

    expect(page.locator("#prompt textarea")).to_have_value("a photo of a woman img on a sailing boat")
    page.locator("#advanced").get_by_text("Advanced options").click()
    expect(page.locator("#num-steps input[type=number]")).to_have_value("3")
    expect(page.locator("#num-outputs input[type=number]")).to_have_value("1")
    expect(page.locator("#width input[type=number]")).to_have_value("64")
    expect(page.locator("#seed input[type=number]")).to_have_value(str(stored_seed))


def _restore_from_png(page, png: str | Path) -> None:
    page.locator("#reproduce").get_by_text("Reproduce from a PNG").click()
    page.locator("#png-file input[type=file]").set_input_files(str(png))


def test_fast_mode_png_restores_and_generates(page, app_server: AppServer) -> None:
    """A fast-mode PNG stores the preset's steps and guidance (0 for SDXL-Lightning), below the sliders'
    minimums: restored as they were, the next Generate failed with "Guidance scale: Value 0.0 is less than
    minimum value 0.1"."""
    from gradio_client import handle_file
    from playwright.sync_api import expect

    images, _, _, _ = app_server.client().predict(
        id_photos=[{"image": handle_file(str(EXAMPLES / "astronaut.png"))}],
        prompt="a photo of a woman img in a forest",
        negative_prompt="",
        style="Photographic (Default)",
        aspect_ratio="Instagram (1:1)",
        num_steps=3,
        style_strength=20,
        num_outputs=1,
        guidance_scale=5,
        seed=5,
        randomize_seed=False,
        fast_mode="lightning-8",
        width=64,
        height=64,
        api_name="/generate",
    )
    png = images[0]["image"]
    assert read_parameters(png)["guidance_scale"] == 0  # what SDXL-Lightning samples with
    _restore_from_png(page, png)
    expect(page.locator("#prompt textarea")).to_have_value("a photo of a woman img in a forest")
    page.locator("#advanced").get_by_text("Advanced options").click()
    expect(page.locator("#fast-mode input")).to_have_value(presets.FAST_PRESETS["lightning-8"].label)
    expect(page.locator("#guidance-scale input[type=number]")).to_have_value(f"{presets.GUIDANCE_DEFAULT:g}")

    page.locator("#id-photos input[type=file]").set_input_files([str(EXAMPLES / "astronaut.png")])
    expect(page.locator("#id-photos img")).to_have_count(1)
    page.locator("#generate").click()
    expect(page.locator("#results .grid-container img")).to_have_count(1, timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#seed-used input")).to_have_value("5")
    expect(page.locator(".toast-body", has_text="minimum value")).to_have_count(0)


def test_out_of_range_png_values_are_clamped_and_the_user_told(page, tmp_path: Path) -> None:
    from PIL import Image
    from playwright.sync_api import expect

    png = tmp_path / "edited.png"
    save_png(
        Image.new("RGB", (64, 64)),
        png,
        {
            "prompt": "a photo of a man img",
            "seed": 11,
            "num_steps": 500,
            "guidance_scale": 50,
            "style_strength": 20,
            "style": "Photographic (Default)",
            "aspect_ratio": "Instagram (1:1)",
            "width": 64,
            "height": 64,
            "fast": None,
            "pm_version": 1,
        },
    )
    _restore_from_png(page, png)
    expect(page.locator(".toast-body", has_text="guidance scale 50")).to_be_visible()
    expect(page.locator(".toast-body", has_text="number of steps 500")).to_be_visible()
    page.locator("#advanced").get_by_text("Advanced options").click()
    expect(page.locator("#guidance-scale input[type=number]")).to_have_value(f"{presets.GUIDANCE_MAX:g}")
    expect(page.locator("#num-steps input[type=number]")).to_have_value(str(presets.STEPS_MAX))
    expect(page.locator("#seed input[type=number]")).to_have_value("11")
