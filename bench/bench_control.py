"""Control and composition modes: each PhotoMaker pipeline against diffusers' plain pipeline of the same kind.

    python -m bench.bench_control --models tiny
    python -m bench.bench_control --models tiny --steps 50 --repeats 5 --modes controlnet t2i_adapter

For each mode (ControlNet, T2I-Adapter, img2img, inpaint) both pipelines share the same components (one UNet
with the PhotoMaker LoRA fused, one VAE, the same control model), so only the pipeline code differs. PhotoMaker
gets the photos as an `IDEncoding` (as on a cache hit: the ID encoder runs once per person, not per call); the
plain pipeline gets the text-only prompt. The two calls of each repeat run back to back, alternating which goes
first; each is timed by the wall clock and by the process's CPU time (which, with ``--threads 1``, leaves out the
time spent waiting for a core that another process holds). Reported: ratios of the medians, paired ratios with
their spread, ratios of the minima, and the paired extra time per call, all measured in this run; plus a
computed real-size ratio at 50 steps. Target: at most 1.03x at 50 steps.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import common

TARGET = 1.03
MODES = ("controlnet", "t2i_adapter", "img2img", "inpaint")
TEXT_ONLY_PROMPT = common.PROMPT.replace(" img", "")  # what the plain pipeline gets

# Real-size SDXL (random bf16 weights, 512 px, guidance on, this project's 2-core CPU), measured by bench_speed and
# recorded in BENCHMARKS.md ("Speed (real models ...)"): the basis of the computed real-size ratio.
REAL_UNET_STEP_S = 6.44  # one UNet forward, batch 2
REAL_BEFORE_UNET_S = 0.981  # plain SDXL before its first UNet call (prompt encoding)
REAL_AFTER_LAST_STEP_S = 11.2  # VAE decode and postprocessing
REAL_PROMPT_SURGERY_S = 0.420  # PhotoMaker's extra before the UNet with an IDEncoding (cache hit), paired


def _control_models(models: common.Models, unet: torch.nn.Module) -> tuple[Any, Any]:
    """A ControlNet and a T2I-Adapter for the base model: tiny builders, or real-size random weights."""
    from diffusers import ControlNetModel, T2IAdapter

    from photomaker.testing import tiny_controlnet, tiny_t2i_adapter

    if models.kind == "tiny":
        return tiny_controlnet(unet), tiny_t2i_adapter()
    controlnet = ControlNetModel.from_unet(unet).to(models.dtype)
    adapter = T2IAdapter(adapter_type="full_adapter_xl", channels=[320, 640, 1280, 1280], downscale_factor=16)
    return controlnet, adapter.to(models.dtype)


def build_pairs(models: common.Models, modes: list[str]) -> dict[str, tuple[Any, Any]]:
    """{mode: (plain pipeline, PhotoMaker pipeline)} sharing every component."""
    from diffusers import (
        StableDiffusionXLAdapterPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )

    from photomaker.pipeline_controlnet import PhotoMakerStableDiffusionXLControlNetPipeline
    from photomaker.pipeline_img2img import PhotoMakerStableDiffusionXLImg2ImgPipeline
    from photomaker.pipeline_inpaint import PhotoMakerStableDiffusionXLInpaintPipeline
    from photomaker.pipeline_t2i_adapter import PhotoMakerStableDiffusionXLAdapterPipeline

    base = common.load_photomaker(models)  # fuses the LoRA into the shared UNet once
    controlnet, adapter = _control_models(models, base.unet)
    kinds = {
        "controlnet": (
            StableDiffusionXLControlNetPipeline,
            PhotoMakerStableDiffusionXLControlNetPipeline,
            {"controlnet": controlnet},
        ),
        "t2i_adapter": (
            StableDiffusionXLAdapterPipeline,
            PhotoMakerStableDiffusionXLAdapterPipeline,
            {"adapter": adapter},
        ),
        "img2img": (StableDiffusionXLImg2ImgPipeline, PhotoMakerStableDiffusionXLImg2ImgPipeline, {}),
        "inpaint": (StableDiffusionXLInpaintPipeline, PhotoMakerStableDiffusionXLInpaintPipeline, {}),
    }
    shared = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pairs = {}
    for mode in modes:
        plain_class, photomaker_class, extra = kinds[mode]
        plain = plain_class(**shared, **extra)
        photomaker = photomaker_class(**shared, **extra)
        photomaker.use_photomaker_adapter_of(base)  # the LoRA is in the shared UNet already
        for pipe in (plain, photomaker):
            pipe.set_progress_bar_config(disable=True)
        pairs[mode] = (plain, photomaker)
    return pairs


def mode_inputs(mode: str, size: int) -> dict[str, Any]:
    """What each mode needs besides the prompt: a control image, a start photo, a mask."""
    from photomaker.testing import synthetic_control_image, synthetic_mask

    photo = common.photos(1, seed=5, size=size)[0]
    if mode == "controlnet":
        return {"image": synthetic_control_image(size, kind="pose"), "height": size, "width": size}
    if mode == "t2i_adapter":
        return {"image": synthetic_control_image(size, kind="sketch"), "height": size, "width": size}
    if mode == "img2img":
        return {"image": photo, "strength": 1.0}
    return {"image": photo, "mask_image": synthetic_mask(size), "strength": 1.0, "height": size, "width": size}


def measure(args: argparse.Namespace, models: common.Models) -> dict[str, Any]:
    """Time every mode's pair in strict alternation (A B A B ..., the first of each pair rotating) for paired ratios."""
    pairs = build_pairs(models, args.modes)
    first_photomaker = next(iter(pairs.values()))[1]
    encoding = first_photomaker.encode_id_images(common.photos(2, seed=1))
    results: dict[str, Any] = {}
    for mode, (plain, photomaker) in pairs.items():
        inputs = mode_inputs(mode, args.size)
        calls: dict[str, Callable[[int], Any]] = {
            "plain": lambda seed, p=plain, i=inputs: p(
                TEXT_ONLY_PROMPT,
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
                **i,
            ),
            "photomaker": lambda seed, p=photomaker, i=inputs: p(
                common.PROMPT,
                input_id_images=encoding,
                start_merge_step=args.steps // 5,
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
                **i,
            ),
        }
        calls["plain"](0), calls["photomaker"](0)  # warm-up: first-call allocations are not what is compared
        wall: dict[str, list[float]] = {"plain": [], "photomaker": []}
        cpu: dict[str, list[float]] = {"plain": [], "photomaker": []}
        for repeat in range(args.repeats):
            for name in common.rotated(list(calls), repeat):
                wall_started, cpu_started = time.perf_counter(), time.process_time()
                calls[name](repeat)
                cpu[name].append(time.process_time() - cpu_started)
                wall[name].append(time.perf_counter() - wall_started)
        cpu_summary = summarise(cpu["plain"], cpu["photomaker"])
        results[mode] = {
            "wall": summarise(wall["plain"], wall["photomaker"]),
            "cpu": cpu_summary,
            "real_size_ratio": real_size_ratio(common.median(cpu_summary["extra_s"])),
        }
    return results


