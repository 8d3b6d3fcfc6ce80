"""PhotoMaker web app: Gradio Blocks layout and event wiring around `photomaker.service`.

Runs locally (`python app.py`, see `--help`) and unchanged as a Hugging Face Space, ZeroGPU included.
All generation logic lives in the library; this file only builds the page and connects it to the service. The
`/generate` payload adapters live in `photomaker.app_support`, the flags in `photomaker.app_flags`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import spaces  # before anything imports torch (the photomaker modules below), so that ZeroGPU can patch CUDA
from gradio import processing_utils
from PIL import Image
from spaces.config import Config as SpacesConfig

from photomaker import app_flags, presets
from photomaker.app_flags import service_config
from photomaker.app_support import (
    RANDOMIZE_SEED,
    accept_bare_files,
    accept_image_file,
    accept_shorter_calls,
    canvas_or_none,
    declare_optional_images,
    gallery_paths,
    gpu_duration,
    identity_caption,
    mode_defaults,
    named_in_errors,
    output_size,
    request_from_api,
    save_pil_to_cache_atomically,
    status_markdown,
    to_control,
)
from photomaker.aspect_ratios import ASPECT_RATIOS, DEFAULT_ASPECT_RATIO
from photomaker.control_images import mask_face, prepare_control_image
from photomaker.errors import PhotoMakerError
from photomaker.faces import get_face_analyzer, prepare_id_photos
from photomaker.fields import REQUEST_FIELDS
from photomaker.images import MAX_UPLOAD_BYTES, load_image
from photomaker.metadata import read_parameters, restore_settings
from photomaker.requests import GenerationRequest, GenerationResult
from photomaker.service import PhotoMakerService
from photomaker.styles import DEFAULT_STYLE_NAME, STYLE_NAMES
from photomaker.testsupport import fault_injection

log = logging.getLogger("photomaker.app")

# Two requests returning the same picture must not rewrite the cached file while a client downloads it.
processing_utils.save_pil_to_cache = save_pil_to_cache_atomically

APP_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = APP_DIR / "examples"
DEFAULT_TINY_DIR = APP_DIR / "tiny-models"
FAST_MODE_OFF = "Off (standard sampling)"
# Uploads and results in Gradio's cache: checked every 30 minutes, deleted once older than an hour.
CACHE_CLEANUP = (1800, 3600)

TITLE = "PhotoMaker: your face in any picture"
DESCRIPTION = """\
Upload 1 to 4 photos of **one person**, write a prompt in which the class word (man, woman, boy, girl,
person, ...) is followed by the trigger word **`img`**, e.g. *"a photo of a woman img as an astronaut"*, and
press **Generate**. Based on [PhotoMaker](https://github.com/TencentARC/PhotoMaker) (stacked ID embedding) on SDXL.
"""
TIPS = """\
**Tips**
- More photos of the same person (2-4, different angles and lighting) give a more faithful identity.
- The word before `img` must be a class word: *a man img*, *a woman img*, *a girl img*. If you forget `img`,
  it is added after the first class word and you are told.
- Style strength: higher keeps the style and composition of the prompt, lower follows the face more closely.
- The identity score under each result is the face similarity to your photos (higher is closer).
- Click a result to enlarge it; its PNG download carries every setting. Drop such a PNG under
  *Reproduce from a PNG* to restore them.
- Identity mixing: add photos of a second person in *Advanced* and move the slider to blend the two faces.
"""
EXAMPLE_SOURCES = """\
Example photos are public domain: `astronaut.png` is NASA's portrait of astronaut Eileen Collins (shipped with
scikit-image as `skimage/data/astronaut.png`); `grace_hopper.jpg` is the U.S. Navy portrait of Rear Admiral
Grace Hopper (shipped with matplotlib as `mpl-data/sample_data/grace_hopper.jpg`).
"""
TINY_BANNER = (
    "**Test mode (`--tiny`)**: tiny random-weight models, fully offline. "
    "The outputs are noise; use this mode to try every control, not to make pictures."
)
CSS = """
#tiny-banner {background: #fff3cd; border: 2px solid #e0a800; border-radius: 8px; padding: 4px 12px;}
#tiny-banner p {color: #5c4400;}
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (`photomaker.app_flags`); `--tiny` alone uses the tiny models next to this file."""
    return app_flags.parse_args(argv, tiny_default=str(DEFAULT_TINY_DIR))


# ---------------------------------------------------------------------------------------------------------------
# Event handlers (thin: convert widget values, call the library, convert results)
# ---------------------------------------------------------------------------------------------------------------


IMAGE_KINDS = ("images", "image")  # fields a PNG does not restore: the user gives the pictures again
ESTIMATED_MAPS = ("pose", "depth")  # control maps a model finds in the photo (loaded when generating)
IMG2IMG, INPAINT = "img2img", "inpaint"  # the start-photo modes; inpaint shows the mask tools


def mask_editor(photo: str | None, mode: str, mask_face: bool) -> gr.ImageEditor:
    """The mask canvas: the target photo to paint over, unpainted, in inpaint mode; empty and hidden when the
    face is masked automatically (a painted mask and "mask the face" exclude each other); empty in img2img."""
    painted = mode == INPAINT and not mask_face and photo
    value = {"background": photo, "layers": [], "composite": photo} if painted else None
    return gr.ImageEditor(value=value, visible=not mask_face)


def build_demo(service: PhotoMakerService, *, tiny: bool = False) -> gr.Blocks:
    """The page: controls, results, examples, and the events wired to `service`."""

    @spaces.GPU(duration=gpu_duration)
    def run_on_gpu(request: GenerationRequest, progress: gr.Progress) -> GenerationResult:
        """The only step that needs the GPU. On ZeroGPU it runs in a worker process with a GPU attached for
        `gpu_duration` seconds; arguments and result are pickled and only `gr.Error` keeps its message on the
        way back, so errors are converted here."""

        def report(step: int, total: int, description: str) -> None:
            progress((step, total), desc=description)

        if tiny:  # test hook, --tiny mode only: PHOTOMAKER_FAULT_INJECT (photomaker/testsupport/fault_injection.py)
            report = fault_injection.inject(report)

        try:
            return service.generate(request, report)
        except PhotoMakerError as error:
            raise gr.Error(str(error)) from error
        except Exception as error:
            log.exception("Generation failed unexpectedly")
            raise gr.Error(
                f"Generation failed unexpectedly ({type(error).__name__}). The app is still running: try again, "
                "and report the problem if it persists."
            ) from error

    @declare_optional_images
    def generate(progress: gr.Progress = gr.Progress(), **values: Any) -> tuple[list, int, list, str, tuple]:
        """Generate images of the person in the ID photos; `values` are the `/generate` parameters by API name
        (the field table's, plus randomize_seed). Returns (images with identity captions, seed used, face crops
        used, notes, (control map, mask) used: page state, not part of the API's answer)."""
        request = request_from_api(values)
        if SpacesConfig.zero_gpu:
            # Refuse a bad request before a GPU is reserved for it (off ZeroGPU, `generate` checks it first).
            try:
                service.validate(request)
            except PhotoMakerError as error:
                raise gr.Error(str(error)) from error
        result = run_on_gpu(request, progress)
        for warning in result.warnings:
            gr.Warning(warning)
        images = [(item.image, identity_caption(item.identity)) for item in result.images]
        notes = f"**Prompt used:** {result.prompt_used}" if result.prompt_used else ""
        if result.warnings:
            notes += "\n\n" + "\n".join(f"- {warning}" for warning in result.warnings)
        return images, result.seed, result.crops, notes, (result.control_image, result.mask_image)

    def preview_crops(id_photos: list | None, crop_faces: bool) -> list:
        """The ID photos as the encoder will see them (face crops), shown as soon as photos are uploaded."""
        paths = gallery_paths(id_photos)
        backend = service.config.resolved_face_backend
        if not paths or backend == "none":
            return paths
        try:
            analyzer = get_face_analyzer(backend, model_dir=service.config.face_model_dir)
            prepared = prepare_id_photos(paths, analyzer, crop=crop_faces)
        except PhotoMakerError as error:
            gr.Warning(str(error))
            return []
        for warning in prepared.warnings:
            gr.Warning(warning)
        return prepared.images

    def model_status() -> tuple[str, gr.Timer]:
        """The status line; polling stops once loading has finished or failed."""
        status = service.status()
        return status_markdown(status), gr.Timer(active=status.state in ("idle", "loading"))

    def reproduce(png_path: str | None) -> dict:
        """Fill the controls from the parameters stored in a PNG made by this app (one output, its seed)."""
        if not png_path:
            return {}
        try:
            parameters = read_parameters(png_path)
            restored = restore_settings(parameters, steps_min=service.config.steps_min)
        except PhotoMakerError as error:
            raise gr.Error(str(error)) from error
        request = restored.request
        updates: dict[gr.components.Component, Any] = {
            controls[item.name]: to_control(item, getattr(request, item.name), request)
            for item in REQUEST_FIELDS
            if item.kind not in IMAGE_KINDS
        }
        updates[randomize_seed] = False
        if request.mask_face:  # the start photo itself is not stored: the user gives it again
            updates[start_mode] = INPAINT
        for change in restored.changes:
            gr.Warning(change)
        made_with = f"{parameters.get('base_model')}, PhotoMaker v{parameters.get('pm_version')}"
        if parameters.get("pm_version") != service.config.pm_version:
            gr.Warning(
                f"This image was made with PhotoMaker v{parameters.get('pm_version')}; this app runs "
                f"v{service.config.pm_version}, so the result will differ."
            )
        pictures = [
            "ID photos",
            *(item.label for item in REQUEST_FIELDS if item.kind == "image" and parameters.get(item.metadata_key)),
        ]
        gr.Info(
            f"Settings restored from the PNG (made with {made_with}). Add the same {', '.join(pictures)} and "
            "press Generate to remake it."
        )
        return updates

    def preview_control(
        control_type: str, image: Any, aspect_ratio: str, width: float | None, height: float | None
    ) -> tuple[Image.Image | None, str]:
        """The control map the generation will use (at the output size), and what was done to the image. Pose
        and depth maps need their estimator models, which load with the first generation that uses them: those
        maps are shown after generating."""
        if not control_type:
            raise gr.Error("Choose a control type (pose, edges, depth or sketch) to see its control map.")
        image = canvas_or_none(image)
        if image is None:
            raise gr.Error(f"The {control_type} control needs an image: upload one or draw on the canvas.")
        if control_type in ESTIMATED_MAPS:
            return None, (
                f"The {control_type} map is found by the {control_type} model during generation; "
                "it is shown here after you press Generate."
            )
        try:
            prepared = prepare_control_image(control_type, image, *output_size(aspect_ratio, width, height))
        except PhotoMakerError as error:
            raise gr.Error(str(error)) from error
        return prepared.image, "\n".join(f"- {note}" for note in prepared.notes)

    def show_used_maps(maps: tuple[Image.Image | None, Image.Image | None] | None) -> tuple[Any, Any]:
        """After a generation: the control map and the inpainting mask it used (unchanged when it used none)."""
        control_map, mask = maps or (None, None)
        return (control_map if control_map is not None else gr.skip(), mask if mask is not None else gr.skip())

    def show_face_mask(photo: str | None) -> tuple[Image.Image, bool]:
        """The mask "mask the face" makes on the target photo; turns that option on."""
        if not photo:
            raise gr.Error("Upload a target photo first: the face mask is made from the face found in it.")
        backend = service.config.resolved_face_backend
        if backend == "none":
            raise gr.Error("Face detection is off (PHOTOMAKER_FACE_BACKEND=none): paint the mask instead.")
        try:
            analyzer = get_face_analyzer(backend, model_dir=service.config.face_model_dir)
            return mask_face(load_image(photo, name="the target photo"), analyzer), True
        except PhotoMakerError as error:
            raise gr.Error(str(error)) from error

    def check_start_mode(mode: str, photo: str | None, mask: Any, mask_face: bool) -> None:
        """Inpaint chosen on the page needs a mask: without one the request would quietly run as img2img (the
        mode is page state, not a request field), e.g. when Generate is pressed before the photo reached the
        mask canvas."""
        if mode == INPAINT and photo and not mask_face and canvas_or_none(mask, paint_only=True) is None:
            raise gr.Error(
                "Inpaint needs a mask: paint the region to redraw over the target photo, or tick 'Mask the face'. "
                "If you have just uploaded the photo, wait until it shows on the mask canvas."
            )

    def control_type_chosen(control_type: str) -> tuple[float, float]:
        """Strength and end sliders at the chosen control's defaults (the sketch adapter has its own)."""
        defaults = mode_defaults(control_type, inpaint=False)
        return defaults["control_scale"], defaults["control_end"]

    def start_mode_chosen(mode: str) -> tuple[float, Any]:
        """The strength default of the chosen mode; img2img has no face mask."""
        return mode_defaults("", inpaint=mode == INPAINT)["strength"], False if mode == IMG2IMG else gr.skip()

    def start_mode_shown(mode: str, photo: str | None, mask_face: bool) -> tuple[gr.Group, gr.ImageEditor]:
        """The mask tools in inpaint mode only (a restored PNG may set the mode too)."""
        return gr.Group(visible=mode == INPAINT), mask_editor(photo, mode, mask_face)

    def target_photo_changed(photo: str | None, mode: str) -> tuple[gr.ImageEditor, bool, None]:
        """A new target photo: the mask canvas shows it, unpainted; a face mask of the old one is dropped."""
        return mask_editor(photo, mode, mask_face=False), False, None

    with gr.Blocks(title="PhotoMaker", delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION}")
        if tiny:
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        status_line = gr.Markdown("Model: starting…", elem_id="model-status")
        status_timer = gr.Timer(1.0)

        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                id_photos = gr.Gallery(
                    label=f"ID photos: {presets.ID_IMAGES_MIN} to {presets.ID_IMAGES_MAX} photos of the same person",
                    type="filepath",
                    interactive=True,
                    file_types=["image"],
                    columns=4,
                    height=260,
                    format="png",
                    elem_id="id-photos",
                )
                crops = gr.Gallery(
                    label="Faces that will be used",
                    interactive=False,
                    columns=4,
                    fit_columns=False,
                    height=170,
                    object_fit="contain",
                    format="png",
                    elem_id="face-crops",
                )
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=2,
                    elem_id="prompt",
                    info="Put the trigger word img right after the class word: "
                    "'a photo of a man img', 'a woman img in a garden'.",
                    placeholder="portrait photo of a woman img, golden hour, 85mm",
                )
                with gr.Row():
                    style = gr.Dropdown(STYLE_NAMES, value=DEFAULT_STYLE_NAME, label="Style template")
                    aspect_ratio = gr.Dropdown(
                        [(f"{name} ({w}×{h})", name) for name, (w, h) in ASPECT_RATIOS.items()],
                        value=DEFAULT_ASPECT_RATIO,
                        label="Output size",
                    )
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("Advanced options", open=False, elem_id="advanced"):
                    negative_prompt = gr.Textbox(
                        label="Negative prompt", value="", lines=2, placeholder="what you do not want to see"
                    )
                    num_steps = gr.Slider(
                        label="Sampling steps",
                        minimum=service.config.steps_min,
                        maximum=presets.STEPS_MAX,
                        step=1,
                        value=presets.STEPS_DEFAULT,
                        elem_id="num-steps",
                    )
                    style_strength = gr.Slider(
                        label="Style strength (%)",
                        minimum=presets.STYLE_STRENGTH_MIN,
                        maximum=presets.STYLE_STRENGTH_MAX,
                        step=1,
                        value=presets.STYLE_STRENGTH_DEFAULT,
                        info="Higher: more style and prompt; lower: more identity.",
                    )
                    num_outputs = gr.Slider(
                        label="Number of images",
                        minimum=presets.OUTPUTS_MIN,
                        maximum=presets.OUTPUTS_MAX,
                        step=1,
                        value=presets.OUTPUTS_DEFAULT,
                        elem_id="num-outputs",
                    )
                    guidance_scale = gr.Slider(
                        label="Guidance scale",
                        minimum=presets.GUIDANCE_MIN,
                        maximum=presets.GUIDANCE_MAX,
                        step=0.1,
                        value=presets.GUIDANCE_DEFAULT,
                        elem_id="guidance-scale",
                    )
                    with gr.Row():
                        seed = gr.Number(
                            label="Seed",
                            value=0,
                            precision=0,
                            minimum=presets.SEED_MIN,
                            maximum=presets.SEED_MAX,
                            elem_id="seed",
                        )
                        randomize_seed = gr.Checkbox(label="Randomize seed", value=True)
                    crop_faces = gr.Checkbox(
                        label="Crop to the face", value=True, info="Off: use the whole photos as they are."
                    )
                    fast_mode = gr.Dropdown(
                        [(FAST_MODE_OFF, "")] + [(fast.label, fast.key) for fast in presets.FAST_PRESETS.values()],
                        value="",
                        label="Fast mode",
                        info="Few-step LoRA presets: much faster, slightly less detail.",
                        elem_id="fast-mode",
                    )
                    best_of = gr.Slider(
                        label="Best of N",
                        minimum=presets.BEST_OF_MIN,
                        maximum=presets.BEST_OF_MAX,
                        step=1,
                        value=1,
                        info="Make N candidates per image and keep the one whose face is most similar.",
                    )
                    with gr.Row():
                        width = gr.Number(
                            label="Custom width",
                            value=0,
                            precision=0,
                            minimum=0,
                            maximum=presets.SIZE_MAX,
                            step=presets.SIZE_MULTIPLE,
                            elem_id="width",
                            info=f"0: from Output size. A multiple of {presets.SIZE_MULTIPLE}.",
                        )
                        height = gr.Number(
                            label="Custom height",
                            value=0,
                            precision=0,
                            minimum=0,
                            maximum=presets.SIZE_MAX,
                            step=presets.SIZE_MULTIPLE,
                            elem_id="height",
                            info="Set both to use a custom size.",
                        )
                    gr.Markdown("**Identity mixing**: photos of a second person, blended with the first.")
                    mix_photos = gr.Gallery(
                        label="Second person's photos (optional)",
                        type="filepath",
                        interactive=True,
                        file_types=["image"],
                        columns=4,
                        height=130,
                        format="png",
                    )
                    mix_strength = gr.Slider(
                        label="Mix (0 = first person only, 1 = second person only)",
                        minimum=presets.MIX_STRENGTH_MIN,
                        maximum=presets.MIX_STRENGTH_MAX,
                        step=0.05,
                        value=presets.MIX_STRENGTH_DEFAULT,
                    )
                with gr.Accordion("Control: pose, edges, depth or a sketch", open=False, elem_id="control"):
                    control_type = gr.Radio(
                        [
                            ("None", ""),
                            ("Pose", "pose"),
                            ("Edges (canny)", "canny"),
                            ("Depth", "depth"),
                            ("Sketch", "sketch"),
                        ],
                        value="",
                        label="Control type",
                        elem_id="control-type",
                        info="Pose, edges and depth are taken from a photo; sketch from a drawing.",
                    )
                    control_image = gr.ImageEditor(
                        label="Control image: upload, or draw (brush tool)",
                        type="pil",
                        image_mode="RGBA",
                        sources=["upload", "clipboard"],
                        layers=False,
                        transforms=(),
                        brush=gr.Brush(colors=["#000000"], color_mode="fixed", default_size=6),
                        eraser=gr.Eraser(default_size=16),
                        canvas_size=(512, 512),
                        format="png",
                        height=420,
                        elem_id="control-image",
                    )
                    with gr.Row():
                        preview_button = gr.Button("Show the control map", size="sm", elem_id="control-preview-button")
                    control_preview = gr.Image(
                        label="Control map (at the output size)",
                        interactive=False,
                        format="png",
                        height=220,
                        elem_id="control-preview",
                    )
                    control_notes = gr.Markdown(elem_id="control-notes")
                    control_scale = gr.Slider(
                        label="Control strength",
                        minimum=presets.CONTROL_SCALE_MIN,
                        maximum=presets.CONTROL_SCALE_MAX,
                        step=0.05,
                        value=presets.CONTROL_SCALE_DEFAULT,
                        info=f"How strongly the image steers the layout (sketch default "
                        f"{presets.SKETCH_SCALE_DEFAULT:g}).",
                        elem_id="control-scale",
                    )
                    with gr.Row():
                        control_start = gr.Slider(
                            label="Control start",
                            minimum=0,
                            maximum=1,
                            step=0.05,
                            value=0,
                            info="Fraction of the steps before it applies.",
                            elem_id="control-start",
                        )
                        control_end = gr.Slider(
                            label="Control end",
                            minimum=0,
                            maximum=1,
                            step=0.05,
                            value=presets.CONTROL_END_DEFAULT,
                            info=f"Fraction after which it stops (sketch default {presets.SKETCH_END_DEFAULT:g}).",
                            elem_id="control-end",
                        )
                with gr.Accordion("Start from a photo", open=False, elem_id="start-photo"):
                    init_image = gr.Image(
                        label="Target photo",
                        type="filepath",
                        sources=["upload", "clipboard"],
                        height=260,
                        elem_id="init-image",
                    )
                    start_mode = gr.Radio(
                        [
                            ("Redraw the whole photo (img2img)", IMG2IMG),
                            ("Put the person into a region (inpaint)", INPAINT),
                        ],
                        value=IMG2IMG,
                        label="Mode",
                        elem_id="start-mode",
                    )
                    strength = gr.Slider(
                        label="Strength",
                        minimum=0,
                        maximum=1,
                        step=0.05,
                        value=presets.IMG2IMG_STRENGTH_DEFAULT,
                        elem_id="strength",
                        info="How much of the photo is redrawn: 0 keeps it, 1 redraws all.",
                    )
                    with gr.Group(visible=False) as inpaint_tools:
                        mask_image = gr.ImageEditor(
                            label="Paint the region to redraw",
                            type="pil",
                            image_mode="RGBA",
                            sources=(),
                            layers=False,
                            transforms=(),
                            format="png",
                            height=320,
                            elem_id="mask-image",
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=20),
                        )
                        with gr.Row():
                            mask_face_box = gr.Checkbox(
                                label="Mask the face (instead of painting)", value=False, elem_id="mask-face"
                            )
                            face_mask_button = gr.Button("Show the face mask", size="sm", elem_id="face-mask-button")
                        face_mask_preview = gr.Image(
                            label="Face mask", interactive=False, format="png", height=160, elem_id="face-mask-preview"
                        )
                with gr.Accordion("Style image", open=False, elem_id="style-image-section"):
                    style_image = gr.Image(
                        label="A picture whose style the result borrows (IP-Adapter)",
                        type="filepath",
                        sources=["upload", "clipboard"],
                        height=220,
                        elem_id="style-image",
                    )
                    style_image_scale = gr.Slider(
                        label="Style image strength",
                        minimum=0,
                        maximum=1,
                        step=0.05,
                        value=presets.STYLE_IMAGE_SCALE_DEFAULT,
                        elem_id="style-image-scale",
                    )
                with gr.Accordion("Reproduce from a PNG", open=False, elem_id="reproduce"):
                    png_file = gr.File(
                        label="A PNG made by this app", file_types=[".png"], type="filepath", elem_id="png-file"
                    )
            with gr.Column(scale=1):
                results = gr.Gallery(
                    label="Results",
                    format="png",
                    columns=2,
                    height="auto",
                    interactive=False,
                    buttons=["download", "fullscreen"],
                    elem_id="results",
                )
                with gr.Row(visible=False) as seed_row:  # shown once there is a result
                    seed_used = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="seed-used")
                    reuse_seed = gr.Button("Reuse this seed", size="sm")
                notes = gr.Markdown(elem_id="notes")
                gr.Markdown(TIPS)

        gr.Examples(
            label="Examples (click one, then press Generate)",
            examples=[
                [
                    [str(EXAMPLES_DIR / "astronaut.png")],
                    None,
                    "a photo of a woman img in a spacesuit walking on the moon, earth in the sky",
                    "Photographic (Default)",
                ],
                [
                    [str(EXAMPLES_DIR / "grace_hopper.jpg")],
                    None,
                    "portrait of a woman img as a 1950s computer scientist at a mainframe console",
                    "Cinematic",
                ],
                [
                    [str(EXAMPLES_DIR / "astronaut.png")],
                    [str(EXAMPLES_DIR / "grace_hopper.jpg")],
                    "a woman img as a knight in shining armour, castle in the background",
                    "Fantasy Art",
                ],
            ],
            example_labels=[
                "Astronaut on the moon (photographic)",
                "Grace Hopper at a mainframe (cinematic)",
                "Mixing astronaut + Grace Hopper: a knight",
            ],
            inputs=[id_photos, mix_photos, prompt, style],
        )
        gr.Markdown(EXAMPLE_SOURCES)

        controls = {  # request field -> the control that sets it
            "id_images": id_photos,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "style": style,
            "aspect_ratio": aspect_ratio,
            "num_steps": num_steps,
            "style_strength": style_strength,
            "num_outputs": num_outputs,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "crop_faces": crop_faces,
            "mix_images": mix_photos,
            "mix_strength": mix_strength,
            "fast": fast_mode,
            "best_of": best_of,
            "width": width,
            "height": height,
            "control_type": control_type,
            "control_image": control_image,
            "control_scale": control_scale,
            "control_start": control_start,
            "control_end": control_end,
            "init_image": init_image,
            "strength": strength,
            "mask_image": mask_image,
            "mask_face": mask_face_box,
            "style_image": style_image,
            "style_image_scale": style_image_scale,
        }
        api_inputs: dict[str, gr.components.Component] = {}  # /generate's parameters, in the field table's order
        for item in REQUEST_FIELDS:
            control = controls[item.name]
            if item.kind == "images":
                accept_bare_files(control, item.api_name)
            elif item.kind == "image":
                accept_image_file(control, item.api_name)
            else:
                named_in_errors(control, item.describe_type(service.config), nullable=item.nullable)
            api_inputs[item.api_name] = control
            if item.name == "seed":
                api_inputs[RANDOMIZE_SEED] = named_in_errors(randomize_seed, "true or false")
        used_maps = gr.State()  # (control map, mask) of the last generation; a State is not in the API's answer
        generate_outputs = [results, seed_used, crops, notes, used_maps]
        start_check = gr.on(
            [generate_button.click, prompt.submit],
            check_start_mode,
            [start_mode, init_image, mask_image, mask_face_box],
            None,
            api_visibility="private",
            queue=False,
        )
        generation = start_check.success(
            generate, None, generate_outputs, inputs_kwargs=api_inputs, api_name="generate", show_progress_on=results
        )
        generation.success(lambda: gr.Row(visible=True), None, seed_row, api_visibility="private", queue=False)
        accept_shorter_calls(demo, "generate")
        size_inputs = [aspect_ratio, width, height]
        preview_button.click(
            preview_control,
            [control_type, control_image, *size_inputs],
            [control_preview, control_notes],
            api_visibility="private",
        )
        generation.success(
            show_used_maps, used_maps, [control_preview, face_mask_preview], api_visibility="private", queue=False
        )
        # Defaults follow what the user picks (.input), not a PNG's restored values (which .change would undo).
        control_type.input(
            control_type_chosen, control_type, [control_scale, control_end], api_visibility="private", queue=False
        )
        start_mode.input(
            start_mode_chosen, start_mode, [strength, mask_face_box], api_visibility="private", queue=False
        )
        start_mode.change(
            start_mode_shown,
            [start_mode, init_image, mask_face_box],
            [inpaint_tools, mask_image],
            api_visibility="private",
            queue=False,
        )
        mask_face_box.change(
            mask_editor, [init_image, start_mode, mask_face_box], mask_image, api_visibility="private", queue=False
        )
        init_image.change(
            target_photo_changed,
            [init_image, start_mode],
            [mask_image, mask_face_box, face_mask_preview],
            api_visibility="private",
            queue=False,
        )
        face_mask_button.click(show_face_mask, init_image, [face_mask_preview, mask_face_box], api_visibility="private")

        # Status polls skip the queue: they are instant, and must not take places a generation could use.
        demo.load(model_status, None, [status_line, status_timer], api_visibility="private", queue=False)
        status_timer.tick(
            model_status,
            None,
            [status_line, status_timer],
            api_visibility="private",
            queue=False,
            show_progress="hidden",
        )
        gr.on(
            [id_photos.change, crop_faces.change],
            preview_crops,
            [id_photos, crop_faces],
            crops,
            api_visibility="private",
            show_progress="minimal",
        )
        png_file.upload(
            reproduce,
            png_file,
            [
                *(controls[item.name] for item in REQUEST_FIELDS if item.kind not in IMAGE_KINDS),
                randomize_seed,
                start_mode,
            ],
            api_visibility="private",
        )
        reuse_seed.click(
            lambda used: (used, False), seed_used, [seed, randomize_seed], api_visibility="private", queue=False
        )
    return demo


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, start loading the model in the background, serve the page at once."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = service_config(args)
    except PhotoMakerError as error:
        raise SystemExit(f"app.py: error: {error}") from None
    service = PhotoMakerService(config)
    service.start_loading()
    if SpacesConfig.zero_gpu:
        # ZeroGPU moves weights to the GPU only if they are placed on CUDA at startup, outside @spaces.GPU.
        try:
            service.wait_ready()
        except PhotoMakerError as error:
            log.error("The model could not be loaded; the page will say so: %s", error)
    if config.tiny_dir:
        log.warning("TEST MODE: tiny random-weight models from %s; the outputs are noise.", config.tiny_dir)
    demo = build_demo(service, tiny=bool(config.tiny_dir))
    demo.queue(max_size=args.max_queue, default_concurrency_limit=args.concurrency)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        # Uploads larger than the library accepts are refused before they are stored; only the app's own
        # cache is served (no extra allowed_paths).
        max_file_size=MAX_UPLOAD_BYTES,
        allowed_paths=[],
        theme=gr.themes.Soft(),
        css=CSS,
    )


if __name__ == "__main__":
    main()
