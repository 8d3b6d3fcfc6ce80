"""``python -m photomaker eval``: its flags (`add_eval_arguments`) and its body (`run_eval_command`).

The model flags are generate's own (`photomaker.flags.add_model_flags`), so eval loads exactly what
``generate`` and ``batch`` load; the generation flags here default to the paper's Table 1 protocol (50 steps,
guidance 5, no style template, 4 reference photos, 4 images per prompt).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from photomaker.errors import InvalidRequestError
from photomaker.evaluation.inputs import PHOTO_SUFFIXES, check_identity_prompts, load_identities, load_prompts
from photomaker.evaluation.metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    Scorers,
    clip_image_embeddings,
    fid,
    summarise,
)
from photomaker.evaluation.report import (
    PLOT_FILE,
    compare,
    markdown_table,
    plot_tradeoff,
    read_summary,
    write_summary,
)
from photomaker.evaluation.runner import EvalPlan, rows_by_setting, run_evaluation
from photomaker.evaluation.settings import SWEEP_KEYS, Setting, build_settings
from photomaker.flags import add_model_flags
from photomaker.presets import DEFAULT_FAST_PRESET

if TYPE_CHECKING:
    from photomaker.service import ServiceConfig

logger = logging.getLogger(__name__)

PAPER_STEPS = 50
PAPER_GUIDANCE = 5.0
NO_STYLE = "(No style)"
# Generation flags -> GenerationRequest fields (None: the request's default)
_REQUEST_FLAGS = (
    "style",
    "num_steps",
    "style_strength",
    "guidance_scale",
    "fast",
    "negative_prompt",
    "width",
    "height",
    "aspect_ratio",
    "crop_faces",
    "best_of",
)
# ServiceConfig fields that change the images (where the model runs and what is cached do not)
_IMAGE_FIELDS = (
    "base_model",
    "adapter",
    "adapter_weight_name",
    "pm_version",
    "dtype",
    "variant",
    "tiny_dir",
    "face_backend",
    "fast_lora_dir",
    "trigger_word",
)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``eval``: inputs, protocol, generation, metrics, output, and the model flags of ``generate``."""
    from photomaker.cli import MODEL_GROUP

    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--ids",
        required=True,
        metavar="IDS",
        help="folder with one sub-folder of photos per person (optional class.txt: 'man', 'woman')",
    )
    inputs.add_argument(
        "--prompts",
        metavar="PROMPTS",
        help="text file, one prompt per line with '{class}' (or a class word) and the trigger "
        "'img'; default: the 40 shipped prompts",
    )
    inputs.add_argument("--out", required=True, metavar="OUT", help="folder for images, results and summary")

    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--images-per-prompt", type=int, default=4, metavar="N")
    protocol.add_argument(
        "--num-references",
        type=int,
        default=4,
        metavar="N",
        help="reference photos given to the generator (the first N by name); metrics compare "
        "with all of the identity's photos",
    )
    protocol.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="base of the seed schedule (each image's seed: this, identity, prompt, image index)",
    )
    protocol.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help=f"run each value on the same seeds; repeat for a grid. Keys: {', '.join(SWEEP_KEYS)}",
    )

    generation = parser.add_argument_group("generation (default: the paper's protocol)")
    generation.add_argument("--style", default=NO_STYLE, metavar="NAME", help=f"style template (default {NO_STYLE!r})")
    generation.add_argument("--steps", type=int, dest="num_steps", default=PAPER_STEPS, metavar="N")
    generation.add_argument("--style-strength", type=float, metavar="PCT", help="percent, 15-50 (default 20)")
    generation.add_argument("--guidance", type=float, dest="guidance_scale", default=PAPER_GUIDANCE, metavar="G")
    generation.add_argument(
        "--fast",
        nargs="?",
        const=DEFAULT_FAST_PRESET,
        metavar="PRESET",
        help=f"few-step mode (--fast alone: {DEFAULT_FAST_PRESET})",
    )
    generation.add_argument("--negative-prompt", metavar="TEXT")
    generation.add_argument("--aspect", dest="aspect_ratio", metavar="NAME")
    generation.add_argument("--width", type=int, metavar="PX")
    generation.add_argument("--height", type=int, metavar="PX")
    generation.add_argument(
        "--no-crop",
        action="store_false",
        dest="crop_faces",
        default=None,
        help="give the generator the photos as they are instead of cropped around the face",
    )
    generation.add_argument(
        "--best-of",
        type=int,
        metavar="N",
        help="make N candidates per image and keep the most alike (raises Face Sim by choice)",
    )

    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, metavar="ID_OR_DIR", help="for CLIP-T and CLIP-I")
    metrics.add_argument("--dino-model", default=DEFAULT_DINO_MODEL, metavar="ID_OR_DIR")
    metrics.add_argument(
        "--metric-face-backend",
        choices=("dlib", "insightface", "none"),
        default="dlib",
        help="face embeddings for Face Sim / Face Div (the same for every setting; default dlib)",
    )
    metrics.add_argument("--metric-device", metavar="DEVICE", help="device of the scoring models (default: best)")
    metrics.add_argument("--fid-real", metavar="DIR", help="folder of real photos: adds FID per setting")

    output = parser.add_argument_group("output")
    output.add_argument("--compare", metavar="OTHER/summary.json", help="print this run minus another run")
    output.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    add_model_flags(parser.add_argument_group(MODEL_GROUP))


