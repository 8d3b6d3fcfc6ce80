"""Speed: PhotoMaker against plain diffusers SDXL on the same weights, size, steps and seed.

    python -m bench.bench_speed --models tiny --repeats 15
    python -m bench.bench_speed --models real --dir /tmp/pm-real --size 512 --steps 3 --repeats 2

Measures, as ratios against plain `StableDiffusionXLPipeline` timed in the same process, alternating the order
of the variants in every repeat to cancel drift:

(a) time per image on the first call with new photos (the ID encoder runs inside the call);
(b) time per image when the same photos come again (an `IDEncoding` reused: what the service's cache hit does);
(c) cold start: `from_pretrained` + `load_photomaker_adapter` (checkpoint read, encoder build, LoRA load, fuse,
    unload of the LoRA layers) against plain `from_pretrained`, each in a fresh process;
(d) the ID encoder by itself (`encode_id_images`).

Each denoising step is timed with `callback_on_step_end`; the fixed cost of a call is its total minus
steps x the per-step cost, and the 50-step figures are `fixed + 50 x per-step` (the per-step cost is pooled over
both pipelines: they run the same UNet).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from bench import common

TARGETS = {"first_call": 1.03, "reuse": 1.01, "cold_start": 1.15}
EXTRAPOLATE_STEPS = 50


def unet_arguments(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Inputs of one denoising step as the pipelines make them (batch 2 with guidance, else 1)."""
    batch = 2 if args.guidance > 1 else 1
    dtype = pipe.unet.dtype
    latent = args.size // pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    config = pipe.unet.config
    return {
        "sample": torch.randn(batch, config.in_channels, latent, latent, generator=generator).to(dtype),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=generator).to(dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pipe.text_encoder_2.config.projection_dim, generator=generator).to(dtype),
            "time_ids": torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * batch, dtype=dtype),
        },
        "return_dict": False,
    }


def call_arguments(args: argparse.Namespace, seed: int, steps: int | None = None) -> tuple[dict[str, Any], int]:
    """Keyword arguments shared by both pipelines, and PhotoMaker's merge step (the app's rule)."""
    from photomaker import presets

    steps = steps or args.steps
    return {
        "negative_prompt": common.NEGATIVE_PROMPT,
        "num_inference_steps": steps,
        "guidance_scale": args.guidance,
        "height": args.size,
        "width": args.size,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "pil",
    }, presets.start_merge_step(presets.STYLE_STRENGTH_DEFAULT, steps)


# ------------------------------------------------------------------------------------------- cold start


