"""``python -m photomaker {generate,batch,score,make-tiny,eval,prepare-data,train}``: a thin shell.

generate, batch and score go through `photomaker.service`; eval, prepare-data and train are registered from their
packages (`photomaker.evaluation`, `photomaker.train`), which own their flags and bodies.

Model options (`photomaker.flags.MODEL_FLAGS`, the same as app.py's) are shared by every command that loads the
model and map one to one onto `ServiceConfig`; generate's request flags come from the field table. A
flag that is not given falls back to its PHOTOMAKER_* environment variable, then to the service's default.
A `PhotoMakerError` (a mistake the user can fix) prints ``error: <message>`` and exits with status 2, without
a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from photomaker.errors import InvalidRequestError, PhotoMakerError
from photomaker.flags import add_model_flags, add_request_flags, model_settings, request_from_flags

if TYPE_CHECKING:
    from photomaker.config import ServiceConfig
    from photomaker.requests import GenerationRequest, GenerationResult
    from photomaker.service import PhotoMakerService

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_JOBS_FAILED = 1
EXIT_INTERRUPTED = 130
MODEL_GROUP = "model (each defaults to its environment variable)"


class ProgressBar:
    """Shows the service's progress reports ``(step, total, description)`` as a tqdm bar on stderr.

    Loading and denoising report different totals; a new bar starts whenever the total changes.
    """

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._bar: Any = None

    def __call__(self, step: int, total: int, description: str) -> None:
        from tqdm.auto import tqdm

        if self._bar is None or self._bar.total != total:
            self.close()
            self._bar = tqdm(
                total=total,
                desc=description,
                file=sys.stderr,
                dynamic_ncols=True,
                disable=not self._enabled,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]",
            )
        self._bar.set_description_str(description, refresh=False)
        self._bar.n = min(step, total)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# Arguments (the flags themselves are defined in photomaker.flags, shared with app.py)
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m photomaker", description="PhotoMaker: pictures of a person from 1-4 photos and a prompt."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate images from ID photos and a prompt")
    add_request_flags(generate)
    generate.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs (created if missing)")
    add_model_flags(generate.add_argument_group(MODEL_GROUP))
    generate.set_defaults(handler=_cmd_generate)

    batch = commands.add_parser(
        "batch",
        help="generate every job of a JSON Lines file (resumable; splits over accelerate processes)",
        description="One JSON object per line with generate's fields (id_images, prompt, seed, num_steps, "
        "num_outputs, style, aspect_ratio, ...). Outputs are DIR/job-<line>-<k>.png; finished ones "
        "are skipped on a re-run. Run on several GPUs with: accelerate launch -m photomaker batch ...",
    )
    batch.add_argument("jobs", metavar="JOBS.jsonl")
    batch.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs and errors.jsonl")
    add_model_flags(batch.add_argument_group(MODEL_GROUP))
    batch.set_defaults(handler=_cmd_batch)

    score = commands.add_parser("score", help="how much the face in an image looks like the reference photos")
    score.add_argument(
        "--reference",
        action="append",
        required=True,
        metavar="PHOTO",
        dest="references",
        help="photo of the person (repeatable)",
    )
    score.add_argument("--image", required=True, help="the image to score, e.g. a generated PNG")
    score.add_argument("--json", action="store_true", help="print the result as one JSON object")
    score.add_argument("--backend", choices=("dlib", "insightface"), default="dlib")
    score.add_argument("--face-model-dir", metavar="DIR")
    score.set_defaults(handler=_cmd_score)

    tiny = commands.add_parser("make-tiny", help="write tiny random-weight test models (offline)")
    tiny.add_argument("dir", metavar="DIR")
    tiny.set_defaults(handler=_cmd_make_tiny)

    # Imported here: their modules load torch and the face models' code, which generate's --help does not need.
    from photomaker.evaluation.command import add_eval_arguments, run_eval_command
    from photomaker.train.cli_args import add_train_arguments, run_train_command
    from photomaker.train.data import add_prepare_data_arguments, run_prepare_data_command

    evaluate = commands.add_parser(
        "eval",
        help="generate for your identities and prompts, then score them as the paper does (Table 1)",
        description="Face Sim, Face Div, CLIP-T, CLIP-I, DINO (and FID) over IDS x PROMPTS, with sweeps; resumable. "
        "Several GPUs: accelerate launch -m photomaker eval ...",
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=run_eval_command)

    prepare = commands.add_parser(
        "prepare-data",
        help="turn folders of photos per person into a training DATA folder",
        description="Face detection, size and identity checks, crops, masks, captions; DATA/manifest.jsonl and "
        "DATA/report.jsonl (every dropped photo and why). Running it again resumes.",
    )
    add_prepare_data_arguments(prepare)
    prepare.set_defaults(handler=run_prepare_data_command)

    train = commands.add_parser(
        "train",
        help="train or fine-tune PhotoMaker on a DATA folder; exports OUT/photomaker.bin",
        description="Several GPUs or machines: accelerate launch -m photomaker train ...",
    )
    add_train_arguments(train)
    train.set_defaults(handler=run_train_command)
    return parser


def service_config(args: argparse.Namespace, device: str | None = None) -> ServiceConfig:
    """`ServiceConfig` from the model flags over the environment; `device` (a process's own) beats the env."""
    from photomaker.config import ServiceConfig

    settings = model_settings(args)
    settings["device"] = settings.get("device") or device
    return ServiceConfig.from_env(settings)


def generation_request(args: argparse.Namespace) -> GenerationRequest:
    """The request for the given flags; flags left out keep the request's defaults."""
    return request_from_flags(args)


def _quiet_libraries(verbose: bool) -> None:
    """Keep the libraries' own progress bars and advisory warnings off the terminal; ours say what happens.

    Set before diffusers / transformers are imported (they read the variables once); `--verbose` keeps them.
    """
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def wait_until_loaded(service: PhotoMakerService, progress: Callable[[int, int, str], None] | None = None) -> None:
    """Load the model; the pipeline's own progress bars are turned off (ours, or none, replaces them)."""
    from diffusers.utils import logging as diffusers_logging

    if not logger.isEnabledFor(logging.INFO):
        diffusers_logging.disable_progress_bar()
    service.wait_ready(progress=progress)
    if progress is not None:
        progress(100, 100, "Model loaded")
    service.pipeline.set_progress_bar_config(disable=True)


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


def _free_path(out_dir: Path, seed: int) -> Path:
    """`seed-<image seed>.png`, plus a counter when that name is taken: never overwrite an earlier result."""
    path = out_dir / f"seed-{seed}.png"
    counter = 1
    while path.exists():
        counter += 1
        path = out_dir / f"seed-{seed}-{counter}.png"
    return path


def _cmd_generate(args: argparse.Namespace) -> int:
    from photomaker.batch import make_output_dir
    from photomaker.metadata import save_png
    from photomaker.service import PhotoMakerService

    request = generation_request(args)
    service = PhotoMakerService(service_config(args))
    service.start_loading()
    # Check the request while the model loads, so a mistake is reported in a second, not after the load.
    plan = service.validate(request)
    out_dir = Path(args.out)
    make_output_dir(out_dir)
    with ProgressBar() as bar:
        wait_until_loaded(service, bar)
        result: GenerationResult = service.generate(plan, bar)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for generated in result.images:
        path = _free_path(out_dir, generated.seed)
        save_png(generated.image, path, generated.parameters)
        print(path)
    print(f"seed: {result.seed}")
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from photomaker import batch
    from photomaker.service import PhotoMakerService

    state = batch.process_state(cpu=args.device == "cpu")
    config = service_config(args, device=batch.process_device(state))
    if config.tiny_dir:
        from photomaker.testing import make_tiny

        with state.main_process_first():  # one writer; the other processes then find the models complete
            make_tiny(config.tiny_dir)

    def make_generate() -> batch.Generate:
        service = PhotoMakerService(config)
        wait_until_loaded(service)
        return service.generate

    report = batch.run_batch(args.jobs, args.out, state, make_generate)
    if state.is_main_process:
        print(batch.summary_line(report, Path(args.out) / batch.ERRORS_FILE), file=sys.stderr)
    return EXIT_JOBS_FAILED if report.failures else 0


def _cmd_score(args: argparse.Namespace) -> int:
    from photomaker.faces import score_images

    for photo in [*args.references, args.image]:
        if not Path(photo).is_file():
            raise InvalidRequestError(f"photo {photo!r} not found.")
    result = score_images(args.references, args.image, backend=args.backend, model_dir=args.face_model_dir)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(result["message"])
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from photomaker.testing import make_tiny

    for name, path in make_tiny(args.dir).items():
        print(f"{name}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the process exit status."""
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except PhotoMakerError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
