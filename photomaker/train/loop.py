"""The training loop on accelerate: setup, steps, metrics, checkpoints, resume, validation and the final export.

Sample ``j`` of process ``r`` at micro-step ``m`` of optimiser step ``s`` is global sample
``((s * accumulation + m) * num_processes + r) * batch_size + j``, and everything random about it derives
from that index (see dataset.py), so the trained weights do not depend on how the global batch is split
across processes. The learning-rate scheduler is stepped once per optimiser step on every process (not
through ``accelerator.prepare``, which would step it once per process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingConfigError
from ..prompt import (
    DEFAULT_TRIGGER_WORD,
    add_trigger_token,
    expand_class_tokens,
    pad_or_truncate,
)
from .dataset import IdentityDataset, TrainingSample, check_sample_probabilities, read_manifest
from .loss import check_prediction_type, diffusion_loss, diffusion_target, latent_mask
from .model import (
    DEFAULT_LORA_RANK,
    BaseComponents,
    PhotoMakerTrainingModel,
    add_unet_lora,
    build_id_encoder_for_training,
    cast_frozen,
    export_checkpoint,
    freeze_for_training,
    load_base_components,
    load_legacy_lora,
    lora_rank_of,
)

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "Trainer", "encode_caption", "train"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MIXED_PRECISION = {"float32": "no", "float16": "fp16", "bfloat16": "bf16"}
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "training_state.json"


@dataclass
class TrainConfig:
    """Every training option; the CLI flags map one to one (see `add_train_arguments`)."""

    data_dir: Path
    out_dir: Path
    base_model: str | None = None
    tiny_dir: str | None = None
    device: str | None = None
    dtype: str = "float32"
    pm_version: int = 1
    init: str = "none"
    vision_model: str | None = None
    lora_rank: int | None = None
    train_vision_layers: int = 2
    learning_rate: float = 1e-4
    vision_learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 100
    max_grad_norm: float = 1.0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    seed: int = 0
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.1
    mask_loss_prob: float = 0.5
    checkpoint_every: int = 500
    resume: str | None = None
    validate_every: int = 0
    val_identities: Sequence[str] = field(default_factory=tuple)
    val_steps: int = 30
    val_size: int | None = None
    val_face_backend: str = "dlib"
    val_clip_model: str | None = None
    val_dino_model: str | None = None
    face_model_dir: str | None = None
    report_to: str = "tensorboard"
    trigger_word: str = DEFAULT_TRIGGER_WORD

    def check(self) -> None:
        """Raise `TrainingConfigError` for values that cannot work, before any model loads."""
        positive = {
            "--max-steps": self.max_steps,
            "--batch-size": self.batch_size,
            "--gradient-accumulation-steps": self.gradient_accumulation_steps,
            "--checkpoint-every": self.checkpoint_every,
        }
        for flag, value in positive.items():
            if value < 1:
                raise TrainingConfigError(f"{flag} must be at least 1; got {value}.")
        for flag, value in {
            "--validate-every": self.validate_every,
            "--lr-warmup-steps": self.lr_warmup_steps,
            "--val-steps": self.val_steps,
        }.items():
            if value < 0:
                raise TrainingConfigError(f"{flag} must be 0 or more; got {value}.")
        check_sample_probabilities(self.caption_dropout, self.mask_loss_prob)
        if self.dtype not in _DTYPES:
            raise TrainingConfigError(f"--dtype must be one of {sorted(_DTYPES)}; got {self.dtype!r}.")
        if self.pm_version not in (1, 2):
            raise TrainingConfigError(f"--pm-version must be 1 or 2; got {self.pm_version}.")
        if self.tiny_dir is None and self.base_model is None:
            raise TrainingConfigError("Pass --base-model (an SDXL Hub id, folder or file), or --tiny DIR for tests.")
        if self.validate_every and not self.val_identities:
            raise TrainingConfigError(
                "--validate-every needs held-out identities: pass --val-identities NAME[,NAME...] (identity "
                "names from the manifest), or --validate-every 0."
            )


@torch.no_grad()
def encode_caption(
    caption: str,
    tokenizers: Sequence[Any],
    text_encoders: Sequence[torch.nn.Module],
    *,
    num_id_tokens: int,
    trigger_word: str,
    device: torch.device,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]:
    """Per text encoder: hidden states [77, d] (penultimate layer) and class-copy mask; and the pooled embedding.

    A caption with the trigger gets PhotoMaker's surgery (trigger removed, class token repeated
    ``num_id_tokens`` times); a dropped (empty) caption is encoded as is and its masks are None.
    """
    hidden, masks, pooled = [], [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(caption, add_special_tokens=True, truncation=False, verbose=False).input_ids
        trigger_id = tokenizer.convert_tokens_to_ids(trigger_word)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if trigger_id in ids:
            expanded = expand_class_tokens(
                ids,
                trigger_id=trigger_id,
                num_id_tokens=num_id_tokens,
                eos_id=tokenizer.eos_token_id,
                pad_id=pad_id,
                max_length=tokenizer.model_max_length,
                trigger_word=trigger_word,
                prompt=caption,
            )
            ids, mask = expanded.input_ids, torch.tensor(expanded.class_tokens_mask, device=device)
        else:
            ids, _ = pad_or_truncate(
                ids, eos_id=tokenizer.eos_token_id, pad_id=pad_id, max_length=tokenizer.model_max_length
            )
            mask = None
        output = text_encoder(torch.tensor([ids], device=device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2][0])
        masks.append(mask)
        pooled = output[0][0]  # text_encoder_2's projected pooled output: SDXL's pooled text embedding
    return hidden, masks, pooled


class Trainer:
    """The prepared objects of one run (accelerator, models, optimiser, data); `train` drives it step by step."""

    def __init__(self, config: TrainConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import (
            DistributedDataParallelKwargs,
            is_tensorboard_available,
            set_seed,
        )
        from diffusers.optimization import get_scheduler
        from transformers import CLIPImageProcessor

        config.check()
        self.config = config
        self.records = read_manifest(config.data_dir, config.trigger_word)  # bad data fails before models load
        unknown = sorted(set(config.val_identities) - {record.identity for record in self.records})
        if unknown:
            raise TrainingConfigError(f"--val-identities names identities that are not in the manifest: {unknown}.")
        self.out_dir = Path(config.out_dir)
        log_with = None if config.report_to == "none" else config.report_to
        if log_with == "tensorboard" and not is_tensorboard_available():
            logger.warning("TensorBoard is not installed (pip install tensorboard): logging to metrics.jsonl only")
            log_with = None
        self.accelerator = Accelerator(
            mixed_precision=_MIXED_PRECISION[config.dtype],
            log_with=log_with,
            project_dir=str(self.out_dir),
            cpu=config.device == "cpu",
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            # A dropped caption leaves the ID encoder out of that sample's graph.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        set_seed(config.seed)  # the same on every process: identical fresh LoRA and heads
        self.weight_dtype = _DTYPES[config.dtype]
        device = self.accelerator.device

        base_model, random_vision_config = config.base_model, None
        if config.tiny_dir is not None:
            from ..testing import make_tiny, tiny_id_encoder_config

            with self.accelerator.main_process_first():
                base_model = base_model or str(make_tiny(config.tiny_dir)["base"])
            random_vision_config = tiny_id_encoder_config().vision_config()
        self.base: BaseComponents = load_base_components(base_model, self.weight_dtype)
        check_prediction_type(self.base.scheduler)  # now, not after the other models load and the first step
        text_widths = (self.base.text_encoder.config.hidden_size, self.base.text_encoder_2.config.hidden_size)
        id_encoder, init_lora = build_id_encoder_for_training(
            config.init, config.pm_version, text_widths, config.vision_model, random_vision_config
        )
        rank = config.lora_rank or (lora_rank_of(init_lora) if init_lora else DEFAULT_LORA_RANK)
        unet = self.base.unet
        add_unet_lora(unet, rank)
        if init_lora is not None:
            load_legacy_lora(unet, init_lora)
        groups = freeze_for_training(unet, id_encoder, config.train_vision_layers)
        cast_frozen([unet, id_encoder], self.weight_dtype)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        vae_dtype = torch.float32 if self.weight_dtype == torch.float16 else self.weight_dtype  # fp16 VAE overflows
        for module, dtype in (
            (self.base.vae, vae_dtype),
            (self.base.text_encoder, self.weight_dtype),
            (self.base.text_encoder_2, self.weight_dtype),
        ):
            module.requires_grad_(False).to(device, dtype).eval()
        for tokenizer in (self.base.tokenizer, self.base.tokenizer_2):
            add_trigger_token(tokenizer, config.trigger_word)

        model = PhotoMakerTrainingModel(unet, id_encoder).to(device).train()
        param_groups = [{"params": groups["main"], "lr": config.learning_rate}]
        if groups["vision"]:
            param_groups.append({"params": groups["vision"], "lr": config.vision_learning_rate})
        optimizer = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.max_steps
        )
        if self.accelerator.deepspeed_plugin is not None:
            # No DataLoader goes through prepare (samples are drawn by index), so DeepSpeed cannot infer its
            # micro-batch size from one: without this, prepare raises under the ZeRO-2 example config.
            self.accelerator.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.accelerator.register_for_checkpointing(self.lr_scheduler)
        self.trained_parameters = groups["main"] + groups["vision"]
        self.trained_names = trained_names = {name for name, p in model.named_parameters() if p.requires_grad}

        def keep_trained_only(models: list, weights: list[dict], output_dir: str) -> None:
            """Checkpoints hold the trained tensors only (MBs, not the 5 GB frozen UNet): resume rebuilds the rest."""
            for index, state in enumerate(weights):
                weights[index] = {k: v for k, v in state.items() if k.removeprefix("module.") in trained_names}

        self.accelerator.register_save_state_pre_hook(keep_trained_only)

        image_size = id_encoder.config.image_size
        self.image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        self.dataset = IdentityDataset(
            self.records,
            image_processor=self.image_processor,
            seed=config.seed,
            num_train_timesteps=self.base.scheduler.config.num_train_timesteps,
            caption_dropout=config.caption_dropout,
            mask_loss_prob=config.mask_loss_prob,
            need_face_embeddings=config.pm_version == 2,
            held_out=tuple(config.val_identities),
        )
        self.tokens_per_image = id_encoder.tokens_per_image

    # ---------------------------------------------------------------- one step

    def _sample_indices(self, step: int, micro: int) -> list[int]:
        config, state = self.config, self.accelerator.state
        first = (
            (step * config.gradient_accumulation_steps + micro) * state.num_processes + state.process_index
        ) * config.batch_size
        return list(range(first, first + config.batch_size))

    @torch.no_grad()
    def _latents_and_noise(self, sample: TrainingSample) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE latent (sampled) and diffusion noise, both from the sample's own generator (device-independent)."""
        device, vae = self.accelerator.device, self.base.vae
        generator = torch.Generator().manual_seed(sample.noise_seed)
        pixels = sample.pixel_values[None].to(device, vae.dtype)
        distribution = vae.encode(pixels).latent_dist
        eps = torch.randn(distribution.mean.shape, generator=generator).to(device, distribution.mean.dtype)
        latents = (distribution.mean + distribution.std * eps) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        return latents.float(), noise

    def _micro_batch_loss(self, samples: list[TrainingSample]) -> torch.Tensor:
        """Mean per-sample loss of this process's samples; images of one size share a UNet call."""
        device, scheduler = self.accelerator.device, self.base.scheduler
        by_size: dict[tuple[int, int], list[int]] = {}
        for position, sample in enumerate(samples):
            by_size.setdefault(tuple(sample.pixel_values.shape[1:]), []).append(position)
        groups, targets, masks = [], [], []
        for (height, width), positions in by_size.items():
            latents, noise, prompts, pooled = [], [], [], []
            for position in positions:
                sample = samples[position]
                latent, eps = self._latents_and_noise(sample)
                latents.append(latent)
                noise.append(eps)
                hidden, caption_masks, pooled_embed = encode_caption(
                    sample.caption,
                    (self.base.tokenizer, self.base.tokenizer_2),
                    (self.base.text_encoder, self.base.text_encoder_2),
                    num_id_tokens=sample.id_pixel_values.shape[0] * self.tokens_per_image,
                    trigger_word=self.config.trigger_word,
                    device=device,
                )
                face = sample.face_embeds.to(device) if sample.face_embeds is not None else None
                prompts.append((hidden, caption_masks, sample.id_pixel_values.to(device), face))
                pooled.append(pooled_embed)
            latents, noise = torch.cat(latents), torch.cat(noise)
            timesteps = torch.tensor([samples[p].timestep for p in positions], device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(positions), device=device)
            groups.append(
                {
                    "noisy_latents": noisy,
                    "timesteps": timesteps,
                    "prompts": prompts,
                    "pooled": torch.stack(pooled),
                    "time_ids": time_ids,
                }
            )
            targets.append(diffusion_target(scheduler, latents, noise, timesteps))
            masks.append(
                [
                    latent_mask(samples[p].mask[None].to(device), latents.shape[-2:])
                    if samples[p].use_mask_loss
                    else None
                    for p in positions
                ]
            )
        predictions = self.model(groups)
        losses = [
            diffusion_loss(prediction[i : i + 1], target[i : i + 1], mask)
            for prediction, target, group_masks in zip(predictions, targets, masks, strict=True)
            for i, mask in enumerate(group_masks)
        ]
        return torch.cat(losses).mean()

    @torch.no_grad()
    def evaluate(self, indices: Sequence[int]) -> float:
        """Mean loss of the given global samples with the current weights (no update): a fixed yardstick."""
        self.model.eval()
        with self.accelerator.autocast():
            loss = self._micro_batch_loss([self.dataset.sample(index) for index in indices])
        self.model.train()
        return float(loss)

    def train_step(self, step: int) -> float:
        """One optimiser step (all micro-batches); returns the loss averaged over processes.

        ``accelerator.accumulate`` marks only the last micro-batch as a synchronisation point: DDP then
        all-reduces once, and DeepSpeed (whose engine steps inside ``backward`` whenever gradients sync) steps
        once per optimiser step instead of once per micro-batch. ``backward`` scales the loss by 1/accumulation.
        """
        accumulation = self.config.gradient_accumulation_steps
        total = torch.zeros((), device=self.accelerator.device)
        for micro in range(accumulation):
            samples = [self.dataset.sample(index) for index in self._sample_indices(step, micro)]
            with self.accelerator.accumulate(self.model):
                with self.accelerator.autocast():
                    loss = self._micro_batch_loss(samples)
                self.accelerator.backward(loss)
            total += loss.detach() / accumulation
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.trained_parameters, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(self.accelerator.reduce(total, reduction="mean"))