class PhaseTimer:
    """Wraps functions so that their cumulative wall time is recorded under a phase name."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def wrap(self, owner: Any, attribute: str, phase: str) -> None:
        original = getattr(owner, attribute)

        def timed_function(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - started

        setattr(owner, attribute, timed_function)


def cold_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: load one pipeline, print one JSON line with the timings."""
    started_imports = time.perf_counter()
    models = common.prepare_models(args.models, args.dir, args.dtype)
    import diffusers  # noqa: F401

    import photomaker.pipeline as pm_pipeline
    import photomaker.pipeline_mixin as pm_mixin

    imports = time.perf_counter() - started_imports
    timer = PhaseTimer()
    result: dict[str, Any] = {"imports_s": imports}
    with common.quiet_libraries():
        if args.cold_child == "plain":
            load_s, pipe = common.timed(lambda: common.load_plain(models))
        else:
            timer.wrap(pm_mixin, "load_checkpoint", "read checkpoint")
            timer.wrap(pm_mixin, "build_id_encoder", "build ID encoder")
            timer.wrap(pm_mixin, "check_lora_applied", "LoRA check")
            timer.wrap(pm_mixin, "fuse_lora_into_unet", "fuse LoRA (or map cached fused weights)")
            started = time.perf_counter()
            pipe = pm_pipeline.PhotoMakerStableDiffusionXLPipeline.from_pretrained(models.base, dtype=models.dtype)
            timer.phases["from_pretrained"] = time.perf_counter() - started
            timer.wrap(pipe, "load_lora_into_unet", "LoRA into UNet")
            timer.wrap(pipe, "fuse_lora", "fuse LoRA")
            timer.wrap(pipe, "unload_lora_weights", "unload LoRA layers")
            cache = args.fused_cache if args.cold_child == "photomaker-cached" else None
            pipe.load_photomaker_adapter(models.v1, fused_cache_dir=cache)
            load_s = time.perf_counter() - started
            if common.has_lora_layers(pipe.unet):
                raise RuntimeError("LoRA layers are still in the UNet after fusing")
    # from_pretrained maps safetensors lazily: weights are read on first use. Touching every page of every weight
    # gives "ready to run" (what the first image pays anyway), the fairer figure when one side fused its weights.
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    if getattr(pipe, "id_encoder", None) is not None:
        modules.append(pipe.id_encoder)
    touch_s, _ = common.timed(lambda: [common.touch_pages(m) for m in modules])
    result.update(
        load_s=load_s,
        touch_s=touch_s,
        ready_s=load_s + touch_s,
        phases=timer.phases,
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    print("COLD " + json.dumps(result), flush=True)


def cold_start(args: argparse.Namespace) -> dict[str, Any]:
    """Alternating fresh-process loads of plain SDXL and PhotoMaker; the first pair warms the page cache."""
    variants = ["plain", "photomaker"] + (["photomaker-cached"] if args.fused_cache else [])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    base_cmd = [sys.executable, "-m", "bench.bench_speed", "--models", args.models, "--size", str(args.size)]
    if args.dir:
        base_cmd += ["--dir", args.dir]
    if args.dtype:
        base_cmd += ["--dtype", args.dtype]
    if args.fused_cache:
        base_cmd += ["--fused-cache", args.fused_cache]
    if args.threads:
        base_cmd += ["--threads", str(args.threads)]
    for repeat in range(args.cold_repeats + 1):
        for which in common.rotated(variants, repeat):
            completed = subprocess.run(
                [*base_cmd, "--cold-child", which], cwd=common.REPO_ROOT, capture_output=True, text=True, check=False
            )
            lines = [line for line in completed.stdout.splitlines() if line.startswith("COLD ")]
            if completed.returncode != 0 or not lines:
                raise RuntimeError(f"cold-start child failed ({which}):\n{completed.stderr[-3000:]}")
            if repeat > 0:  # repeat 0 only warms the page cache (and fills the fused-weight cache)
                runs[which].append(json.loads(lines[-1][5:]))
            common.logger.info("cold %s: %s", which, lines[-1][5:200])
    plain = common.median([r["load_s"] for r in runs["plain"]])
    result: dict[str, Any] = {
        "load_s": {name: [r["load_s"] for r in runs[name]] for name in variants},
        "imports_s": {k: common.median([r["imports_s"] for r in v]) for k, v in runs.items()},
        "phases_s": {},
        "ratio": {},
        "max_rss_bytes": {name: common.median([r["max_rss_bytes"] for r in runs[name]]) for name in variants},
    }
    result["ready_s"] = {name: [r["ready_s"] for r in runs[name]] for name in variants}
    result["ready_ratio"] = {}
    plain_ready = common.median(result["ready_s"]["plain"])
    for name in variants[1:]:
        result["ratio"][name] = common.median([r["load_s"] for r in runs[name]]) / plain
        result["ready_ratio"][name] = common.median(result["ready_s"][name]) / plain_ready
        result["phases_s"][name] = {
            phase: common.median([r["phases"].get(phase, 0.0) for r in runs[name]]) for phase in runs[name][0]["phases"]
        }
    return result


# ------------------------------------------------------------------------------------------- warm calls


def per_image(args: argparse.Namespace) -> dict[str, Any]:
    models = common.prepare_models(args.models, args.dir, args.dtype)
    with common.quiet_libraries():
        pm = common.load_photomaker(models)
        if args.unet == "shared":
            # Same module objects, so the same weights exactly; the UNet must hold no LoRA layers, or sharing
            # would hide their cost from the comparison.
            if common.has_lora_layers(pm.unet):
                raise RuntimeError("The PhotoMaker UNet still has LoRA layers: --unet shared would hide their cost")
            plain = common.load_plain(
                models, unet=pm.unet, text_encoder=pm.text_encoder, text_encoder_2=pm.text_encoder_2, vae=pm.vae
            )
        else:
            plain = common.load_plain(
                models, text_encoder=pm.text_encoder, text_encoder_2=pm.text_encoder_2, vae=pm.vae
            )
    encoder_bytes = common.module_bytes(pm.id_encoder)
    clock = common.StepClock()
    same_photos = common.photos(args.num_photos, seed=10_000)
    encoding = pm.encode_id_images(same_photos)

    def plain_call(seed: int, steps: int | None = None) -> common.Run:
        kwargs, _ = call_arguments(args, seed, steps)
        return common.timed_call(plain, clock, prompt=common.PLAIN_PROMPT, **kwargs)

    def first_call(seed: int, steps: int | None = None) -> common.Run:
        kwargs, merge = call_arguments(args, seed, steps)
        new_photos = common.photos(args.num_photos, seed=seed)  # never seen before
        return common.timed_call(
            pm, clock, prompt=common.PROMPT, input_id_images=new_photos, start_merge_step=merge, **kwargs
        )

    def reuse_call(seed: int, steps: int | None = None) -> common.Run:
        kwargs, merge = call_arguments(args, seed, steps)
        return common.timed_call(
            pm, clock, prompt=common.PROMPT, input_id_images=encoding, start_merge_step=merge, **kwargs
        )

    def encoder_only(seed: int) -> float:
        new_photos = common.photos(args.num_photos, seed=seed + 500_000)
        return common.timed(lambda: pm.encode_id_images(new_photos))[0]

    variants = {"plain": plain_call, "first_call": first_call, "reuse": reuse_call}
    for warm in range(args.warmup):  # kernels, allocator and caches settle; not recorded
        for fn in variants.values():
            fn(90_000 + warm, args.warmup_steps)
        encoder_only(90_000 + warm)

    # 1. What happens before the first UNet call (prompt and ID encoding): the only place where the two
    #    pipelines do different work. Each call is stopped at the UNet, so this is quick and can be alternated
    #    many times: a precise paired difference even on a busy machine.
    pre: dict[str, list[float]] = {name: [] for name in variants}
    encoder_s: list[float] = []
    for repeat in range(args.stage_repeats):
        for name in common.rotated(list(variants), repeat):
            pre[name].append(
                common.until_unet(variants[name], (plain if name == "plain" else pm).unet, 10_000 + repeat)
            )
        encoder_s.append(encoder_only(repeat))
    deltas = {name: [a - b for a, b in zip(pre[name], pre["plain"], strict=True)] for name in ("first_call", "reuse")}
    common.logger.info("pre-UNet medians: %s", {k: round(common.median(v), 3) for k, v in pre.items()})

    # 2. One UNet forward of each pipeline, alternated: the per-step cost, paired (the UNets are separate objects
    #    unless --unet shared; the PhotoMaker one holds the fused weights).
    unet_s: dict[str, list[float]] = {"plain": [], "photomaker": []}
    unet_inputs = unet_arguments(pm, args)
    for repeat in range(-1, args.step_repeats):  # round -1 warms both UNets up and is not recorded
        for name in common.rotated(list(unet_s), repeat):
            unet = plain.unet if name == "plain" else pm.unet
            seconds = common.timed(lambda unet=unet: unet(**unet_inputs))[0]
            if repeat >= 0:
                unet_s[name].append(seconds)
    common.logger.info("UNet forward medians: %s", {k: round(common.median(v), 3) for k, v in unet_s.items()})

    # 3. Whole calls, alternated: a check of the model below, and what follows the last step (VAE decode).
    runs: dict[str, list[common.Run]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        names = common.rotated(list(variants), repeat)
        for name in names:
            runs[name].append(variants[name](repeat))
        common.logger.info("repeat %d: %s", repeat, {n: round(runs[n][-1].total, 3) for n in names})

    n = EXTRAPOLATE_STEPS
    per_step = common.median([s for name in variants for run in runs[name] for s in run.steps])
    per_step_by = {name: common.median([s for run in runs[name] for s in run.steps]) for name in variants}
    post_by = {name: common.median([run.post for run in runs[name]]) for name in variants}
    post = common.median([run.post for name in variants for run in runs[name]])  # same VAE, same decode
    totals = {name: common.median([run.total for run in runs[name]]) for name in variants}
    pre_med = {name: common.median(values) for name, values in pre.items()}
    delta_med = {name: common.median(values) for name, values in deltas.items()}

    # Both pipelines run the same UNet architecture on the same inputs; the paired ratio (reported) shows the
    # per-step costs agree within noise, so the model charges both the pooled per-step cost and only the measured
    # fixed-cost difference is PhotoMaker's (a few percent of noise on 50 steps would otherwise swamp it).
    unet_step = common.median(unet_s["plain"] + unet_s["photomaker"])
    unet_ratio = common.median(unet_s["photomaker"]) / common.median(unet_s["plain"])

    def model(name: str, steps: int) -> float:
        """pre-UNet (plain's + the paired difference) + steps x UNet forward (pooled) + post (pooled)."""
        extra = 0.0 if name == "plain" else delta_med[name]
        return pre_med["plain"] + extra + steps * unet_step + post

    at_n = {name: model(name, n) for name in variants}
    return {
        "runs_s": {name: [run.total for run in runs[name]] for name in variants},
        "run_steps_s": {name: [run.steps for run in runs[name]] for name in variants},
        "unet_forward_s": unet_s,
        "unet_forward_ratio": unet_ratio,
        "unet_forward_pooled_s": unet_step,
        "pre_unet_s": pre,
        "pre_unet_extra_s": deltas,
        "per_step_s": per_step,
        "per_step_by_variant_s": per_step_by,
        "post_s": post,
        "post_by_variant_s": post_by,
        "total_s": totals,
        "measured_ratio": {name: totals[name] / totals["plain"] for name in ("first_call", "reuse")},
        "model_ratio_measured_steps": {
            name: model(name, args.steps) / model("plain", args.steps) for name in ("first_call", "reuse")
        },
        "per_step_ratio": {name: per_step_by[name] / per_step_by["plain"] for name in ("first_call", "reuse")},
        f"model_{n}_steps_s": at_n,
        f"ratio_{n}_steps": {name: at_n[name] / at_n["plain"] for name in ("first_call", "reuse")},
        "id_encoder_s": encoder_s,
        f"id_encoder_share_of_plain_{n}_steps": common.median(encoder_s) / at_n["plain"],
        "id_encoder_bytes": encoder_bytes,
        "id_encoder_parameters": sum(p.numel() for p in pm.id_encoder.parameters()),
    }


# ------------------------------------------------------------------------------------------- report


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    if "per_image" in result:
        title = (
            f"Speed ({args.models} models, {result['dtype']}, {args.size}x{args.size}, {args.steps} steps, "
            f"guidance {args.guidance}, {args.num_photos} ID photo(s))"
        )
    else:
        title = f"Cold start ({args.models} models, {result['dtype']}, fresh processes, {args.cold_repeats} each)"
    lines = common.header(title, result)
    if "per_image" in result:
        r = result["per_image"]
        n = EXTRAPOLATE_STEPS
        rows = []
        for name, label in (("first_call", "(a) first call, new photos"), ("reuse", "(b) same photos again")):
            rows.append(
                [
                    label,
                    common.spread(r["runs_s"]["plain"]),
                    common.spread(r["runs_s"][name]),
                    f"{r['measured_ratio'][name]:.3f}",
                    f"{r['model_ratio_measured_steps'][name]:.4f}",
                    f"{r[f'ratio_{n}_steps'][name]:.4f}",
                    f"<= {TARGETS[name]}",
                    common.verdict(r[f"ratio_{n}_steps"][name], TARGETS[name]),
                ]
            )
        headers = [
            "what",
            "plain SDXL (whole call)",
            "PhotoMaker (whole call)",
            f"whole calls' ratio ({args.steps} steps, noisy)",
            f"model ratio ({args.steps} steps)",
            f"model ratio ({n} steps)",
            "target",
            "verdict",
        ]
        lines.append(common.table(headers, rows))
    if "cold_start" in result:
        c = result["cold_start"]
        rows = []
        for name, label in (("photomaker", "load + adapter + fuse"), ("photomaker-cached", "load + cached adapter")):
            if name not in c["ratio"]:
                continue
            for key, ratio, suffix in (
                ("load_s", "ratio", ""),
                ("ready_s", "ready_ratio", " + page-in of all weights"),
            ):
                rows.append(
                    [
                        f"(c) {label}{suffix}",
                        common.spread(c[key]["plain"]),
                        common.spread(c[key][name]),
                        f"{c[ratio][name]:.3f}",
                        f"<= {TARGETS['cold_start']}",
                        common.verdict(c[ratio][name], TARGETS["cold_start"]),
                    ]
                )
        if "per_image" in result:
            lines.append("")
        lines.append(common.table(["cold start", "plain SDXL", "PhotoMaker", "ratio", "target", "verdict"], rows))
    if "per_image" in result:
        r = result["per_image"]
        pre = r["pre_unet_s"]
        lines += [
            "",
            common.table(
                ["cost", "value"],
                [
                    [
                        "before the first UNet call: plain / first call / reuse",
                        " / ".join(common.spread(pre[k]) for k in ("plain", "first_call", "reuse")),
                    ],
                    [
                        "PhotoMaker's extra before the UNet (paired): first call / reuse",
                        " / ".join(common.spread(r["pre_unet_extra_s"][k]) for k in ("first_call", "reuse")),
                    ],
                    [
                        "one UNet forward, paired: plain / PhotoMaker (ratio)",
                        " / ".join(common.spread(r["unet_forward_s"][k]) for k in ("plain", "photomaker"))
                        + f" ({r['unet_forward_ratio']:.3f})",
                    ],
                    ["per denoising step in whole calls (pooled median)", common.spread([r["per_step_s"]])],
                    [
                        "per-step ratio in whole calls, first call / reuse vs plain",
                        f"{r['per_step_ratio']['first_call']:.3f} / {r['per_step_ratio']['reuse']:.3f}",
                    ],
                    [
                        "after the last step (VAE decode, postprocess): plain / first call / reuse",
                        " / ".join(
                            common.spread([r["post_by_variant_s"][k]]) for k in ("plain", "first_call", "reuse")
                        ),
                    ],
                    ["(d) ID encoder alone (encode_id_images)", common.spread(r["id_encoder_s"])],
                    [
                        f"(d) ID encoder share of a plain {EXTRAPOLATE_STEPS}-step image",
                        f"{100 * r[f'id_encoder_share_of_plain_{EXTRAPOLATE_STEPS}_steps']:.2f} %",
                    ],
                    ["ID encoder size", f"{r['id_encoder_parameters']:,} parameters, {r['id_encoder_bytes']:,} bytes"],
                ],
            ),
        ]
    if "cold_start" in result:
        for name, phases in result["cold_start"]["phases_s"].items():
            lines += [
                "",
                f"{name} cold start by phase (median): "
                + ", ".join(f"{phase} {common.spread([value])}" for phase, value in phases.items()),
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.common_arguments(parser, default_size=64, default_steps=4)
    parser.add_argument("--repeats", type=int, default=9, help="whole calls of each variant")
    parser.add_argument(
        "--stage-repeats",
        type=int,
        default=15,
        help="calls of each variant stopped at the first UNet call (prompt + ID encoding only)",
    )
    parser.add_argument("--step-repeats", type=int, default=9, help="single UNet forwards of each pipeline")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, help="steps of the warm-up calls (default: --steps)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="fresh-process loads of each pipeline")
    parser.add_argument("--num-photos", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument(
        "--unet",
        choices=("separate", "shared"),
        default="separate",
        help="plain SDXL gets its own UNet from the base folder (default) or runs PhotoMaker's "
        "fused one (saves 5 GB at real size; same compute)",
    )
    parser.add_argument("--parts", default="per-image,cold", help="comma list of per-image, cold")
    parser.add_argument(
        "--fused-cache",
        help="also time the cold start with this fused-weight cache folder "
        "(load_photomaker_adapter(fused_cache_dir=...)); filled by the first, discarded load",
    )
    parser.add_argument("--cold-child", choices=("plain", "photomaker", "photomaker-cached"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose, getattr(args, "threads", None))
    if args.cold_child:
        cold_child(args)
        return {}
    parts = set(args.parts.split(","))
    models = common.prepare_models(args.models, args.dir, args.dtype)
    result = common.new_result(args, models, unet=args.unet)
    if "per-image" in parts:
        result["per_image"] = per_image(args)
    if "cold" in parts:
        result["cold_start"] = cold_start(args)
    return common.finish(args, result, report)


if __name__ == "__main__":
    main()
