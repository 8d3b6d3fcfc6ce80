"""The ``train`` command's flags and body: ``python -m photomaker train`` (and ``-m photomaker.train``).

The model flags that mean what they mean for ``generate`` (--tiny, --base-model, --pm-version, --face-model-dir)
come from `photomaker.flags` and fall back to the same PHOTOMAKER_* variables; --device and --dtype stay
training's own, since accelerate places the processes and --dtype also turns on mixed precision.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..config import DEFAULT_BASE_MODEL, ENV_VARIABLES
from ..errors import InvalidRequestError, PhotoMakerError
from ..flags import add_model_flags, model_settings

SHARED_MODEL_SETTINGS = ("tiny_dir", "base_model", "pm_version", "face_model_dir")

__all__ = ["add_train_arguments", "config_from_args", "run_train_command"]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every training flag to ``parser`` (a subcommand parser or a standalone one)."""
    parser.add_argument("--data", required=True, metavar="DATA", help="folder written by prepare-data")
    parser.add_argument("--out", required=True, metavar="OUT", help="output folder (checkpoints, metrics, export)")
    model = parser.add_argument_group("model (as generate's; each defaults to its environment variable)")
    add_model_flags(model, SHARED_MODEL_SETTINGS)
    model.add_argument(
        "--device",
        choices=("cpu", "cuda", "mps", "xpu"),
        help="cpu forces the CPU; otherwise accelerate places each process on its accelerator "
        "(choose GPUs with CUDA_VISIBLE_DEVICES or accelerate launch --gpu_ids)",
    )
    model.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="weight dtype of the frozen parts; float16/bfloat16 also turn on mixed precision",
    )
    model.add_argument(
        "--init",
        default="none",
        metavar="CKPT|none",
        help="PhotoMaker checkpoint to fine-tune, or none for fresh ID heads and LoRA",
    )
    model.add_argument(
        "--vision-model",
        metavar="ID_OR_PATH",
        help="CLIP vision tower for --init none (default openai/clip-vit-large-patch14; random with --tiny)",
    )
    model.add_argument("--lora-rank", type=int, help="default 64, or the --init checkpoint's rank")
    model.add_argument("--train-vision-layers", type=int, default=2, metavar="N", help="last N vision layers train")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--learning-rate", type=float, default=1e-4, help="LoRA, projections, fuse module, resampler")
    opt.add_argument("--vision-learning-rate", type=float, default=1e-5, help="the trained vision layers")
    opt.add_argument("--weight-decay", type=float, default=1e-2)
    opt.add_argument("--lr-scheduler", default="constant_with_warmup", help="a diffusers.optimization schedule")
    opt.add_argument("--lr-warmup-steps", type=int, default=100)
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    opt.add_argument("--batch-size", type=int, default=1, help="per process")
    opt.add_argument("--gradient-accumulation-steps", type=int, default=1)
    opt.add_argument("--max-steps", type=int, default=1000, help="optimiser steps")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--gradient-checkpointing", action="store_true", help="UNet activation checkpointing")
    opt.add_argument("--caption-dropout", type=float, default=0.1, help="share of captions replaced by ''")
    opt.add_argument("--mask-loss-prob", type=float, default=0.5, help="share of samples with the loss in the mask")
    run = parser.add_argument_group("checkpoints, validation, logging")
    run.add_argument("--checkpoint-every", type=int, default=500, metavar="N")
    run.add_argument("--resume", metavar="latest|DIR", help="continue from OUT's newest checkpoint or a folder")
    run.add_argument("--validate-every", type=int, default=0, metavar="N", help="0: no validation")
    run.add_argument("--val-identities", default="", metavar="NAME[,NAME]", help="held-out identities")
    run.add_argument("--val-steps", type=int, default=30, help="sampling steps of validation images")
    run.add_argument("--val-size", type=int, help="validation image size; default: the identity's image size")
    run.add_argument(
        "--val-face-backend",
        choices=("dlib", "insightface", "none"),
        default="dlib",
        help="face model of the Face Sim / Face Div scores (evaluation's)",
    )
    run.add_argument(
        "--val-clip-model",
        metavar="ID_OR_DIR",
        help="adds CLIP-T and CLIP-I to the validation scores (e.g. openai/clip-vit-large-patch14); "
        "default: none, or tiny random CLIP with --tiny",
    )
    run.add_argument(
        "--val-dino-model",
        metavar="ID_OR_DIR",
        help="adds DINO to the validation scores (e.g. facebook/dino-vits16); default: none, or tiny "
        "random DINO with --tiny",
    )
    run.add_argument("--report-to", default="tensorboard", help="accelerate tracker: tensorboard, wandb, none")
    run.add_argument("--trigger-word", default="img")


def _model_values(args: argparse.Namespace) -> dict[str, Any]:
    """The shared model flags, each falling back to its PHOTOMAKER_* variable as generate's do; None if neither."""
    values = model_settings(args)
    for variable, (setting, parse) in ENV_VARIABLES.items():
        text = os.environ.get(variable)
        if setting in values and values[setting] is None and text:
            try:
                values[setting] = parse(text)
            except ValueError as exc:
                raise InvalidRequestError(f"{variable}={text!r} is not valid: {exc}.") from None
    return values


def config_from_args(args: argparse.Namespace):
    """A `TrainConfig` from parsed flags."""
    from .loop import TrainConfig
    from .model import DEFAULT_VISION_MODEL

    model = _model_values(args)
    tiny_dir = model["tiny_dir"]
    return TrainConfig(
        data_dir=Path(args.data),
        out_dir=Path(args.out),
        tiny_dir=tiny_dir,
        base_model=model["base_model"] or (None if tiny_dir else DEFAULT_BASE_MODEL),
        device=args.device,
        dtype=args.dtype,
        pm_version=model["pm_version"] or 1,
        init=args.init,
        vision_model=args.vision_model or (None if tiny_dir else DEFAULT_VISION_MODEL),
        lora_rank=args.lora_rank,
        train_vision_layers=args.train_vision_layers,
        learning_rate=args.learning_rate,
        vision_learning_rate=args.vision_learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
        max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        caption_dropout=args.caption_dropout,
        mask_loss_prob=args.mask_loss_prob,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        validate_every=args.validate_every,
        val_identities=tuple(name for name in args.val_identities.split(",") if name),
        val_steps=args.val_steps,
        val_size=args.val_size,
        val_face_backend=args.val_face_backend,
        val_clip_model=args.val_clip_model,
        val_dino_model=args.val_dino_model,
        face_model_dir=model["face_model_dir"],
        report_to=args.report_to,
        trigger_word=args.trigger_word,
    )


def run_train_command(args: argparse.Namespace) -> int:
    """Train; print the export path (main process). A `PhotoMakerError` propagates: the CLI prints it, exits 2."""
    from accelerate import PartialState

    from .loop import train

    target = train(config_from_args(args))
    if PartialState().is_main_process:
        print(target)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m photomaker.train`` / ``accelerate launch -m photomaker.train``: the same as ``photomaker train``."""
    parser = argparse.ArgumentParser(prog="python -m photomaker.train", description="Train PhotoMaker.")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return run_train_command(args)
    except PhotoMakerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
