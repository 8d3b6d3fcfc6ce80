"""Fast mode: each few-step preset against the default 50 steps, per image, on the same PhotoMaker pipeline.

    python -m bench.bench_fast --models tiny
    python -m bench.bench_fast --models real --dir /tmp/pm-real --size 512 --measure-steps 3 --repeats 1

The preset path is the real one: `photomaker.presets.apply_fast_preset` loads the preset's LoRA (from the local
folder of random LoRAs in each preset's key format written by make-tiny-style code in bench.sdxl) next to the fused
PhotoMaker LoRA, fuses it, switches the scheduler; the call uses the preset's steps, guidance and merge step;
`restore_standard_mode` undoes it. Standard mode is the app's default: 50 steps, guidance 5, Euler.

Per image with the same photos (an `IDEncoding`, as on a cache hit; the ID encoder costs the same in both modes).
With ``--measure-steps N`` (for real-size models on a CPU) each mode is run with N steps and its time at its own
step count is `fixed + steps x per-step`, both measured in that mode (per-step differs: CFG doubles the batch).
Without it every mode runs its full step count.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench import common
from photomaker import presets

TARGET = 6.0


def run_mode(
    pipe: Any, encoding: Any, clock: common.StepClock, *, steps: int, guidance: float, merge: int, size: int, seed: int
) -> common.Run:
    return common.timed_call(
        pipe,
        clock,
        prompt=common.PROMPT,
        negative_prompt=common.NEGATIVE_PROMPT,
        input_id_images=encoding,
        num_inference_steps=steps,
        guidance_scale=guidance,
        start_merge_step=merge,
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
    )


def model_time(runs: list[common.Run], measured_steps: int, target_steps: int) -> dict[str, float]:
    per_step = common.median([s for run in runs for s in run.steps])
    fixed = common.median([run.fixed(per_step, measured_steps) for run in runs])
    return {
        "per_step_s": per_step,
        "fixed_s": fixed,
        "time_s": fixed + target_steps * per_step,
        "measured_total_s": common.median([run.total for run in runs]),
    }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler

    models = common.prepare_models(args.models, args.dir, args.dtype)
    with common.quiet_libraries():
        pipe = common.load_photomaker(models)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the service's standard scheduler
    encoding = pipe.encode_id_images(common.photos(args.num_photos, seed=7))
    clock = common.StepClock()
    standard_steps = args.steps  # the app's default, 50

    def measure(steps: int) -> int:
        return min(steps, args.measure_steps) if args.measure_steps else steps

    def standard(seed: int, steps: int | None = None) -> common.Run:
        steps = steps or measure(standard_steps)
        return run_mode(
            pipe,
            encoding,
            clock,
            steps=steps,
            guidance=presets.GUIDANCE_DEFAULT,
            merge=presets.start_merge_step(presets.STYLE_STRENGTH_DEFAULT, steps),
            size=args.size,
            seed=seed,
        )

    for warm in range(args.warmup):  # warm-up calls: 1 step is enough to set kernels and caches up
        standard(900 + warm, 1)
    standard_runs = [standard(r) for r in range(args.repeats)]
    chosen = [key.strip() for key in args.presets.split(",")] if args.presets else list(presets.FAST_PRESETS)
    results: dict[str, Any] = {}
    for key in chosen:
        preset = presets.get_fast_preset(key).with_weights(models.fast_loras)
        switch_s, state = common.timed(lambda preset=preset: presets.apply_fast_preset(pipe, preset))
        steps = measure(preset.steps)
        merge = min(preset.start_merge_step(presets.STYLE_STRENGTH_DEFAULT), max(steps - 1, 0))
        try:
            for warm in range(args.warmup):
                run_mode(
                    pipe,
                    encoding,
                    clock,
                    steps=1,
                    guidance=preset.guidance_scale,
                    merge=0,
                    size=args.size,
                    seed=800 + warm,
                )
            runs = [
                run_mode(
                    pipe,
                    encoding,
                    clock,
                    steps=steps,
                    guidance=preset.guidance_scale,
                    merge=merge,
                    size=args.size,
                    seed=r,
                )
                for r in range(args.repeats)
            ]
        finally:
            restore_s, _ = common.timed(lambda state=state: presets.restore_standard_mode(pipe, state))
        if common.has_lora_layers(pipe.unet):
            raise RuntimeError(f"LoRA layers left in the UNet after restoring from {key}")
        results[key] = {
            "steps": preset.steps,
            "measured_steps": steps,
            "guidance": preset.guidance_scale,
            "cfg": preset.uses_cfg,
            "scheduler": preset.scheduler,
            "switch_s": switch_s,
            "restore_s": restore_s,
            **model_time(runs, steps, preset.steps),
        }
        standard_runs.append(standard(100 + len(standard_runs)))  # brackets each preset against drift
        common.logger.info("%s: %s", key, {k: v for k, v in results[key].items() if k.endswith("_s")})
    std = model_time(standard_runs, measure(standard_steps), standard_steps)
    for value in results.values():
        value["speedup"] = std["time_s"] / value["time_s"]
        value["speedup_per_step_only"] = (standard_steps * std["per_step_s"]) / (value["steps"] * value["per_step_s"])
    return {
        "standard": {"steps": standard_steps, "guidance": presets.GUIDANCE_DEFAULT, **std},
        "presets": results,
        "default_preset": presets.DEFAULT_FAST_PRESET,
    }


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    b = result["fast"]
    std = b["standard"]
    how = (
        f"each mode run at {args.measure_steps} steps, extrapolated to its own step count"
        if args.measure_steps
        else "each mode run at its full step count"
    )
    lines = common.header(
        f"Fast mode ({args.models} models, {result['dtype']}, {args.size}x{args.size}, "
        f"{args.num_photos} ID photo(s), {how}, {args.repeats} repeat(s))",
        result,
    )
    rows = [
        [
            "standard (default)",
            std["steps"],
            std["guidance"],
            "yes",
            common.spread([std["per_step_s"]]),
            common.spread([std["fixed_s"]]),
            common.spread([std["time_s"]]),
            "1.00",
            "-",
            "-",
        ]
    ]
    for key, v in b["presets"].items():
        label = key + (" (default fast)" if key == b["default_preset"] else "")
        rows.append(
            [
                label,
                v["steps"],
                v["guidance"],
                "yes" if v["cfg"] else "no",
                common.spread([v["per_step_s"]]),
                common.spread([v["fixed_s"]]),
                common.spread([v["time_s"]]),
                f"{v['speedup']:.2f}",
                f">= {TARGET:g}",
                common.verdict(-v["speedup"], -TARGET),
            ]
        )
    lines.append(
        common.table(
            ["mode", "steps", "guidance", "CFG", "per step", "fixed", "per image", "speed-up", "target", "verdict"],
            rows,
        )
    )
    lines += [
        "",
        "Switching into / out of each preset (LoRA load + fuse + scheduler; unfuse + unload): "
        + ", ".join(
            f"{key} {common.spread([v['switch_s']])} / {common.spread([v['restore_s']])}"
            for key, v in b["presets"].items()
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.common_arguments(parser, default_size=64, default_steps=presets.STEPS_DEFAULT)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--measure-steps", type=int, help="run every mode at this many steps and extrapolate")
    parser.add_argument("--presets", help="comma list of preset keys (default: all)")
    parser.add_argument("--num-photos", type=int, default=1)
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose, getattr(args, "threads", None))
    started = time.perf_counter()
    models = common.prepare_models(args.models, args.dir, args.dtype)
    result = common.new_result(args, models)
    result["fast"] = benchmark(args)
    result["seconds"] = time.perf_counter() - started
    return common.finish(args, result, report)


if __name__ == "__main__":
    main()
