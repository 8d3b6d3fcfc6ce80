"""Write real-size SDXL + PhotoMaker v1 weights (random values) in the official layouts, once.

    python -m bench.make_real_size /tmp/pm-real

writes (about 10 GB; never commit it):

    DIR/base/                 diffusers SDXL folder: unet (2.567 B params), text_encoder, text_encoder_2, vae in bf16
                              safetensors, tokenizers with the real CLIP vocabulary, Euler scheduler, model_index.json
    DIR/photomaker-v1.bin     torch pickle {"id_encoder": {...}, "lora_weights": {...}}: the official key names and
                              nesting; encoder = photomaker.id_encoder default config (CLIP ViT-L/14 + fuse module),
                              LoRA rank 64 in the legacy format on q/k/v/out of attn1/attn2 of all 70 blocks
    DIR/fast-loras/           one random few-step LoRA per fast preset, under its official file name, in its key
                              format (see photomaker.testing.FAST_LORA_FORMATS); usable as PHOTOMAKER_FAST_LORA_DIR

Parts already written are kept (delete DIR to rebuild). Everything is built on the meta device and materialised
one component at a time in bf16, so the peak memory is about one UNet (5.1 GB).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from bench import sdxl
from photomaker.testing import write_fast_loras

logger = logging.getLogger("bench.make_real_size")

FORMAT_VERSION = 1
MARKER = ".real-size-complete.json"
NEEDED_BYTES = 11 * 1024**3
DTYPE = torch.bfloat16

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _done(path: Path) -> bool:
    return (path / ".complete").is_file()


def _save_model(model: torch.nn.Module, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    (partial / ".complete").write_text("ok")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def write_base(base: Path, seed: int) -> None:
    """The diffusers SDXL folder, one component at a time."""
    import diffusers

    from photomaker.testing import clip_tokenizer

    base.mkdir(parents=True, exist_ok=True)
    builders = {
        "unet": lambda: sdxl.build_unet(),
        "text_encoder": lambda: sdxl.build_text_encoders()[0],
        "text_encoder_2": lambda: sdxl.build_text_encoders()[1],
        "vae": lambda: sdxl.build_vae(),
    }
    for offset, (name, build) in enumerate(builders.items()):
        target = base / name
        if _done(target):
            logger.info("%s: already written", name)
            continue
        started = time.perf_counter()
        model = build()
        count = sdxl.count_parameters(model)
        if count != sdxl.SDXL_PARAMETER_COUNTS[name]:
            raise RuntimeError(f"{name} has {count} parameters, SDXL's has {sdxl.SDXL_PARAMETER_COUNTS[name]}")
        sdxl.materialize_random(model, DTYPE, seed=seed + offset)
        _save_model(model, target)
        del model
        gc.collect()
        logger.info("%s: %d parameters written in %.0f s", name, count, time.perf_counter() - started)
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        if not (base / name / "tokenizer_config.json").is_file():
            clip_tokenizer(pad_token=pad).save_pretrained(base / name)
    if not (base / "scheduler" / "scheduler_config.json").is_file():
        diffusers.EulerDiscreteScheduler(**sdxl.SDXL_SCHEDULER_CONFIG).save_pretrained(base / "scheduler")
    (base / "model_index.json").write_text(
        json.dumps({**MODEL_INDEX, "_diffusers_version": diffusers.__version__}, indent=2)
    )


def photomaker_checkpoint(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """{"id_encoder", "lora_weights"} at full size. Mixed precision like the official file: the vision tower
    and the LoRA in bf16, the projections and the fuse module in fp32."""
    encoder = sdxl.materialize_random(sdxl.build_id_encoder(1), torch.float32, seed=seed + 10)
    id_encoder = {
        name: tensor.detach().to(DTYPE if name.startswith("vision_model.") else torch.float32).clone()
        for name, tensor in encoder.state_dict().items()
    }
    del encoder
    lora = sdxl.photomaker_lora_state_dict(sdxl.build_unet(), rank=sdxl.PHOTOMAKER_LORA_RANK, seed=seed + 11)
    if len(lora) != sdxl.SDXL_TRANSFORMER_BLOCKS * 2 * 4 * 2:
        raise RuntimeError(f"Expected a LoRA for 70 blocks x 2 attentions x 4 projections, got {len(lora) // 2}")
    return {"id_encoder": id_encoder, "lora_weights": lora}


def make_real_size(root: str | Path, seed: int = 0, fast_loras: bool = True) -> dict[str, Path]:
    """Write (or complete) the real-size folder; return {"base", "v1", "fast_loras"} paths."""
    root = Path(root)
    paths = {"base": root / "base", "v1": root / "photomaker-v1.bin", "fast_loras": root / "fast-loras"}
    marker = root / MARKER
    stamp = {"format": FORMAT_VERSION, "seed": seed, "fast_loras": fast_loras}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        logger.info("Real-size weights already complete in %s", root)
        return paths
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < NEEDED_BYTES:
        logger.warning("Only %.1f GB free under %s; about %.0f GB are needed", free / 1e9, root, NEEDED_BYTES / 1e9)
    write_base(paths["base"], seed)
    if not paths["v1"].is_file():
        started = time.perf_counter()
        checkpoint = photomaker_checkpoint(seed)
        partial = paths["v1"].with_name(paths["v1"].name + ".partial")
        torch.save(checkpoint, partial)
        partial.replace(paths["v1"])
        logger.info(
            "photomaker-v1.bin: %.0f MB in %.0f s", paths["v1"].stat().st_size / 1e6, time.perf_counter() - started
        )
        del checkpoint
    if fast_loras:
        write_fast_loras(paths["fast_loras"], sdxl.build_unet(), rank=64, dtype=DTYPE)
    marker.write_text(json.dumps(stamp))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="output folder (under /tmp or a git-ignored folder; about 10 GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fast-loras", action="store_true", help="skip the few-step LoRAs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_grad_enabled(False)
    paths = make_real_size(args.dir, seed=args.seed, fast_loras=not args.no_fast_loras)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
