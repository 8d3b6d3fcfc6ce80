"""Low-VRAM mode: the most weights (and activations) on the accelerator at any stage with model CPU offload.

    python -m bench.bench_lowvram                                    # computed from the real SDXL sizes
    python -m bench.bench_lowvram --verify-dir /tmp/pm-real          # + hook check on the real-size pipeline
    python -m bench.bench_lowvram --verify-tiny                      # + hook check on the tiny pipeline

Part 1, computed (no weights needed): every component is built on the ``meta`` device from the real SDXL configs
(bench.sdxl) and the official-size ID encoder; its bytes in fp16 give the weights resident at each stage of
`enable_model_cpu_offload` (one component at a time). Activations are measured by running the UNet (1024 x 1024,
batch 2 for classifier-free guidance) and the VAE decoder on ``meta`` tensors under a dispatch mode that tracks the
bytes of live tensors; attention is counted as a fused kernel (flash / memory-efficient SDPA keeps no L x L matrix,
as on a GPU with PyTorch >= 2). Not counted: the CUDA context (outside PyTorch's allocator), library workspaces and
allocator fragmentation; the margin to the target is shown.

Part 2, verified (CPU is enough): `enable_model_cpu_offload(device="cpu")` on a real pipeline, one generation under
`bench.lowvram.OffloadTracer`: each component (ID encoder included) has an offload hook, which components are
resident at every moment, and whether any module ran while its component was offloaded.
"""

from __future__ import annotations

import argparse
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bench import common, lowvram, sdxl

TARGET_BYTES = 8 * 1024**3  # 8 GB, read as GiB (the stricter reading would be 8e9; both are shown)
GB = 1e9


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the mode that are still referenced; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [bytes, python references]

    def _release(self, key: int) -> None:
        record = self._storages.get(key)
        if record is None:
            return
        record[1] -= 1
        if record[1] == 0:
            self.live -= record[0]
            del self._storages[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key in self._storages:
                    self._storages[key][1] += 1
                else:
                    self._storages[key] = [storage.nbytes(), 1]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._release, key)
        return out


