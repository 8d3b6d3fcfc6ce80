"""Training step cost: a PhotoMaker training step against a plain SDXL LoRA training step, in one process.

    python -m bench.bench_train                                    # tiny models, 64 px (smoke test)
    python -m bench.bench_train --models real --size 512 --threads 2   # real SDXL sizes, random bf16 weights

Both steps use the same UNet with the same rank-64 LoRA on q/k/v/out of every attn1/attn2, gradient checkpointing,
batch 1, AdamW, the VAE encode and the text encoders (frozen, no grad) in the step. The PhotoMaker step adds what
PhotoMaker trains: the ID encoder over ``--num-photos`` ID images (last 2 vision layers, projections and fuse
module trainable) and the fused class-word embeddings. The plain step runs first, before the ID encoder is
built, so its peak RSS does not include the encoder. Reported: seconds per step (median of ``--repeats`` after
``--warmup``) and peak RSS during the steps (VmHWM, reset per phase), as PhotoMaker / plain ratios.
Real-size weights are built in memory (no ``make_real_size`` folder needed).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import common, sdxl
from bench.bench_memory import PeakMeter

LORA_RANK = 64


def _parts(kind: str, dtype: torch.dtype) -> dict[str, Any]:
    """Frozen SDXL parts with random weights (tiny or real sizes), plus tokenizers and a DDPM scheduler."""
    from diffusers import DDPMScheduler

    from photomaker.testing import clip_tokenizer, tiny_sdxl_components

    if kind == "tiny":
        parts = tiny_sdxl_components()
    else:
        te1, te2 = sdxl.build_text_encoders()
        parts = {
            "unet": sdxl.build_unet(),
            "vae": sdxl.build_vae(),
            "text_encoder": te1,
            "text_encoder_2": te2,
            "tokenizer": clip_tokenizer(),
            "tokenizer_2": clip_tokenizer(pad_token="!"),
        }
        for seed, name in enumerate(("unet", "vae", "text_encoder", "text_encoder_2")):
            parts[name] = _fill_position_ids(sdxl.materialize_random(parts[name], dtype, seed=seed))
    parts["scheduler"] = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        parts[name] = parts[name].to(dtype).requires_grad_(False)
    return parts


def _fill_position_ids(module: torch.nn.Module) -> torch.nn.Module:
    """``to_empty`` leaves non-persistent ``position_ids`` buffers uninitialised: give them 0..n-1 again."""
    for name, buffer in module.named_buffers():
        if name.endswith("position_ids"):
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return module


def _id_encoder(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    from photomaker.id_encoder import create_id_encoder
    from photomaker.testing import tiny_id_encoder_config

    if kind == "tiny":
        return create_id_encoder(tiny_id_encoder_config(), 1).to(dtype)
    return _fill_position_ids(sdxl.materialize_random(sdxl.build_id_encoder(1), dtype, seed=9))


def _step(
    parts: dict[str, Any],
    size: int,
    caption: str,
    seed: int,
    predict: Callable[[torch.Tensor, torch.Tensor, list, list, torch.Tensor, torch.Tensor], torch.Tensor],
    num_id_tokens: int,
    optimizer: torch.optim.Optimizer,
    dtype: torch.dtype,
) -> None:
    """One training step: VAE encode, text encode, noise, UNet (via ``predict``), loss, backward, AdamW."""
    from photomaker.train.loop import encode_caption
    from photomaker.train.loss import diffusion_loss

    generator = torch.Generator().manual_seed(seed)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        with torch.no_grad():
            pixels = torch.rand(1, 3, size, size, generator=generator).to(dtype) * 2 - 1
            latents = parts["vae"].encode(pixels).latent_dist.mean * parts["vae"].config.scaling_factor
            hidden, masks, pooled = encode_caption(
                caption,
                (parts["tokenizer"], parts["tokenizer_2"]),
                (parts["text_encoder"], parts["text_encoder_2"]),
                num_id_tokens=num_id_tokens,
                trigger_word="img",
                device=torch.device("cpu"),
            )
        noise = torch.randn(latents.shape, generator=generator).to(latents.dtype)
        timesteps = torch.tensor([500])
        noisy = parts["scheduler"].add_noise(latents, noise, timesteps)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=latents.dtype)
        prediction = predict(noisy, timesteps, hidden, masks, pooled[None], time_ids)
        loss = diffusion_loss(prediction, noise).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _measure(name: str, run: Callable[[int], None], meter: PeakMeter, warmup: int, repeats: int) -> list[float]:
    for index in range(warmup):
        run(index)
    times = []
    for index in range(repeats):
        started = time.perf_counter()
        run(warmup + index)
        times.append(time.perf_counter() - started)
        common.logger.info("%s step %d: %.2f s", name, index, times[-1])
    meter.end_phase(name)
    return times


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from photomaker.prompt import add_trigger_token
    from photomaker.train.model import (
        PhotoMakerTrainingModel,
        add_unet_lora,
        cast_frozen,
        freeze_for_training,
    )

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("float32" if args.models == "tiny" else "bfloat16")
    ]
    torch.set_grad_enabled(True)
    meter = PeakMeter("cpu")
    with common.quiet_libraries():
        parts = _parts(args.models, dtype)
    for tokenizer in (parts["tokenizer"], parts["tokenizer_2"]):
        add_trigger_token(tokenizer, "img")
    unet = parts["unet"]
    add_unet_lora(unet, LORA_RANK)
    unet.requires_grad_(False)
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    for parameter in lora:
        parameter.requires_grad_(True)
    cast_frozen([unet], dtype)
    unet.enable_gradient_checkpointing()
    unet.train()
    meter.end_phase("build plain")

    def plain_predict(noisy, timesteps, hidden, masks, pooled, time_ids):
        embeds = torch.cat(hidden, dim=-1)[None]
        return unet(
            noisy,
            timesteps,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample

    plain_optimizer = torch.optim.AdamW(lora, lr=1e-4)
    plain = _measure(
        "plain SDXL LoRA step",
        lambda seed: _step(parts, args.size, common.PLAIN_PROMPT, seed, plain_predict, 1, plain_optimizer, dtype),
        meter,
        args.warmup,
        args.repeats,
    )

    plain_optimizer.state.clear()  # its AdamW moments (2 x the LoRA in fp32) are not PhotoMaker's memory
    encoder = _id_encoder(args.models, dtype)
    model = PhotoMakerTrainingModel(unet, encoder)
    groups = freeze_for_training(unet, encoder, 2)
    cast_frozen([unet, encoder], dtype)
    model.train()
    id_pixels = torch.rand(args.num_photos, 3, encoder.config.image_size, encoder.config.image_size)
    meter.end_phase("build photomaker")

    def photomaker_predict(noisy, timesteps, hidden, masks, pooled, time_ids):
        prompts = [(hidden, masks, id_pixels.to(dtype), None)]
        return model(
            [
                {
                    "noisy_latents": noisy,
                    "timesteps": timesteps,
                    "prompts": prompts,
                    "pooled": pooled,
                    "time_ids": time_ids,
                }
            ]
        )[0]

    optimizer = torch.optim.AdamW([{"params": groups["main"], "lr": 1e-4}, {"params": groups["vision"], "lr": 1e-5}])
    photomaker = _measure(
        "PhotoMaker step",
        lambda seed: _step(
            parts, args.size, common.PROMPT, seed, photomaker_predict, args.num_photos, optimizer, dtype
        ),
        meter,
        args.warmup,
        args.repeats,
    )

    peaks = {name: record["rss_peak"] for name, record in meter.phases.items()}
    seconds = {"plain": common.median(plain), "photomaker": common.median(photomaker)}
    peak = {"plain": peaks["plain SDXL LoRA step"], "photomaker": peaks["PhotoMaker step"]}
    return {
        "seconds_per_step": seconds,
        "peak_rss": peak,
        "phases": meter.phases,
        "time_ratio": seconds["photomaker"] / seconds["plain"],
        "memory_ratio": peak["photomaker"] / peak["plain"],
        "trained_parameters": {
            "plain": sum(p.numel() for p in lora),
            "photomaker": sum(p.numel() for p in groups["main"] + groups["vision"]),
        },
        "dtype": str(dtype).replace("torch.", ""),
    }


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    lines = common.header(
        f"Training step, batch 1, {args.size} px, gradient checkpointing, LoRA rank {LORA_RANK}", result
    )
    rows = [
        [
            name,
            f"{result['seconds_per_step'][key]:.2f} s",
            f"{result['peak_rss'][key] / 1e6:,.0f} MB",
            f"{result['trained_parameters'][key]:,}",
        ]
        for name, key in (("plain SDXL LoRA", "plain"), (f"PhotoMaker ({args.num_photos} ID images)", "photomaker"))
    ]
    rows.append(["ratio PhotoMaker / plain", f"{result['time_ratio']:.2f}x", f"{result['memory_ratio']:.2f}x", ""])
    lines.append(common.table(["step", "time", "peak RSS", "trained parameters"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: tiny fp32, real bf16")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: tiny 64, real 512)")
    parser.add_argument("--num-photos", type=int, default=2, help="ID images per sample (the paper draws 1-4)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.models == "tiny" else 512)
    common.setup_logging(args.verbose, args.threads)
    result = common.new_result(args)  # the machine's state (load average) before the run, not after it
    result.update(run_benchmark(args))
    return common.finish(args, result, report)


if __name__ == "__main__":
    main()
