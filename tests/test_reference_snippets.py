"""The reference package's README and v2 script usage, run unchanged on the tiny models.

Each ``*_SNIPPET`` below is the reference's code, copied as users copy it (TencentARC/PhotoMaker README "Use like
diffusers" for v1; ``inference_scripts/inference_pmv2.py`` with the ``pm_version="v2"`` load of
``gradio_demo/app_v2.py`` for v2). The test only provides what the snippet leaves to the user (the base model
path, the checkpoint path, the device, the photo folders) and checks the results afterwards. Deviations, each
forced: the v1 README saves ``gen_images``, a name it never defines (the image is in ``images``); the v2 script's
``hf_hub_download`` (no Hub here; its path is given instead), ``.to("cuda")`` (``.to(device)``) and
``enable_model_cpu_offload()`` (needs an accelerator) are left out.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from faces_fixtures import (
    GRACE_HOPPER,
    SyntheticDetector,
    build_arcface_model,
    build_scrfd_model,
    red_marker_image,
)
from PIL import Image

from photomaker import PhotoMakerStableDiffusionXLPipeline
from photomaker.faces import insightface_backend
from photomaker.faces.insightface_backend import InsightFaceAnalyzer

pytestmark = pytest.mark.slow  # whole pipelines, and the v2 script's default 50 steps

V1_README_SNIPPET = """
import torch
import os
from diffusers.utils import load_image
from diffusers import EulerDiscreteScheduler
from photomaker import PhotoMakerStableDiffusionXLPipeline

### Load base model
pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(
    base_model_path,  # can change to any base model based on SDXL
    torch_dtype=torch.bfloat16, 
    use_safetensors=True, 
    variant="fp16"
).to(device)

### Load PhotoMaker checkpoint
pipe.load_photomaker_adapter(
    os.path.dirname(photomaker_path),
    subfolder="",
    weight_name=os.path.basename(photomaker_path),
    trigger_word="img"  # define the trigger word
)     

pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

### Also can cooperate with other LoRA modules
# pipe.load_lora_weights(os.path.dirname(lora_path), weight_name=lora_model_name, adapter_name="xl_more_art-full")
# pipe.set_adapters(["photomaker", "xl_more_art-full"], adapter_weights=[1.0, 0.5])

pipe.fuse_lora()

### define the input ID images
input_folder_name = './examples/newton_man'
image_basename_list = os.listdir(input_folder_name)
image_path_list = sorted([os.path.join(input_folder_name, basename) for basename in image_basename_list])

input_id_images = []
for image_path in image_path_list:
    input_id_images.append(load_image(image_path))

# Note that the trigger word `img` must follow the class word for personalization
prompt = "a half-body portrait of a man img wearing the sunglasses in Iron man suit, best quality"
negative_prompt = "(asymmetry, worst quality, low quality, illustration, 3d, 2d, painting, cartoons, sketch), open mouth, grayscale"
generator = torch.Generator(device=device).manual_seed(42)
images = pipe(
    prompt=prompt,
    input_id_images=input_id_images,
    negative_prompt=negative_prompt,
    num_images_per_prompt=1,
    num_inference_steps=num_steps,
    start_merge_step=10,
    generator=generator,
).images[0]
images.save('out_photomaker.png')
"""

V2_SNIPPET = """
import os
import sys

import numpy as np
import torch
from diffusers.utils import load_image
from diffusers import EulerDiscreteScheduler
from photomaker import PhotoMakerStableDiffusionXLPipeline
from photomaker import FaceAnalysis2, analyze_faces

face_detector = FaceAnalysis2(providers=['CUDAExecutionProvider'], allowed_modules=['detection', 'recognition'])
face_detector.prepare(ctx_id=0, det_size=(640, 640))

prompt = "instagram photo, portrait photo of a woman img, colorful, perfect face, natural skin, hard shadows, film grain, best quality"
negative_prompt = "(asymmetry, worst quality, low quality, illustration, 3d, 2d, painting, cartoons, sketch), open mouth"

pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(
    base_model_path, torch_dtype=torch_dtype
).to(device)

pipe.load_photomaker_adapter(
    os.path.dirname(photomaker_ckpt),
    subfolder="",
    weight_name=os.path.basename(photomaker_ckpt),
    trigger_word="img",
    pm_version="v2",
)
pipe.id_encoder.to(device)

pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.fuse_lora()
pipe.to(device)

### define the input ID images
input_folder_name = './examples/scarletthead_woman'
image_basename_list = os.listdir(input_folder_name)
image_path_list = sorted([os.path.join(input_folder_name, basename) for basename in image_basename_list])

input_id_images = []
for image_path in image_path_list:
    input_id_images.append(load_image(image_path))

id_embed_list = []

for img in input_id_images:
    img = np.array(img)
    img = img[:, :, ::-1]
    faces = analyze_faces(face_detector, img)
    if len(faces) > 0:
        id_embed_list.append(torch.from_numpy((faces[0]['embedding'])))

if len(id_embed_list) == 0:
    raise ValueError(f"No face detected in input image pool")

id_embeds = torch.stack(id_embed_list)

generator = torch.Generator(device=device).manual_seed(42)
images = pipe(
    prompt, 
    negative_prompt=negative_prompt, 
    input_id_images=input_id_images,
    id_embeds=id_embeds,
    num_images_per_prompt=2,
    start_merge_step=10,
    generator=generator,
).images

for idx, img in enumerate(images): 
    img.save(os.path.join(output_dir, f"output_pmv2_{idx}.jpg"))
"""


class FuseLoraSpy:
    """Records the UNet's weights around ``pipe.fuse_lora()`` (called by both snippets after loading)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        original = PhotoMakerStableDiffusionXLPipeline.fuse_lora

        def fuse_lora(pipe, *args, **kwargs):
            before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
            result = original(pipe, *args, **kwargs)
            self.calls.append((before, {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}))
            return result

        monkeypatch.setattr(PhotoMakerStableDiffusionXLPipeline, "fuse_lora", fuse_lora)


def _lora_deltas(checkpoint: Path) -> dict[str, torch.Tensor]:
    """UNet weight name -> up @ down, for every LoRA pair of a checkpoint in PhotoMaker's legacy key format."""
    lora = torch.load(checkpoint, weights_only=True)["lora_weights"]
    deltas = {}
    for key, down in lora.items():
        if key.endswith(".down.weight"):
            path, projection = key.removeprefix("unet.").split(".processor.")
            projection = projection.split("_lora")[0]
            module = f"{path}.to_out.0" if projection == "to_out" else f"{path}.{projection}"
            up = lora[key.removesuffix("down.weight") + "up.weight"]
            deltas[f"{module}.weight"] = up.float() @ down.float()
    return deltas


def _assert_lora_applied_once(base_unet_state: dict[str, torch.Tensor], unet_state: dict, deltas: dict) -> None:
    assert deltas
    for name, delta in deltas.items():
        change = unet_state[name].float() - base_unet_state[name].float()
        error = (change - delta).norm() / delta.norm()
        assert error < 0.1, f"{name}: weight moved by {float(change.norm() / delta.norm()):.2f} x the LoRA"


