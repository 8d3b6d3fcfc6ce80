"""App level: one whole request through the service against a bare plain-SDXL call with the same steps.

    python -m bench.bench_app --models tiny --repeats 5
    python -m bench.bench_app --models real --dir /tmp/pm-real --size 512 --steps 3 --repeats 2

`bench_speed` compares the two pipelines alone. This one times what a user of the app or the CLI waits for:
`PhotoMakerService.generate` (validation, photo decoding, face detection and crop, ID encoding, prompt surgery,
sampling, identity score of the result) plus writing the result as a PNG with its metadata, the CLI's last step.
The baseline is a bare `StableDiffusionXLPipeline` call, measured in the same run, with the same prompt (the
styled prompt the service used, without the trigger word), negative prompt, size, steps, guidance and seed.

Three variants alternate in every repeat (the order rotates) and their medians are compared:

* plain SDXL: the baseline;
* request, new photos: the ID photo differs slightly in every repeat, so the ID-encoding cache misses and face
  detection and the ID encoder run, as on a user's first request;
* request, same photos: the photo of the previous request again (a cache hit: the ID encoder does not run).

The plain pipeline is built on the service's own loaded components (no second copy of the weights in memory);
its UNet therefore carries the fused PhotoMaker LoRA, which costs nothing per step (the same shapes and operations).
The ID photo is the public-domain portrait ``examples/astronaut.png``; faces use the offline dlib backend.
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench import common

PHOTO = common.REPO_ROOT / "examples" / "astronaut.png"
PROMPT = "a photo of a woman img, natural window light"
VARIANTS = ("plain", "new_photos", "same_photos")
LABELS = {
    "plain": "plain SDXL call (baseline)",
    "new_photos": "service request, new photos",
    "same_photos": "service request, same photos (cache hit)",
}


def photo_variant(k: int) -> Image.Image:
    """The portrait with its corner pixel set from `k`: the same face, a new ID-encoding cache key."""
    with Image.open(PHOTO) as image:
        photo = image.convert("RGB")
    photo.putpixel((0, 0), (k % 256, k // 256 % 256, 7))
    return photo


def start_service(models: common.Models) -> Any:
    """The service on the benchmark's models, configured as the app runs them (dlib faces, no adapter cache)."""
    from photomaker.service import PhotoMakerService, ServiceConfig

    config = ServiceConfig(
        base_model=str(models.base),
        adapter=str(models.v1),
        device="cpu",
        dtype=models.dtype_name,
        face_backend="dlib",
        fused_cache_dir="off",
        min_steps=1,
    )
    service = PhotoMakerService(config)
    service.wait_ready()
    service.pipeline.set_progress_bar_config(disable=True)
    return service


def plain_pipeline(service: Any) -> Any:
    """Plain diffusers SDXL on the service's loaded components (see the module docstring)."""
    from diffusers import StableDiffusionXLPipeline

    accepted = inspect.signature(StableDiffusionXLPipeline.__init__).parameters
    parts = {name: part for name, part in service.pipeline.components.items() if name in accepted}
    pipe = StableDiffusionXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def benchmark(args: argparse.Namespace, models: common.Models) -> dict[str, Any]:
    from photomaker.metadata import read_parameters, save_png
    from photomaker.service import GenerationRequest

    with common.quiet_libraries():
        service = start_service(models)
    plain = plain_pipeline(service)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bench-app-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    last_photo: list[Image.Image] = [photo_variant(0)]
    styled: dict[str, str] = {}

    def request(photo: Image.Image, seed: int, name: str) -> float:
        started = time.perf_counter()
        result = service.generate(
            GenerationRequest(
                id_images=[photo],
                prompt=PROMPT,
                num_steps=args.steps,
                num_outputs=1,
                guidance_scale=args.guidance,
                seed=seed,
                width=args.size,
                height=args.size,
            )
        )
        png = out_dir / f"{name}-{seed}.png"
        save_png(result.images[0].image, png, result.images[0].parameters)
        elapsed = time.perf_counter() - started
        styled["prompt"] = result.prompt_used.replace(f" {service.config.trigger_word}", "")
        styled["negative"] = result.negative_prompt_used
        if read_parameters(png)["seed"] != seed:
            raise RuntimeError("The written PNG does not carry the request's seed")
        return elapsed

    def run(variant: str, repeat: int) -> float:
        seed = 1000 + repeat
        if variant == "new_photos":
            last_photo[0] = photo_variant(repeat + 1)
            return request(last_photo[0], seed, variant)
        if variant == "same_photos":
            return request(last_photo[0], seed, variant)
        started = time.perf_counter()
        plain(
            prompt=styled["prompt"],
            negative_prompt=styled["negative"] or None,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
        )
        return time.perf_counter() - started

    # Untimed: afterwards the cache holds this photo and the styled prompt is known (for the plain calls).
    request(last_photo[0], seed=0, name="priming")
    for warmup in range(args.warmup):
        for variant in VARIANTS:
            run(variant, args.repeats + warmup)
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        for variant in common.rotated(VARIANTS, repeat):
            times[variant].append(run(variant, repeat))
    baseline = common.median(times["plain"])
    return {
        "times_s": times,
        "ratios": {variant: common.median(times[variant]) / baseline for variant in VARIANTS},
        "paired_ratios": {
            variant: common.median([a / b for a, b in zip(times[variant], times["plain"], strict=True)])
            for variant in VARIANTS
        },
        "png_folder": str(out_dir),
    }


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    b = result["app"]
    lines = common.header(
        f"App level ({args.models} models, {result['dtype']}, {args.size}x{args.size}, {args.steps} steps, "
        f"guidance {args.guidance:g}, {args.repeats} repeat(s)): whole service request + PNG vs plain SDXL call",
        result,
    )
    rows = [
        [
            LABELS[variant],
            common.spread(b["times_s"][variant]),
            f"{b['ratios'][variant]:.2f}",
            f"{b['paired_ratios'][variant]:.2f}",
        ]
        for variant in VARIANTS
    ]
    lines.append(common.table(["variant", "per request", "ratio (medians)", "ratio (paired)"], rows))
    lines += [
        "",
        "Measured, not extrapolated: each figure is a whole call at the stated steps; the fixed costs (faces, ID "
        "encoder, scores, PNG) weigh more at few steps than at the app's default 50.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.common_arguments(parser, default_size=64, default_steps=4)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", help="folder for the written PNGs (default: a new temporary folder)")
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose, args.threads)
    started = time.perf_counter()
    models = common.prepare_models(args.models, args.dir, args.dtype)
    result = common.new_result(args, models)
    result["app"] = benchmark(args, models)
    result["seconds"] = time.perf_counter() - started
    return common.finish(args, result, report)


if __name__ == "__main__":
    main()
