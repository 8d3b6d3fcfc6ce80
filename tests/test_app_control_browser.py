"""The Control and Start-from-a-photo sections in a real browser (headless Debian chromium via playwright)
against `python app.py --tiny`.

A person opens the Control section, picks sketch, draws a doodle on the canvas with the mouse, generates, and
sees the result and the control map it used; a target photo in inpaint mode without a painted mask shows the
library's message, and "Show the face mask" shows the mask and turns "mask the face" on. Every wait is on
visible state, so a slow machine only makes it slower. Screenshots go to `artifacts/`.
"""

from __future__ import annotations

import re

import pytest

pytest.register_assert_rewrite("app_server")
import test_app_browser as app_browser  # noqa: E402 (after register_assert_rewrite)
from app_server import REPO_ROOT  # noqa: E402
from test_app_browser import ARTIFACTS, CHROMIUM, GENERATE_TIMEOUT_MS, type_number  # noqa: E402

browser, page = app_browser.browser, app_browser.page  # the same fixtures: a tab on the app, once it is ready
pytest_plugins = ["app_server"]

EXAMPLES = REPO_ROOT / "examples"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian chromium is not installed (apt-get install -y chromium chromium-driver); CI installs it",
)


def quick_settings(page, size: int = 64) -> None:
    """One photo, a prompt, and the tiny models' quick settings: 1 image, 2 steps, `size` pixels square."""
    from playwright.sync_api import expect

    page.locator("#id-photos input[type=file]").set_input_files([str(EXAMPLES / "astronaut.png")])
    expect(page.locator("#id-photos img")).to_have_count(1)
    page.locator("#prompt textarea").fill("a photo of a woman img riding a bicycle, line drawing")
    page.locator("#advanced").get_by_text("Advanced options").click()
    type_number(page, "num-outputs", 1)
    type_number(page, "num-steps", 2)
    type_number(page, "width", size)
    type_number(page, "height", size)
    page.locator("#advanced").get_by_text("Advanced options").click()  # closed again: the sections below fit


def draw_doodle(page) -> None:
    """Pick the brush and draw a face-like doodle (a circle and a smile) with the mouse."""
    import math

    page.locator("#control-image").get_by_role("button", name="Brush").click()
    canvas = page.locator("#control-image canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    centre_x, centre_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    radius = min(box["width"], box["height"]) / 4

    def stroke(points: list[tuple[float, float]]) -> None:
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*point, steps=2)
        page.mouse.up()

    stroke(
        [
            (centre_x + radius * math.cos(a / 12 * math.pi), centre_y + radius * math.sin(a / 12 * math.pi))
            for a in range(25)
        ]
    )
    stroke(
        [
            (centre_x + 0.5 * radius * math.cos(a / 12 * math.pi), centre_y + 0.5 * radius * math.sin(a / 12 * math.pi))
            for a in range(2, 11)
        ]
    )


def test_draw_a_sketch_generate_and_see_results(page) -> None:
    from playwright.sync_api import expect

    quick_settings(page)
    page.locator("#control").get_by_text("Control: pose, edges").click()
    page.locator("#control-type").get_by_label("Sketch").check()
    # The sketch adapter's defaults, as the reference demo.
    expect(page.locator("#control-scale input[type=number]")).to_have_value("0.7")
    expect(page.locator("#control-end input[type=number]")).to_have_value("0.8")
    draw_doodle(page)

    page.locator("#generate").click()
    expect(page.locator("#results .grid-container img")).to_have_count(1, timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#control-preview img")).to_be_visible()  # the control map the generation used
    expect(page.locator("#notes")).to_contain_text("sketch")  # the 512 px canvas was fitted to 64 px, and said so
    expect(page.locator(".toast-body.error")).to_have_count(0)
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#control-preview").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "app_control_sketch.png"), full_page=True)


def test_sketch_without_a_drawing_is_refused(page) -> None:
    from playwright.sync_api import expect

    quick_settings(page)
    page.locator("#control").get_by_text("Control: pose, edges").click()
    page.locator("#control-type").get_by_label("Sketch").check()
    page.locator("#generate").click()
    expect(page.locator(".toast-body", has_text="needs a control image")).to_be_visible(timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#results .grid-container img")).to_have_count(0)


def test_inpaint_needs_a_painted_mask_or_the_face_mask(page) -> None:
    from playwright.sync_api import expect

    quick_settings(page)
    page.locator("#start-photo").get_by_text("Start from a photo").click()
    page.locator("#init-image input[type=file]").set_input_files(str(EXAMPLES / "grace_hopper.jpg"))
    page.locator("#start-mode").get_by_label("Put the person into a region (inpaint)").check()
    expect(page.locator("#strength input[type=number]")).to_have_value("0.9")  # inpaint redraws more
    expect(page.locator("#mask-image canvas").first).to_be_visible()

    page.locator("#generate").click()  # nothing painted: never a silent img2img
    # The library's message once the photo is on the mask canvas; the page's own if Generate came before it.
    refused = re.compile("mask is empty|Inpaint needs a mask")
    expect(page.locator(".toast-body", has_text=refused)).to_be_visible(timeout=GENERATE_TIMEOUT_MS)

    page.locator("#face-mask-button").click()
    expect(page.locator("#face-mask-preview img")).to_be_visible(timeout=60_000)
    expect(page.locator("#mask-face input[type=checkbox]")).to_be_checked()
    expect(page.locator("#mask-image")).to_be_hidden()  # a painted mask and the face mask exclude each other


def test_png_restores_the_control_settings(page, app_server) -> None:
    """The PNG of a controlled generation fills the control type and its sliders; the control image is asked
    for again (it is not stored)."""
    from gradio_client import handle_file
    from playwright.sync_api import expect

    from photomaker.metadata import read_parameters

    images, _, _, _ = app_server.client().predict(
        id_photos=[handle_file(str(EXAMPLES / "astronaut.png"))],
        prompt="a photo of a woman img dancing",
        num_steps=2,
        num_outputs=1,
        seed=3,
        randomize_seed=False,
        width=64,
        height=64,
        control_type="canny",
        control_image=handle_file(str(EXAMPLES / "grace_hopper.jpg")),
        control_scale=0.5,
        control_start=0.1,
        control_end=0.9,
        style_image_scale=0.4,
        api_name="/generate",
    )
    png = images[0]["image"]
    assert read_parameters(png)["control_type"] == "canny"
    page.locator("#reproduce").get_by_text("Reproduce from a PNG").click()
    page.locator("#png-file input[type=file]").set_input_files(png)

    expect(page.locator(".toast-body.info", has_text="control image")).to_be_visible()
    page.locator("#control").get_by_text("Control: pose, edges").click()
    expect(page.locator("#control-type").get_by_label("Edges (canny)")).to_be_checked()
    expect(page.locator("#control-scale input[type=number]")).to_have_value("0.5")
    expect(page.locator("#control-start input[type=number]")).to_have_value("0.1")
    expect(page.locator("#control-end input[type=number]")).to_have_value("0.9")
    page.locator("#style-image-section").get_by_text("Style image").first.click()
    expect(page.locator("#style-image-scale input[type=number]")).to_have_value("0.4")