class _MetricsLog:
    """OUT/metrics.jsonl, written by the main process only; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resumed_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resumed_step is not None and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resumed_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        elif enabled and resumed_step is None:
            path.unlink(missing_ok=True)

    def write(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")


def _checkpoint_to_resume(out_dir: Path, resume: str) -> Path:
    """``latest`` -> the newest OUT/checkpoints/step-N; otherwise the given folder."""
    if resume != "latest":
        path = Path(resume)
    else:
        found = sorted((out_dir / CHECKPOINT_DIR).glob("step-*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
        if not found:
            raise TrainingConfigError(
                f"--resume latest: no checkpoint in {out_dir / CHECKPOINT_DIR}; train "
                "without --resume first, or pass a checkpoint folder."
            )
        path = found[-1]
    if not (path / STATE_FILE).is_file():
        raise TrainingConfigError(f"--resume {resume}: {path} is not a training checkpoint (no {STATE_FILE}).")
    return path


def _check_same_trained_tensors(checkpoint: Path, trained_names: set[str]) -> None:
    """Refuse a checkpoint written with other trained tensors (other --pm-version, --train-vision-layers...).

    The non-strict load would otherwise leave a missing tensor at its fresh value and write a surplus one into a
    frozen weight, silently. DeepSpeed checkpoints have another layout, which accelerate checks itself.
    """
    from safetensors import safe_open

    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        return
    with safe_open(weights, "pt") as saved:
        saved_names = {name.removeprefix("module.") for name in saved.keys()}
    missing, surplus = sorted(trained_names - saved_names), sorted(saved_names - trained_names)
    differences = [
        f"{len(names)} {what}, e.g. {names[0]}"
        for names, what in ((missing, "trained here are not in it"), (surplus, "in it are frozen here"))
        if names
    ]
    if differences:
        raise TrainingConfigError(
            f"--resume {checkpoint}: that run trained other tensors ({'; '.join(differences)}). Resume with "
            "the options of that run (see train_config.json in its OUT folder)."
        )


def _check_fresh_start(out_dir: Path, resume: str | None) -> None:
    """A fresh run into an OUT that holds an earlier run's checkpoints would mix the two (a later
    `--resume latest` takes the newest, whichever run wrote it): refuse before any model loads."""
    earlier = sorted((out_dir / CHECKPOINT_DIR).glob("step-*")) if not resume else []
    if earlier:
        raise TrainingConfigError(
            f"{out_dir} already holds checkpoints of an earlier run ({earlier[-1].name}): continue it with "
            "--resume latest, or train into a new --out folder (or delete its checkpoints folder first)."
        )


def train(config: TrainConfig) -> Path:
    """Train PhotoMaker as configured; returns OUT/photomaker.bin (official layout)."""
    from tqdm.auto import tqdm

    from .validation import load_validation_scorers, run_validation

    _check_fresh_start(Path(config.out_dir), config.resume)
    trainer = Trainer(config)
    accelerator = trainer.accelerator
    out_dir = trainer.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    step = 0
    if config.resume:
        checkpoint = _checkpoint_to_resume(out_dir, config.resume)
        _check_same_trained_tensors(checkpoint, trainer.trained_names)
        # Our checkpoints hold the trained tensors only, hence a non-strict load; DeepSpeed saves its whole module
        # and its load_checkpoint has no `strict` argument.
        accelerator.load_state(str(checkpoint), **({} if accelerator.deepspeed_plugin else {"strict": False}))
        step = json.loads((checkpoint / STATE_FILE).read_text())["step"]
        logger.info("Resumed from %s at step %d", checkpoint, step)
    if accelerator.is_main_process:
        (out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))
    metrics = _MetricsLog(out_dir / "metrics.jsonl", accelerator.is_main_process, step if config.resume else None)
    tracker_config = {k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers("photomaker-train", config=tracker_config)

    scorers = None  # evaluation's scoring models, loaded at the first validation (main process only)
    progress = tqdm(
        total=config.max_steps, initial=step, desc="train", unit="step", disable=not accelerator.is_local_main_process
    )
    while step < config.max_steps:
        loss = trainer.train_step(step)
        step += 1
        lrs = trainer.lr_scheduler.get_last_lr()
        entry = {"step": step, "loss": loss, "lr": lrs[0]}
        if len(lrs) > 1:
            entry["lr_vision"] = lrs[1]
        metrics.write(entry)
        accelerator.log({"train/loss": loss, "train/lr": lrs[0]}, step=step)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}")
        progress.update(1)
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            _save_state(accelerator, out_dir, step)
        if config.validate_every and (step % config.validate_every == 0 or step == config.max_steps):
            if accelerator.is_main_process:
                scorers = scorers or load_validation_scorers(config, accelerator.device)
                result = run_validation(trainer, step, scorers)
                metrics.write({"step": step, "kind": "validation", **result})
            accelerator.wait_for_everyone()
    progress.close()

    target = out_dir / "photomaker.bin"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export_checkpoint(accelerator.unwrap_model(trainer.model), target)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return target


def _save_state(accelerator: Any, out_dir: Path, step: int) -> None:
    """accelerate's full state (model, optimiser, scheduler, RNG) plus the step, in OUT/checkpoints/step-N."""
    folder = out_dir / CHECKPOINT_DIR / f"step-{step:06d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