def test_v1_readme_snippet_runs_unchanged(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_fp16 = tmp_path / "base-fp16"  # the README loads variant="fp16" files
    StableDiffusionXLPipeline.from_pretrained(tiny_models_dir / "base").save_pretrained(base_fp16, variant="fp16")
    base_unet = StableDiffusionXLPipeline.from_pretrained(base_fp16, variant="fp16", torch_dtype=torch.bfloat16).unet
    photos = tmp_path / "examples" / "newton_man"
    photos.mkdir(parents=True)
    shutil.copy(GRACE_HOPPER, photos / "newton_0.jpg")
    Image.open(GRACE_HOPPER).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "newton_1.png")
    monkeypatch.chdir(tmp_path)
    spy = FuseLoraSpy(monkeypatch)
    namespace = {
        "base_model_path": str(base_fp16),
        "photomaker_path": str(tiny_models_dir / "photomaker-v1.bin"),
        "device": "cpu",
        "num_steps": 12,
    }
    exec(compile(V1_README_SNIPPET, "README.md (v1)", "exec"), namespace)  # noqa: S102 - running it is the test

    pipe = namespace["pipe"]
    assert pipe.pm_version == 1 and pipe.unet.dtype == torch.bfloat16
    assert [Path(p).name for p in namespace["image_path_list"]] == ["newton_0.jpg", "newton_1.png"]
    # fuse_lora() after a load that already fused: a no-op, the LoRA is in the weights exactly once
    ((before, after),) = spy.calls
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    _assert_lora_applied_once(base_unet.state_dict(), after, _lora_deltas(tiny_models_dir / "photomaker-v1.bin"))
    saved = Image.open(tmp_path / "out_photomaker.png")
    assert saved.size == (64, 64) and np.asarray(saved).std() > 0


def test_v2_snippet_with_face_analysis2_runs_unchanged(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pack = tmp_path / "buffalo_l"
    pack.mkdir()
    build_scrfd_model(pack / insightface_backend.DETECTOR_FILE, SyntheticDetector())
    build_arcface_model(pack / insightface_backend.RECOGNISER_FILE)
    monkeypatch.setenv(insightface_backend.MODEL_DIR_ENV, str(pack))
    photos = tmp_path / "examples" / "scarletthead_woman"
    photos.mkdir(parents=True)
    for index, box in enumerate([(100, 100, 108, 108), (180, 60, 188, 68)]):
        image = red_marker_image(320, 240, box)
        image[..., 1] = 40 + 50 * index  # different photos, different embeddings
        Image.fromarray(image).save(photos / f"scarlett_{index}.png")
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    spy = FuseLoraSpy(monkeypatch)
    seen_face_embeds: list[torch.Tensor] = []
    original_encode = PhotoMakerStableDiffusionXLPipeline.encode_id_images

    def encode_id_images(pipe, *args, **kwargs):
        encoding = original_encode(pipe, *args, **kwargs)
        seen_face_embeds.append(torch.as_tensor(kwargs.get("id_embeds", args[1] if len(args) > 1 else None)))
        return encoding

    monkeypatch.setattr(PhotoMakerStableDiffusionXLPipeline, "encode_id_images", encode_id_images)
    namespace = {
        "base_model_path": str(tiny_models_dir / "base"),
        "photomaker_ckpt": str(tiny_models_dir / "photomaker-v2.bin"),
        "device": "cpu",
        "torch_dtype": torch.float32,
        "output_dir": "./outputs",
    }
    exec(compile(V2_SNIPPET, "inference_pmv2.py", "exec"), namespace)  # noqa: S102 - running it is the test

    pipe = namespace["pipe"]
    assert pipe.pm_version == 2
    ours = InsightFaceAnalyzer(pack, download=False)
    expected = []
    for path in sorted(photos.iterdir()):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        expected.append(ours.embed(rgb, ours.detect(rgb)[0]))
    id_embeds = namespace["id_embeds"]
    assert tuple(id_embeds.shape) == (2, 512)
    assert np.array_equal(id_embeds.numpy(), np.stack(expected))  # the raw ArcFace output, photo order kept
    assert len(seen_face_embeds) == 1 and torch.equal(seen_face_embeds[0], id_embeds)
    ((before, after),) = spy.calls
    assert all(torch.equal(before[k], after[k]) for k in before)
    base_unet = StableDiffusionXLPipeline.from_pretrained(tiny_models_dir / "base").unet
    _assert_lora_applied_once(base_unet.state_dict(), after, _lora_deltas(tiny_models_dir / "photomaker-v2.bin"))
    written = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert written == ["output_pmv2_0.jpg", "output_pmv2_1.jpg"]
    assert os.path.getsize(tmp_path / "outputs" / written[0]) > 0
