"""Shared pieces of the benchmarks: the models under test, machine facts, timing and table helpers.

Two model sets:
* ``tiny``: ``photomaker.testing.make_tiny`` (real architecture, tiny widths) plus tiny fast-mode LoRAs; built in
  about a second, good for many repeats and for the smoke tests.
* ``real``: ``bench.make_real_size`` (real SDXL sizes, random bf16 weights, official layouts); build it once.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("bench")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TINY_DIR = REPO_ROOT / "tiny-models"  # git-ignored
PROMPT = "candid photograph of a man img, natural window light, 50mm lens, shallow depth of field"
PLAIN_PROMPT = PROMPT.replace(" img", "")  # the same words without the trigger, for plain SDXL
NEGATIVE_PROMPT = "painting, drawing, cartoon, cgi render, oversaturated, blurry, low resolution, watermark, text"


# --------------------------------------------------------------------------------------------- models


@dataclass
class Models:
    """Where the weights under test are, and how to load them."""

    kind: str  # "tiny" | "real"
    base: Path  # diffusers SDXL folder
    v1: Path  # photomaker-v1.bin
    fast_loras: Path  # folder with one LoRA per fast preset under its official file name
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def prepare_models(kind: str, directory: str | os.PathLike[str] | None = None, dtype: str | None = None) -> Models:
    """Build (once) and locate the ``kind`` models. Real-size ones must have been written by make_real_size."""
    if kind == "tiny":
        from photomaker.testing import make_tiny

        paths = make_tiny(Path(directory) if directory else DEFAULT_TINY_DIR)
        return Models("tiny", paths["base"], paths["v1"], paths["fast_loras"], _dtype(dtype, torch.float32))
    if kind == "real":
        if directory is None:
            raise SystemExit("--dir is required with --models real (write it with: python -m bench.make_real_size DIR)")
        root = Path(directory)
        models = Models(
            "real", root / "base", root / "photomaker-v1.bin", root / "fast-loras", _dtype(dtype, torch.bfloat16)
        )
        missing = [str(p) for p in (models.base / "model_index.json", models.v1) if not p.exists()]
        if missing:
            raise SystemExit(f"Missing {missing}: run python -m bench.make_real_size {root} first")
        return models
    raise SystemExit(f"Unknown model set {kind!r}: use tiny or real")


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_plain(models: Models, **components: Any):
    """Plain diffusers StableDiffusionXLPipeline from the base folder (``components`` replace loaded parts)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(models.base, dtype=models.dtype, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_photomaker(models: Models, **components: Any):
    """PhotoMaker pipeline from the same base folder, adapter loaded and its LoRA fused (the service's way)."""
    from photomaker.pipeline import PhotoMakerStableDiffusionXLPipeline

    pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(models.base, dtype=models.dtype, **components)
    pipe.load_photomaker_adapter(models.v1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def has_lora_layers(module: torch.nn.Module) -> bool:
    """Whether peft LoRA layers are still wrapped around any weight (a fused-and-unloaded UNet has none)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def module_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of a module's parameters and buffers (in ``dtype`` when given, else as stored)."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        size = (
            torch.empty((), dtype=dtype).element_size()
            if dtype is not None and tensor.is_floating_point()
            else tensor.element_size()
        )
        total += tensor.numel() * size
    return total


def touch_pages(module: torch.nn.Module, page: int = 4096) -> float:
    """Read one value per memory page of every weight (forces lazily mapped weights in); returns a checksum."""
    total = 0.0
    for tensor in [*module.parameters(), *module.buffers()]:
        flat = tensor.detach().reshape(-1)
        if flat.numel() and flat.device.type != "meta":
            total += float(flat[:: max(1, page // flat.element_size())].float().sum())
    return total


def photos(count: int, seed: int, size: int = 320) -> list[Image.Image]:
    """``count`` new photos (smooth random colour fields; the encoder's cost does not depend on content)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((size, size), Image.BICUBIC))
    return images


# --------------------------------------------------------------------------------------------- timing


class StepClock:
    """``callback_on_step_end`` that records when each denoising step ended."""

    def __init__(self) -> None:
        self.start = 0.0
        self.ends: list[float] = []

    def begin(self) -> None:
        self.start = time.perf_counter()
        self.ends = []

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        self.ends.append(time.perf_counter())
        return {}

    def step_times(self) -> list[float]:
        """Durations of steps 1..n-1 (step 0 also holds the prompt encoding, so it is left out)."""
        return [b - a for a, b in itertools.pairwise(self.ends)]


@dataclass
class Run:
    """One timed pipeline call."""

    total: float
    steps: list[float]  # durations of steps 1..n-1
    post: float  # from the end of the last step to the return: VAE decode, postprocessing

    def fixed(self, per_step: float, num_steps: int) -> float:
        """Everything that is not a denoising step: prompt and ID encoding, latents, VAE decode, overhead."""
        return self.total - per_step * num_steps


def timed_call(pipe: Any, clock: StepClock, **kwargs: Any) -> Run:
    clock.begin()
    pipe(callback_on_step_end=clock, **kwargs)
    end = time.perf_counter()
    return Run(end - clock.start, clock.step_times(), end - clock.ends[-1] if clock.ends else float("nan"))


class _ReachedUNet(Exception):
    pass


def _stop(module: Any, args: Any, kwargs: Any) -> None:
    raise _ReachedUNet


def until_unet(call: Callable[[int], Any], unet: torch.nn.Module, seed: int) -> float:
    """Seconds from the start of ``call(seed)`` (a pipeline call) to its first UNet forward, where it is stopped."""
    handle = unet.register_forward_pre_hook(_stop, with_kwargs=True)
    started = time.perf_counter()
    try:
        call(seed)
    except _ReachedUNet:
        return time.perf_counter() - started
    finally:
        handle.remove()
    raise RuntimeError("The pipeline call returned without calling the UNet")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """``median [min-max]`` in seconds or milliseconds, whichever reads better."""
    if not values:
        return "-"
    unit, scale = ("ms", 1000.0) if max(values) < 1 else ("s", 1.0)
    if len(values) == 1:
        return f"{values[0] * scale:.3g} {unit}"
    return f"{median(values) * scale:.3g} {unit} [{min(values) * scale:.3g}-{max(values) * scale:.3g}]"


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` rotated left by ``shift``: alternates which variant runs first in each repeat."""
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


# --------------------------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, library versions and date: the header of every result."""
    import diffusers
    import peft
    import transformers

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = round(int(line.split()[1]) / 1024**2, 1)
    info = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": ram,
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    return info


def header(title: str, result: dict[str, Any]) -> list[str]:
    """Title, command line, machine and date: the first lines of every report."""
    machine = result["machine"]
    return [
        f"## {title}",
        "",
        f"`{result['command']}`  ",
        (
            f"{machine['date']}, {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM, torch "
            f"{machine['torch']}, diffusers {machine['diffusers']}; load average at start "
            f"{machine['load_average_at_start']}"
        ),
        "",
    ]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "missed"


def command_line() -> str:
    """How this script was started, as ``python -m bench.<script> ...`` when it is one of ours."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    args = " ".join(sys.argv[1:])
    if script is not None and script.suffix == ".py" and script.parent == REPO_ROOT / "bench":
        return f"python -m bench.{script.stem} {args}".strip()
    return " ".join(sys.argv)


def new_result(args: Any, models: Models | None = None, **fields: Any) -> dict[str, Any]:
    """The header every benchmark result starts with: how it was run, where, and with which settings."""
    result: dict[str, Any] = {"command": command_line(), "machine": machine_info()}
    if models is not None:
        result["dtype"] = models.dtype_name
    result.update(fields)
    result["settings"] = vars(args)
    return result


def finish(args: Any, result: dict[str, Any], report: Callable[[Any, dict[str, Any]], str]) -> dict[str, Any]:
    """Add the printed report to ``result``, print it, and write everything to ``--json`` when given."""
    result["report"] = report(args, result)
    print(result["report"])
    write_result(args.json, result)
    return result


def write_result(path: str | os.PathLike[str] | None, data: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=_json_default))
    logger.info("Wrote %s", path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the libraries' info/progress chatter while benchmarking (warnings still show)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    yield


def setup_logging(verbose: bool = False, threads: int | None = None) -> None:
    """Logging, no autograd, and optionally the number of CPU threads torch uses."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    torch.set_grad_enabled(False)
    if threads:
        torch.set_num_threads(threads)


def common_arguments(parser: Any, *, default_size: int, default_steps: int) -> None:
    parser.add_argument("--models", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--dir", help="models folder (tiny: built if missing, default ./tiny-models; real: required)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: tiny fp32, real bf16")
    parser.add_argument("--size", type=int, default=default_size, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, all cores)")
