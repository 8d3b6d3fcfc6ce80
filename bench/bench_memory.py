"""Peak memory: PhotoMaker against plain diffusers SDXL, each measured in a fresh process.

    python -m bench.bench_memory --models tiny
    python -m bench.bench_memory --models real --dir /tmp/pm-real --size 512 --steps 2 --repeats 1
    python -m bench.bench_memory --models real --dir DIR --device cuda --size 1024 --steps 30   # on a GPU

Each child process loads one pipeline and makes one image, and reports the peak of every phase:

* CPU: peak resident set size (Linux ``VmHWM``, reset between phases through ``/proc/self/clear_refs``, so each
  phase's peak is exact; the whole-process peak is the largest of them);
* CUDA: ``torch.cuda.max_memory_allocated`` per phase (``reset_peak_memory_stats`` between phases).

Target: PhotoMaker's whole-process peak <= plain SDXL's + the ID encoder's own size (its weights in the model dtype).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import common

COPY_PHASE = "weights into memory (benchmark step, not counted)"


class PeakMeter:
    """Peak memory per phase: VmHWM (reset per phase) on the CPU, max_memory_allocated on CUDA."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.phases: dict[str, dict[str, int]] = {}
        self._can_reset = self._reset()

    @staticmethod
    def _status(field: str) -> int:
        text = Path("/proc/self/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        return int(match.group(1)) * 1024 if match else 0

    def _reset(self) -> bool:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def end_phase(self, name: str) -> None:
        record = {"rss_peak": self._status("VmHWM"), "rss_after": self._status("VmRSS")}
        if self.cuda:
            torch.cuda.synchronize()
            record["cuda_peak"] = torch.cuda.max_memory_allocated()
            record["cuda_after"] = torch.cuda.memory_allocated()
        self.phases[name] = record
        self._reset()

    def summary(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "phases": self.phases,
            # The benchmark's own copy step holds the mapped and the copied weights at once: not the pipelines'.
            "rss_peak": max(p["rss_peak"] for name, p in self.phases.items() if name != COPY_PHASE),
            # ru_maxrss would not do: resetting VmHWM also lowers what getrusage reports.
            "per_phase_reset": self._can_reset,
        }
        if self.cuda:
            result["cuda_peak"] = max(p["cuda_peak"] for p in self.phases.values())
        return result


def child(args: argparse.Namespace) -> None:
    """One fresh process: load one pipeline, make one image, print the peaks as one JSON line."""
    models = common.prepare_models(args.models, args.dir, args.dtype)
    import photomaker.pipeline  # noqa: F401  (import costs are not what is compared)
    from photomaker import presets

    meter = PeakMeter(args.device)
    meter.end_phase("imports")
    started = time.perf_counter()
    with common.quiet_libraries():
        if args.child == "plain":
            pipe = common.load_plain(models)
        else:
            from photomaker.pipeline import PhotoMakerStableDiffusionXLPipeline

            pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(models.base, dtype=models.dtype)
            pipe.set_progress_bar_config(disable=True)
    meter.end_phase("load base")
    extra: dict[str, Any] = {}
    if args.child == "photomaker":
        pipe.load_photomaker_adapter(models.v1)
        extra["id_encoder_bytes"] = common.module_bytes(pipe.id_encoder)
        extra["id_encoder_parameters"] = sum(p.numel() for p in pipe.id_encoder.parameters())
        meter.end_phase("adapter + fuse")
    if args.device != "cpu":
        pipe.to(args.device)
        meter.end_phase("to device")
    elif not args.lazy:
        # from_pretrained maps the safetensors files: weights are file pages that enter the RSS when first used and
        # that the kernel may take back and fault in again, so the peak moves by a few hundred MB from run to run.
        # Copying every weight into ordinary memory, in both pipelines alike, makes the figure exact.
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        if getattr(pipe, "id_encoder", None) is not None:
            modules.append(pipe.id_encoder)
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.data = tensor.data.clone()
        # The copies free the old blocks; glibc would keep some in the process (more for PhotoMaker, whose fused
        # weights are already ordinary memory): hand them back so that the copy step itself is not measured.
        from photomaker.pipeline import _return_freed_memory

        _return_freed_memory()
        meter.end_phase(COPY_PHASE)
    kwargs = {
        "negative_prompt": common.NEGATIVE_PROMPT,
        "num_inference_steps": args.steps,
        "guidance_scale": 5.0,
        "height": args.size,
        "width": args.size,
        "generator": torch.Generator("cpu").manual_seed(0),
        "output_type": "pil",
    }
    if args.child == "plain":
        pipe(common.PLAIN_PROMPT, **kwargs)
    else:
        pipe(
            common.PROMPT,
            input_id_images=common.photos(args.num_photos, seed=1),
            start_merge_step=presets.start_merge_step(presets.STYLE_STRENGTH_DEFAULT, args.steps),
            **kwargs,
        )
    meter.end_phase("generate")
    result = {**meter.summary(), **extra, "seconds": time.perf_counter() - started}
    print("MEM " + json.dumps(result), flush=True)


def run_children(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "photomaker": []}
    command = [
        sys.executable,
        "-m",
        "bench.bench_memory",
        "--models",
        args.models,
        "--size",
        str(args.size),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--num-photos",
        str(args.num_photos),
    ]
    if args.lazy:
        command.append("--lazy")
    if args.dir:
        command += ["--dir", args.dir]
    if args.dtype:
        command += ["--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    for repeat in range(args.repeats):
        for which in common.rotated(["plain", "photomaker"], repeat):
            completed = subprocess.run(
                [*command, "--child", which], cwd=common.REPO_ROOT, capture_output=True, text=True, check=False
            )
            lines = [line for line in completed.stdout.splitlines() if line.startswith("MEM ")]
            if completed.returncode != 0 or not lines:
                raise RuntimeError(f"memory child failed ({which}):\n{completed.stderr[-3000:]}")
            runs[which].append(json.loads(lines[-1][4:]))
            common.logger.info("%s: peak RSS %.0f MB", which, runs[which][-1]["rss_peak"] / 1e6)
    return runs


def summarise(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(which: str, key: str) -> float:
        return common.median([r[key] for r in runs[which]])

    encoder = runs["photomaker"][0]["id_encoder_bytes"]
    result: dict[str, Any] = {
        "runs": runs,
        "id_encoder_bytes": encoder,
        "id_encoder_parameters": runs["photomaker"][0]["id_encoder_parameters"],
        "rss_peak": {"plain": med("plain", "rss_peak"), "photomaker": med("photomaker", "rss_peak")},
    }
    result["rss_extra"] = result["rss_peak"]["photomaker"] - result["rss_peak"]["plain"]
    result["rss_target_met"] = result["rss_extra"] <= encoder
    if args.device.startswith("cuda"):
        result["cuda_peak"] = {"plain": med("plain", "cuda_peak"), "photomaker": med("photomaker", "cuda_peak")}
        result["cuda_extra"] = result["cuda_peak"]["photomaker"] - result["cuda_peak"]["plain"]
        result["cuda_target_met"] = result["cuda_extra"] <= encoder
    phases: dict[str, dict[str, float]] = {}
    for which in ("plain", "photomaker"):
        for phase in runs[which][0]["phases"]:
            values = [r["phases"][phase]["rss_peak"] for r in runs[which]]
            phases.setdefault(phase, {})[which] = common.median(values)
    result["rss_peak_by_phase"] = phases
    return result


def mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.0f} MB"


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    lines = common.header(
        f"Peak memory ({args.models} models, {result['dtype']}, {args.device}, "
        f"{args.size}x{args.size}, {args.steps} steps, {args.num_photos} ID photo(s), "
        f"{args.repeats} fresh process(es) each, {'weights memory-mapped' if args.lazy else 'weights in memory'})",
        result,
    )
    m = result["memory"]
    encoder = m["id_encoder_bytes"]
    rows = [
        [
            "peak RSS, whole process",
            mb(m["rss_peak"]["plain"]),
            mb(m["rss_peak"]["photomaker"]),
            mb(m["rss_extra"]),
            f"<= {mb(encoder)}",
            "met" if m["rss_target_met"] else "missed",
        ]
    ]
    if "cuda_peak" in m:
        rows.append(
            [
                "max_memory_allocated (CUDA)",
                mb(m["cuda_peak"]["plain"]),
                mb(m["cuda_peak"]["photomaker"]),
                mb(m["cuda_extra"]),
                f"<= {mb(encoder)}",
                "met" if m["cuda_target_met"] else "missed",
            ]
        )
    lines.append(
        common.table(["measure", "plain SDXL", "PhotoMaker", "extra", "target (+ ID encoder)", "verdict"], rows)
    )
    lines += [
        "",
        "Peak RSS by phase (median):",
        "",
        common.table(
            ["phase", "plain SDXL", "PhotoMaker"],
            [
                [phase, mb(values.get("plain")), mb(values.get("photomaker"))]
                for phase, values in m["rss_peak_by_phase"].items()
            ],
        ),
        "",
        (
            f"ID encoder: {m['id_encoder_parameters']:,} parameters, {encoder:,} bytes "
            f"({mb(encoder)}) in {result['dtype']}."
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.common_arguments(parser, default_size=64, default_steps=2)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per pipeline")
    parser.add_argument("--num-photos", type=int, default=4)
    parser.add_argument(
        "--lazy",
        action="store_true",
        help="keep the weights memory-mapped as from_pretrained leaves them (noisier RSS)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to measure max_memory_allocated on a GPU")
    parser.add_argument("--child", choices=("plain", "photomaker"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose, getattr(args, "threads", None))
    if args.child:
        child(args)
        return {}
    models = common.prepare_models(args.models, args.dir, args.dtype)
    result = common.new_result(args, models)
    result["memory"] = summarise(args, run_children(args))
    return common.finish(args, result, report)


if __name__ == "__main__":
    main()