class FusedAttention(TorchFunctionMode):
    """`F.scaled_dot_product_attention` as a fused kernel: only its output is allocated."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.scaled_dot_product_attention:
            query, _, value = args[:3]
            return query.new_empty((*query.shape[:-1], value.shape[-1]))
        return func(*args, **(kwargs or {}))


def activation_peak(run: Any) -> int:
    with torch.no_grad(), FusedAttention(), LiveTensorBytes() as meter:
        run()
    return meter.peak


def unet_activations(size: int, batch: int, dtype: torch.dtype) -> int:
    unet = sdxl.build_unet().to(dtype)
    latent = size // 8
    meta = {"device": "meta", "dtype": dtype}
    sample = torch.empty(batch, 4, latent, latent, **meta)
    hidden = torch.empty(batch, 77, sdxl.SDXL_UNET_CONFIG["cross_attention_dim"], **meta)
    cond = {"text_embeds": torch.empty(batch, 1280, **meta), "time_ids": torch.empty(batch, 6, **meta)}
    timestep = torch.tensor(999.0, device="meta")
    return activation_peak(
        lambda: unet(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=cond, return_dict=False)
    )


def vae_activations(size: int, dtype: torch.dtype, tiling: bool, tile_px: int | None = None) -> int:
    vae = sdxl.build_vae().to(dtype)
    if tiling:
        vae.enable_tiling()
        vae.enable_slicing()
        if tile_px is not None:
            vae.tile_sample_min_size = tile_px
            vae.tile_latent_min_size = tile_px // 8
    latent = torch.empty(1, 4, size // 8, size // 8, device="meta", dtype=dtype)
    return activation_peak(lambda: vae.decode(latent, return_dict=False))


def computed(args: argparse.Namespace) -> dict[str, Any]:
    dtype = torch.float16
    modules = sdxl.meta_components()
    sizes = lowvram.component_sizes(modules, dtype)
    residency = lowvram.offload_residency(sizes)
    unet_act = unet_activations(args.size, 2, dtype)
    vae = {
        "fp32 (force_upcast), no tiling": vae_activations(args.size, torch.float32, False),
        "fp32 (force_upcast), tiling+slicing, default tile": vae_activations(args.size, torch.float32, True),
        "fp32 (force_upcast), tiling+slicing, 512 px tile": vae_activations(args.size, torch.float32, True, 512),
        "fp16 VAE (fp16-fix), no tiling": vae_activations(args.size, dtype, False),
        "fp16 VAE (fp16-fix), tiling+slicing, 512 px tile": vae_activations(args.size, dtype, True, 512),
    }
    vae_fp32_weights = lowvram.component_sizes({"vae": modules["vae"]}, torch.float32)["vae"]
    stages = {
        "id_encoder": sizes["id_encoder"],
        "text_encoder": sizes["text_encoder"],
        "text_encoder_2": sizes["text_encoder_2"],
        "unet + activations": sizes["unet"] + unet_act,
        "vae (fp32 upcast) + activations, no tiling": vae_fp32_weights + vae["fp32 (force_upcast), no tiling"],
        "vae (fp32 upcast) + activations, 512 px tiles": vae_fp32_weights
        + vae["fp32 (force_upcast), tiling+slicing, 512 px tile"],
    }
    peak_stage = max(stages, key=stages.get)
    return {
        "dtype": "float16",
        "size": args.size,
        "component_bytes": sizes,
        "component_parameters": {name: sdxl.count_parameters(m) for name, m in modules.items()},
        "largest_resident_weights": {"component": residency.peak_stage, "bytes": residency.peak_bytes},
        "all_weights_bytes": residency.all_resident_bytes,
        "unet_activation_bytes": unet_act,
        "vae_activation_bytes": vae,
        "stage_bytes": stages,
        "peak_stage": peak_stage,
        "peak_bytes": stages[peak_stage],
        "no_offload_bytes": residency.all_resident_bytes + unet_act,
        "target_bytes": TARGET_BYTES,
        "target_met": stages[peak_stage] <= 8e9,
    }


def verify(models: common.Models, size: int, steps: int) -> dict[str, Any]:
    """One generation with model offload on the CPU, traced through the offload hooks."""
    with common.quiet_libraries():
        pipe = common.load_photomaker(models)
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    sizes = lowvram.component_sizes(pipe, torch.float16)
    tracer = lowvram.OffloadTracer(pipe)
    with tracer.tracing() as trace:
        pipe(
            common.PROMPT,
            negative_prompt=common.NEGATIVE_PROMPT,
            input_id_images=common.photos(2, seed=3),
            num_inference_steps=steps,
            height=size,
            width=size,
            guidance_scale=5.0,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pil",
        )
    peak_set, peak_bytes = trace.peak(sizes)
    return {
        "hooked": trace.hooked,
        "onloaded_in_order": trace.onloaded,
        "events": [(e.kind, e.component, list(e.resident)) for e in trace.events],
        "ran_while_offloaded": trace.ran_offloaded,
        "max_resident_set": list(trace.max_resident),
        "peak_resident_set": list(peak_set),
        "peak_resident_bytes_fp16": peak_bytes,
        "largest_component_bytes_fp16": max(sizes.values()),
        "unet_alone": trace.alone("unet"),
        "vae_alone": trace.alone("vae"),
        "id_encoder_ran_on_device": "id_encoder" in trace.onloaded
        and not any(name.startswith("id_encoder.") for name in trace.ran_offloaded),
        # Text encoders 1 and 2 share the device while prompts are encoded one after the other (diffusers'
        # chain), and text encoder 2 + the ID encoder during the fuse; what matters is that the big parts are
        # alone and that nothing runs off the device.
        "ok": all(trace.hooked.values()) and not trace.ran_offloaded and trace.alone("unet") and trace.alone("vae"),
    }


def gb(value: float) -> str:
    return f"{value / GB:.2f} GB"


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    c = result["computed"]
    lines = [
        *common.header(f"Low-VRAM: model CPU offload at {c['size']}x{c['size']}, fp16", result),
        common.table(
            ["component", "parameters", "fp16 bytes"],
            [[name, f"{c['component_parameters'][name]:,}", gb(value)] for name, value in c["component_bytes"].items()],
        ),
        "",
        common.table(
            ["stage (one component resident)", "weights + activations"],
            [[name, gb(value)] for name, value in c["stage_bytes"].items()],
        ),
        "",
        common.table(
            ["figure", "value"],
            [
                [
                    "largest resident weights (offload)",
                    (f"{c['largest_resident_weights']['component']}: {gb(c['largest_resident_weights']['bytes'])}"),
                ],
                ["UNet activations, batch 2 (CFG), fused attention", gb(c["unet_activation_bytes"])],
                *[[f"VAE decode activations, {k}", gb(v)] for k, v in c["vae_activation_bytes"].items()],
                ["peak stage with offload", f"{c['peak_stage']}: {gb(c['peak_bytes'])}"],
                ["without offload (all weights + UNet activations)", gb(c["no_offload_bytes"])],
                ["target", "<= 8 GB (8.00e9 bytes; 8 GiB = 8.59e9)"],
                [
                    "verdict",
                    ("met" if c["target_met"] else "missed") + f", margin {gb(8e9 - c['peak_bytes'])} "
                    "for the CUDA context, workspaces and fragmentation",
                ],
            ],
        ),
    ]
    for key, label in (("verify_real", "real-size"), ("verify_tiny", "tiny")):
        if key not in result:
            continue
        v = result[key]
        lines += [
            "",
            f"Offload hooks on the {label} pipeline (CPU, one generation): " + ("OK" if v["ok"] else "PROBLEM"),
            "",
            common.table(
                ["check", "result"],
                [
                    [
                        "offload hook on every component",
                        ", ".join(f"{k} {'yes' if h else 'NO'}" for k, h in v["hooked"].items()),
                    ],
                    ["brought to the device, in order", " -> ".join(v["onloaded_in_order"])],
                    ["modules that ran while offloaded", ", ".join(v["ran_while_offloaded"]) or "none"],
                    [
                        "largest resident set (bytes, fp16)",
                        (f"{' + '.join(v['peak_resident_set'])}: {gb(v['peak_resident_bytes_fp16'])}"),
                    ],
                    ["UNet resident alone / VAE resident alone", f"{v['unet_alone']} / {v['vae_alone']}"],
                    ["ID encoder ran on the device", str(v["id_encoder_ran_on_device"])],
                ],
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image size for the activation estimate")
    parser.add_argument("--verify-dir", help="real-size models folder: trace the offload hooks on that pipeline")
    parser.add_argument("--verify-tiny", action="store_true", help="trace the offload hooks on the tiny pipeline")
    parser.add_argument("--verify-size", type=int, default=256, help="image size of the traced generation")
    parser.add_argument("--verify-steps", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose)
    result = common.new_result(args)
    with common.quiet_libraries():
        result["computed"] = computed(args)
    if args.verify_tiny:
        result["verify_tiny"] = verify(common.prepare_models("tiny"), 64, args.verify_steps)
    if args.verify_dir:
        result["verify_real"] = verify(
            common.prepare_models("real", args.verify_dir), args.verify_size, args.verify_steps
        )
    return common.finish(args, result, report)


if __name__ == "__main__":
    main()