def summarise(plain_s: list[float], photomaker_s: list[float]) -> dict[str, Any]:
    """Ratios three ways (medians, paired, minima) and the paired extra seconds per call.

    Each repeat's two calls ran back to back, so load that outlasts a pair hits both sides of it: the paired ratio
    (PhotoMaker / plain within a repeat) cancels it, a burst that hits one call is outvoted by the median, and the
    ratio of the minima compares each side's least-disturbed call. The spread of the paired ratios says how far to
    trust them.
    """
    paired = [pm / pl for pl, pm in zip(plain_s, photomaker_s, strict=True)]
    return {
        "plain_s": plain_s,
        "photomaker_s": photomaker_s,
        "ratio": common.median(photomaker_s) / common.median(plain_s),
        "paired_ratios": paired,
        "paired_ratio": common.median(paired),
        "min_ratio": min(photomaker_s) / min(plain_s),
        "extra_s": [pm - pl for pl, pm in zip(plain_s, photomaker_s, strict=True)],
    }


def real_size_ratio(extra_s: float, steps: int = 50) -> float:
    """Computed: a real-size 50-step call with this per-call extra plus PhotoMaker's measured real-size prompt surgery.

    The measured extra time of the tiny models is pipeline code that does not grow with the model (prompt surgery,
    control-image preparation); at real size the second text-encoder pass grows, so its measured real-size cost
    (``REAL_PROMPT_SURGERY_S``) is added on top (counting the tiny text-encoder pass twice: an upper bound). The
    denominator is a plain text-to-image call; a control model adds its own per-step cost to both sides, which
    only lowers the ratio.
    """
    plain = REAL_BEFORE_UNET_S + steps * REAL_UNET_STEP_S + REAL_AFTER_LAST_STEP_S
    return (plain + max(extra_s, 0.0) + REAL_PROMPT_SURGERY_S) / plain


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    rows = []
    for mode, r in result["modes"].items():
        for clock, label in (("cpu", "CPU time"), ("wall", "wall clock")):
            c = r[clock]
            rows.append(
                [
                    mode,
                    label,
                    common.spread(c["plain_s"]),
                    common.spread(c["photomaker_s"]),
                    f"{c['ratio']:.3f}",
                    f"{c['paired_ratio']:.3f} [{min(c['paired_ratios']):.3f}-{max(c['paired_ratios']):.3f}]",
                    f"{c['min_ratio']:.3f}",
                    _signed_ms(c["extra_s"]),
                    common.verdict(c["paired_ratio"], TARGET),
                ]
            )
    real_rows = [
        [mode, f"{r['real_size_ratio']:.4f}", common.verdict(r["real_size_ratio"], TARGET)]
        for mode, r in result["modes"].items()
    ]
    lines = common.header("Control modes: PhotoMaker pipeline vs diffusers' plain pipeline of the same kind", result)
    lines += [
        f"{args.models} models, {result['dtype']}, {args.size} px, {args.steps} steps, {args.repeats} alternated "
        f"pairs, torch threads {result['machine']['torch_threads']}; target <= {TARGET}x",
        "",
        "Measured:",
        "",
        common.table(
            [
                "mode",
                "clock",
                "plain per call",
                "PhotoMaker per call",
                "ratio (medians)",
                "ratio (paired) [spread]",
                "ratio (minima)",
                "extra per call (paired)",
                "verdict (paired)",
            ],
            rows,
        ),
        "",
        "CPU time is the process's (time.process_time): with one torch thread it is the work each call did, without "
        "the time it waited for a core another process held; wall clock includes that wait.",
        "",
        "Computed for a real-size call at 50 steps:",
        "",
        common.table(["mode", "ratio (computed)", "verdict"], real_rows),
        "",
        f"(plain + the CPU-time extra per call + {REAL_PROMPT_SURGERY_S * 1000:.0f} ms prompt surgery) / plain, with "
        f"plain = {REAL_BEFORE_UNET_S:.2f} s before the UNet + 50 x {REAL_UNET_STEP_S:.2f} s per UNet step + "
        f"{REAL_AFTER_LAST_STEP_S:.1f} s after the last step (real-size bf16 512 px figures measured by "
        "bench_speed, BENCHMARKS.md).",
    ]
    return "\n".join(lines)


def _signed_ms(values: list[float]) -> str:
    """Median [min-max] of per-call extras in milliseconds (they may be negative: noise around a small cost)."""
    ms = [v * 1000 for v in values]
    return f"{common.median(ms):+.1f} ms [{min(ms):+.1f} to {max(ms):+.1f}]"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser, default_size=64, default_steps=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose, args.threads)
    models = common.prepare_models(args.models, args.dir, args.dtype)
    with common.quiet_libraries():
        modes = measure(args, models)
    result = common.new_result(args, models, modes=modes)
    return common.finish(args, result, report)


if __name__ == "__main__":
    main()