def build_plan(args: argparse.Namespace, config: ServiceConfig) -> EvalPlan:
    """The run's plan from parsed `args`; `config` is the resolved model (flags over PHOTOMAKER_* variables), so
    that every image's fingerprint names the model that really made it."""
    if args.images_per_prompt < 1:
        raise InvalidRequestError(f"--images-per-prompt must be at least 1, got {args.images_per_prompt}.")
    if args.num_references < 1:
        raise InvalidRequestError(f"--num-references must be at least 1, got {args.num_references}.")
    identities = load_identities(args.ids)
    prompts = load_prompts(args.prompts, config.trigger_word)
    check_identity_prompts(identities, prompts, config.trigger_word)
    request = {name: getattr(args, name) for name in _REQUEST_FLAGS if getattr(args, name) is not None}
    model = {name: getattr(config, name) for name in _IMAGE_FIELDS}
    return EvalPlan(
        identities,
        prompts,
        build_settings(args.sweep),
        args.images_per_prompt,
        args.num_references,
        args.seed,
        request,
        model,
    )


def _real_photos(folder: str) -> list[Path]:
    """The photos under `folder` (searched recursively), by name."""
    root = Path(folder)
    if not root.is_dir():
        raise InvalidRequestError(f"--fid-real {folder!r} is not a folder of photos.")
    return [path for path in sorted(root.rglob("*")) if path.suffix.lower() in PHOTO_SUFFIXES]


def run_eval_command(args: argparse.Namespace) -> int:
    """Run the evaluation for parsed `args`; print the table (or JSON) on the main process; return 0."""
    from photomaker import batch
    from photomaker.cli import service_config, wait_until_loaded
    from photomaker.service import PhotoMakerService

    state = batch.process_state(cpu=args.device == "cpu")
    device = batch.process_device(state)
    base_config = service_config(args, device=device)
    plan = build_plan(args, base_config)
    other = read_summary(args.compare) if args.compare else None
    if base_config.tiny_dir:
        from photomaker.testing import make_tiny

        with state.main_process_first():  # one writer; the other processes then find the models complete
            make_tiny(base_config.tiny_dir)

    def make_generate(setting: Setting) -> batch.Generate:
        service = PhotoMakerService(dataclasses.replace(base_config, **setting.service))
        wait_until_loaded(service)
        return service.generate

    face_backend = None if args.metric_face_backend == "none" else args.metric_face_backend
    scorer_spec = {"clip": args.clip_model, "dino": args.dino_model, "face_backend": face_backend}
    scorers: list[Scorers] = []

    def load_scorers() -> Scorers:
        if not scorers:
            scorers.append(
                Scorers.load(
                    args.clip_model,
                    args.dino_model,
                    face_backend,
                    # --face-model-dir is the generator's backend's folder: another metric backend uses its default
                    args.face_model_dir if face_backend == base_config.resolved_face_backend else None,
                    args.metric_device or device,
                    base_config.trigger_word,
                )
            )
        return scorers[0]

    out = Path(args.out)
    rows, made = run_evaluation(plan, out, state, make_generate, load_scorers, scorer_spec)
    if not state.is_main_process:
        return 0
    summary = {setting: summarise(setting_rows) for setting, setting_rows in rows_by_setting(rows)}
    if args.fid_real:
        real = clip_image_embeddings(_real_photos(args.fid_real), load_scorers())
        for setting, setting_rows in rows_by_setting(rows):
            summary[setting]["fid"] = fid((out / row["path"] for row in setting_rows), real, load_scorers())
    write_summary(summary, out)
    plot_tradeoff(summary, out / PLOT_FILE)
    print(f"eval: {made} images made, {len(rows) - made} already there; results in {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(markdown_table(summary))
    if other is not None:
        print(f"\nthis run minus {args.compare}:", file=sys.stderr if args.json else sys.stdout)
        print(compare(summary, other), file=sys.stderr if args.json else sys.stdout)
    return 0
