"""Reading PhotoMaker checkpoints safely and turning them into a loaded ID encoder and a verified UNet LoRA.

Accepted sources: an in-memory dict (nested like the official files, or flat with ``id_encoder.`` /
``lora_weights.`` prefixes), a ``.bin``/``.pt`` torch pickle (loaded with ``weights_only=True``, so code
in a malicious pickle never runs), a ``.safetensors`` file, a local folder plus ``weight_name``, or a Hub
repo id plus ``weight_name``. Every failure is a ``CheckpointError`` that names what is wrong and how to fix it.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .id_encoder import (
    PERCEIVER_PREFIX,
    PhotoMakerIDEncoder,
    PhotoMakerIDEncoderConfig,
    create_id_encoder,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PreparedAdapterCache",
    "build_id_encoder",
    "check_lora_applied",
    "detect_version",
    "fuse_lora_into_unet",
    "load_checkpoint",
    "lora_target_modules",
    "parse_pm_version",
    "resolve_checkpoint_file",
]

PARTS = ("id_encoder", "lora_weights")
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")
HUB_KWARGS = frozenset(
    {
        "cache_dir",
        "revision",
        "token",
        "local_files_only",
        "force_download",
        "user_agent",
        "endpoint",
        "etag_timeout",
        "headers",
        "local_dir",
        "repo_type",
    }
)
# diffusers-style arguments that huggingface_hub no longer takes; accepted and ignored so callers keep working.
IGNORED_HUB_KWARGS = frozenset({"proxies", "resume_download"})
_MAX_LISTED = 12


def _listing(names: list[str]) -> str:
    """Comma-separated names, shortened to the first few with a count of the rest."""
    shown = ", ".join(repr(name) for name in names[:_MAX_LISTED])
    return shown + (f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def load_checkpoint(
    path_or_repo_or_dict: str | os.PathLike[str] | Mapping[str, Any],
    weight_name: str | None = None,
    subfolder: str = "",
    **hub_kwargs: Any,
) -> dict[str, dict[str, torch.Tensor]]:
    """Return ``{"id_encoder": {...}, "lora_weights": {...}}`` from any supported source (see module doc).

    ``hub_kwargs`` (cache_dir, revision, token, local_files_only, force_download, ...) go to
    ``huggingface_hub.hf_hub_download``; with ``HF_HUB_OFFLINE=1`` only the local cache is used.
    """
    if isinstance(path_or_repo_or_dict, Mapping):
        return _split_parts(path_or_repo_or_dict, "the given state dict")
    if not isinstance(path_or_repo_or_dict, (str, os.PathLike)):
        raise CheckpointError(
            f"A PhotoMaker checkpoint must be a file path, a folder, a Hub repo id or a dict of tensors; "
            f"got {type(path_or_repo_or_dict).__name__}."
        )
    source = os.fspath(path_or_repo_or_dict)
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        return _load_file(_file_in_folder(path, weight_name, subfolder))
    if _looks_like_local_path(source):
        raise CheckpointError(
            f"No PhotoMaker checkpoint at '{source}': the file does not exist. Check the path, or pass a Hub "
            "repo id such as 'TencentARC/PhotoMaker' with weight_name='photomaker-v1.bin'."
        )
    return _load_file(_download(source, weight_name, subfolder, hub_kwargs))


def _looks_like_local_path(source: str) -> bool:
    """Hub repo ids are 'name' or 'owner/name'; anything path-shaped is treated as a missing local file."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or source.lower().endswith(CHECKPOINT_SUFFIXES)
    )


def _file_in_folder(folder: Path, weight_name: str | None, subfolder: str) -> Path:
    directory = folder / subfolder if subfolder else folder
    if weight_name is None:
        candidates = sorted(p.name for p in directory.glob("*") if p.suffix in CHECKPOINT_SUFFIXES)
        hint = f" Files there: {_listing(candidates)}." if candidates else " It has no checkpoint files."
        raise CheckpointError(
            f"'{folder}' is a folder: pass weight_name to say which file to load, e.g. "
            f"weight_name='photomaker-v1.bin'.{hint}"
        )
    path = directory / weight_name
    if not path.is_file():
        raise CheckpointError(f"No file '{weight_name}' in '{directory}'. Check weight_name and subfolder.")
    return path


def _download(repo_id: str, weight_name: str | None, subfolder: str, hub_kwargs: dict[str, Any]) -> Path:
    from huggingface_hub import hf_hub_download

    if weight_name is None:
        raise CheckpointError(
            f"'{repo_id}' is not a local file, so it is read as a Hub repo id: pass weight_name to say which "
            "file to download, e.g. weight_name='photomaker-v1.bin' (TencentARC/PhotoMaker) or "
            "'photomaker-v2.bin' (TencentARC/PhotoMaker-V2)."
        )
    unknown = sorted(set(hub_kwargs) - HUB_KWARGS - IGNORED_HUB_KWARGS)
    if unknown:
        raise TypeError(f"Unknown Hub download argument(s) {unknown}; supported: {sorted(HUB_KWARGS)}.")
    ignored = sorted(set(hub_kwargs) & IGNORED_HUB_KWARGS)
    if ignored:
        logger.warning("Ignoring %s: huggingface_hub no longer supports them", ignored)
    kwargs = {key: value for key, value in hub_kwargs.items() if key in HUB_KWARGS}
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {
        "1",
        "true",
        "yes",
        "on",
    }
    if offline:
        kwargs["local_files_only"] = True
    where = f"'{weight_name}' from Hub repo '{repo_id}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
    try:
        return Path(hf_hub_download(repo_id, weight_name, subfolder=subfolder or None, **kwargs))
    except Exception as exc:  # huggingface_hub raises many unrelated types; all mean "could not get the file"
        if offline or kwargs.get("local_files_only"):
            fix = (
                "Offline mode (HF_HUB_OFFLINE=1 or local_files_only) only uses the local cache: download the "
                "file once with network access, or pass a local path to it."
            )
        else:
            fix = (
                "Check the repo id, weight_name (e.g. 'photomaker-v1.bin'), revision and your network/token, "
                "or pass a local path to the file."
            )
        raise CheckpointError(f"Could not get {where}: {type(exc).__name__}: {exc}. {fix}") from exc


def _load_file(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    logger.info("Loading PhotoMaker checkpoint %s", path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            contents: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError
            raise CheckpointError(f"'{path}' is not a readable safetensors file ({exc}); re-download it.") from exc
        return _split_parts(contents, f"'{path}'")
    try:
        try:
            # mmap: tensors are read from the page cache when first used instead of copied up front.
            contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            contents = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"Refused to load '{path}': the pickle contains Python objects other than tensors and plain "
            f"containers, which could run code; nothing in it was executed ({exc}). Use the official "
            "PhotoMaker files or a .safetensors conversion made from a trusted copy."
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise CheckpointError(
            f"'{path}' cannot be read as a torch checkpoint ({type(exc).__name__}: {exc}); the download may be "
            "incomplete or this is not a PhotoMaker file."
        ) from exc
    return _split_parts(contents, f"'{path}'")


def _split_parts(contents: Any, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Validate the two-part layout (nested or prefixed flat) and return fresh nested dicts."""
    if not isinstance(contents, Mapping):
        raise CheckpointError(
            f"{source} holds a {type(contents).__name__}, not a dict with 'id_encoder' and 'lora_weights'; "
            "it is not a PhotoMaker checkpoint."
        )
    if any(key in PARTS for key in contents):
        parts = {key: contents[key] for key in PARTS if key in contents}
        unexpected = [str(key) for key in contents if key not in PARTS]
    else:
        parts = {}
        unexpected = []
        for key, value in contents.items():
            part, dot, name = str(key).partition(".")
            if dot and part in PARTS:
                parts.setdefault(part, {})[name] = value
            else:
                unexpected.append(str(key))
    missing = [part for part in PARTS if part not in parts]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected {_listing(unexpected)}")
        raise CheckpointError(
            f"{source} does not have the PhotoMaker layout ({'; '.join(problems)}). Expected exactly two parts, "
            "'id_encoder' and 'lora_weights' (nested dicts, or flat keys prefixed 'id_encoder.' / "
            "'lora_weights.'), as in photomaker-v1.bin / photomaker-v2.bin."
        )
    result: dict[str, dict[str, torch.Tensor]] = {}
    for part in PARTS:
        tensors = parts[part]
        if not isinstance(tensors, Mapping):
            raise CheckpointError(f"{source}: '{part}' is a {type(tensors).__name__}, not a dict of tensors.")
        bad = [str(name) for name, value in tensors.items() if not isinstance(value, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{source}: '{part}' has entries that are not tensors: {_listing(bad)}.")
        result[part] = {str(name): value for name, value in tensors.items()}
    return result


def detect_version(id_encoder_state_dict: Mapping[str, torch.Tensor]) -> int:
    """2 when the ID encoder has the v2 ``qformer_perceiver.*`` weights, else 1."""
    return 2 if any(key.startswith(PERCEIVER_PREFIX) for key in id_encoder_state_dict) else 1


_VERSION_SPELLINGS = {"1": 1, "v1": 1, "2": 2, "v2": 2}


def parse_pm_version(value: int | str | None) -> int | None:
    """The PhotoMaker version as 1, 2 or None (auto-detect) from any accepted spelling.

    Accepts 1 / 2, "1" / "2" and the reference's "v1" / "v2" (any case, surrounding spaces ignored), so code
    written for the reference package runs unchanged; "auto" means None. Anything else raises
    :class:`CheckpointError`.
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value in (1, 2):
        return int(value)
    if isinstance(value, str):
        spelled = value.strip().lower()
        if spelled == "auto":
            return None
        if spelled in _VERSION_SPELLINGS:
            return _VERSION_SPELLINGS[spelled]
    raise CheckpointError(
        f"PhotoMaker version must be 1, 2, 'v1', 'v2' or None (auto-detect from the weights); got {value!r}."
    )


def build_id_encoder(
    id_encoder_state_dict: Mapping[str, torch.Tensor],
    version: int | str | None = None,
    dtype: torch.dtype | None = None,
) -> PhotoMakerIDEncoder:
    """Build the encoder the weights describe (sizes inferred from shapes) and load them strictly, in eval mode.

    The skeleton is created on the ``meta`` device, so no time is spent on random initialisation of the
    300 M-parameter vision tower. ``version`` (1 or 2, or "v1" / "v2" as the reference spells it; see
    :func:`parse_pm_version`), when given, must match the weights.
    ``dtype=None`` gives an fp32 copy of the weights; with a ``dtype`` the encoder takes the given tensors
    themselves (converted only where their dtype differs), so no fp32 copy is made on the way to fp16/bf16.
    """
    version = parse_pm_version(version)
    detected = detect_version(id_encoder_state_dict)
    if version is not None and version != detected:
        found = "has" if detected == 2 else "has no"
        raise CheckpointError(
            f"PhotoMaker v{version} was requested but the checkpoint {found} 'qformer_perceiver.*' weights, so "
            f"it is a v{detected} file. Pass version={detected} (or None to auto-detect), or load the "
            f"photomaker-v{version}.bin file."
        )
    try:
        config = PhotoMakerIDEncoderConfig.from_state_dict(id_encoder_state_dict)
    except CheckpointError:
        # Too broken to infer sizes: compare against the official layout to list what is wrong.
        config = PhotoMakerIDEncoderConfig()
    with torch.device("meta"), _no_weight_init():  # every weight is loaded below: skip the random init
        encoder = create_id_encoder(config, detected)
    _check_keys(encoder, id_encoder_state_dict, detected)
    if dtype is None:
        encoder = encoder.to_empty(device="cpu")
        encoder.load_state_dict(dict(id_encoder_state_dict), strict=True)
    else:
        encoder.load_state_dict(dict(id_encoder_state_dict), strict=True, assign=True)
        encoder = encoder.to(dtype)
    encoder.reset_position_ids()
    encoder.requires_grad_(False)
    return encoder.eval()


def _no_weight_init() -> Any:
    """transformers' context that turns weight initialisation off (about half the time of building the encoder)."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _check_keys(encoder: nn.Module, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
    expected = encoder.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} (expected {tuple(tensor.shape)})"
        for key, tensor in expected.items()
        if key in state_dict and state_dict[key].shape != tensor.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"The id_encoder weights do not fit a PhotoMaker v{version} ID encoder:"]
    if missing:
        lines.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        lines.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    lines.append("Use an official photomaker-v1.bin / photomaker-v2.bin (or a faithful conversion) for this encoder.")
    raise CheckpointError("\n".join(lines))


_LEGACY_LORA_KEY = re.compile(
    r"^(?P<prefix>unet\.)?(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<kind>down|up)\.weight$"
)
_PEFT_LORA_KEY = re.compile(
    r"^(?P<prefix>unet\.)?(?P<path>.+)\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.lora_(?P<kind>A|B)\.weight$"
)


def _lora_target(key: str) -> tuple[bool, str, str] | None:
    """(has 'unet.' prefix, UNet module path, 'lora_A' | 'lora_B') for a legacy or peft-style key."""
    if match := _LEGACY_LORA_KEY.match(key):
        projection = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        kind = "lora_A" if match["kind"] == "down" else "lora_B"
    elif match := _PEFT_LORA_KEY.match(key):
        projection, kind = match["proj"], f"lora_{match['kind']}"
    else:
        return None
    return match["prefix"] is not None, f"{match['path']}.{projection}", kind


def check_lora_applied(unet: nn.Module, lora_state_dict: Mapping[str, torch.Tensor], adapter_name: str) -> int:
    """Verify that every LoRA tensor landed in the UNet under ``adapter_name``; return how many were checked.

    Also reports adapter layers of ``adapter_name`` in the UNet that no tensor of the LoRA filled (peft
    creates them for a target module, then leaves them at their random/zero initial values).

    Run it after ``pipe.load_lora_weights(lora_state_dict, adapter_name=...)`` and before ``fuse_lora``:
    diffusers only logs a line for keys it does not recognise (keys without the ``unet.`` prefix are
    silently skipped), which would leave the ID fusion working against an un-adapted UNet. Each legacy
    ``<path>.processor.to_q_lora.down/up.weight`` (or peft ``to_q.lora_A/B.weight``) must equal the peft
    ``lora_A/lora_B[adapter_name]`` weight of ``<path>.to_q`` (``to_out`` -> ``to_out.0``) up to dtype.
    """
    problems: list[str] = []
    covered: set[tuple[str, str]] = set()
    for key, tensor in lora_state_dict.items():
        target = _lora_target(key)
        if target is None:
            problems.append(f"{key}: not a UNet attention LoRA key (expected '...processor.to_q_lora.down.weight')")
            continue
        has_prefix, module_path, kind = target
        if not has_prefix:
            problems.append(f"{key}: no 'unet.' prefix, so diffusers ignores it; prefix the key with 'unet.'")
            continue
        covered.add((module_path, kind))
        try:
            module = unet.get_submodule(module_path)
        except AttributeError:
            problems.append(f"{key}: the UNet has no module '{module_path}' (LoRA made for another architecture?)")
            continue
        layers = getattr(module, kind, None)
        if not isinstance(layers, nn.ModuleDict) or adapter_name not in layers:
            problems.append(f"{key}: '{module_path}' has no LoRA adapter '{adapter_name}' (it was not loaded)")
            continue
        actual = layers[adapter_name].weight
        if actual.device.type == "meta":
            problems.append(f"{key}: '{module_path}' weights are not materialised (meta device); cannot verify")
            continue
        expected = tensor.detach().to(device=actual.device, dtype=actual.dtype)
        if actual.shape != expected.shape:
            problems.append(f"{key}: shape {tuple(expected.shape)} but the UNet holds {tuple(actual.shape)}")
        elif not torch.equal(actual.detach(), expected):
            problems.append(f"{key}: values differ from the UNet's {kind}['{adapter_name}'] of '{module_path}'")
    for module_path, module in unet.named_modules():
        for kind in ("lora_A", "lora_B"):
            layers = getattr(module, kind, None)
            if isinstance(layers, nn.ModuleDict) and adapter_name in layers and (module_path, kind) not in covered:
                problems.append(
                    f"'{module_path}' has adapter '{adapter_name}' but the LoRA has no {kind} tensor for it "
                    "(left at its initial value)"
                )
    if problems:
        raise CheckpointError(
            f"The PhotoMaker LoRA did not load cleanly into the UNet ({len(problems)} problem(s), "
            f"{len(lora_state_dict)} tensors):\n"
            + "\n".join(problems[:_MAX_LISTED])
            + (f"\n... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else "")
            + "\nThe LoRA must target this UNet with keys like "
            "'unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight'."
        )
    logger.info(
        "Verified %d LoRA tensors of adapter '%s' in the UNet",
        len(lora_state_dict),
        adapter_name,
    )
    return len(lora_state_dict)


@torch.no_grad()
def fuse_lora_into_unet(unet: nn.Module, lora_state_dict: Mapping[str, torch.Tensor]) -> int:
    """Add ``up @ down`` (scale 1, as PhotoMaker's LoRA has no alphas) to every targeted UNet weight; return how
    many weights changed.

    The same result as diffusers' load_lora_weights + fuse_lora + unload_lora_weights, without creating peft
    layers: on a real-size SDXL UNet on a CPU that path takes about 35 s, this one a few seconds. Every key is
    checked first (legacy ``...processor.to_q_lora.down.weight`` or peft ``...to_q.lora_A.weight`` with the
    ``unet.`` prefix, an existing linear layer, complete down/up pairs, matching shapes); nothing is changed
    unless all are valid. The product is accumulated in fp32 and rounded once into the weight's dtype (fp16 on a
    CPU is computed in fp32, where half-precision matrix products are slow).
    """
    targets = _fuse_targets(unet, lora_state_dict)
    for _, module, down, up in targets:
        weight = module.weight
        if weight.dtype == torch.float16 and weight.device.type == "cpu":
            weight.add_((up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32)).to(weight.dtype))
        else:
            weight.addmm_(up.to(weight.device, weight.dtype), down.to(weight.device, weight.dtype))
    logger.info("Fused %d LoRA weight pairs into the UNet", len(targets))
    return len(targets)


def lora_target_modules(unet: nn.Module, lora_state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The UNet module paths a PhotoMaker LoRA changes (validated as `fuse_lora_into_unet` does)."""
    return [path for path, _, _, _ in _fuse_targets(unet, lora_state_dict)]


_Target = tuple[str, nn.Linear, torch.Tensor, torch.Tensor]  # module path, layer, down, up


def _fuse_targets(unet: nn.Module, lora_state_dict: Mapping[str, torch.Tensor]) -> list[_Target]:
    """Pair the LoRA tensors with the UNet's linear layers; raise CheckpointError listing every problem."""
    problems: list[str] = []
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora_state_dict.items():
        target = _lora_target(key)
        if target is None:
            problems.append(f"{key}: not a UNet attention LoRA key (expected '...processor.to_q_lora.down.weight')")
            continue
        has_prefix, module_path, kind = target
        if not has_prefix:
            problems.append(f"{key}: no 'unet.' prefix; prefix the key with 'unet.'")
            continue
        if kind in pairs.setdefault(module_path, {}):
            problems.append(f"{key}: a second {kind} tensor for '{module_path}'")
        pairs[module_path][kind] = tensor
    targets: list[_Target] = []
    for module_path, pair in pairs.items():
        try:
            module = unet.get_submodule(module_path)
        except AttributeError:
            problems.append(f"'{module_path}': the UNet has no such module (LoRA made for another architecture?)")
            continue
        if not isinstance(module, nn.Linear):
            problems.append(f"'{module_path}' is a {type(module).__name__}, not a plain linear layer")
            continue
        missing = {"lora_A", "lora_B"} - set(pair)
        if missing:
            problems.append(f"'{module_path}': the LoRA has no {' / '.join(sorted(missing))} tensor for it")
            continue
        down, up = pair["lora_A"], pair["lora_B"]
        if (
            down.ndim != 2
            or up.ndim != 2
            or up.shape[1] != down.shape[0]
            or (up.shape[0], down.shape[1]) != tuple(module.weight.shape)
        ):
            problems.append(
                f"'{module_path}': up {tuple(up.shape)} x down {tuple(down.shape)} does not fit the weight "
                f"{tuple(module.weight.shape)}"
            )
            continue
        targets.append((module_path, module, down, up))
    if problems:
        raise CheckpointError(
            f"The PhotoMaker LoRA does not fit this UNet ({len(problems)} problem(s), {len(lora_state_dict)} "
            "tensors):\n"
            + "\n".join(problems[:_MAX_LISTED])
            + (f"\n... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else "")
            + "\nThe LoRA must target this UNet with keys like "
            "'unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight'."
        )
    return targets


PREPARED_CACHE_FORMAT = 1


class PreparedAdapterCache:
    """The adapter as it ends up after loading with ``fuse=True``, saved once: the fused UNet weights and the ID
    encoder in the model's dtype, in one safetensors file (about 2.6 GB for SDXL in fp16/bf16).

    A later load of the same adapter file onto the same base weights maps that file instead of reading the
    checkpoint and fusing: a cold start then costs about what loading the base model costs, and, since the file
    holds only what is used, no memory beyond the ID encoder. The file name is derived from the adapter file and
    the UNet's weight files (resolved path, size, modification time) and the dtype; inside, a sample of the values
    every targeted weight had before fusing must match the UNet being loaded (so a UNet changed in memory after
    loading does not match). When the UNet was not loaded from local files there is no cache.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], unet: nn.Module, adapter_file: Path | None) -> None:
        self.unet = unet
        self._modules: dict[str, nn.Module] | None = None
        self.path: Path | None = None
        key = self._key(unet, adapter_file) if adapter_file is not None else None
        if key is None:
            logger.info("No prepared-adapter cache: the adapter or the UNet was not loaded from local files")
        else:
            self.path = Path(cache_dir).expanduser() / f"photomaker-prepared-{key}.safetensors"

    @staticmethod
    def _key(unet: nn.Module, adapter_file: Path) -> str | None:
        import hashlib
        import json

        config = getattr(unet, "config", None)
        unet_dir = config.get("_name_or_path") if isinstance(config, Mapping) else None
        if not unet_dir or not os.path.isdir(unet_dir) or not adapter_file.is_file():
            return None
        files = sorted(p for p in Path(unet_dir).iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
        if not files:
            return None
        dtype = next(unet.parameters()).dtype
        hasher = hashlib.sha256(json.dumps([PREPARED_CACHE_FORMAT, str(dtype)]).encode())
        for path in (adapter_file, *files):
            stat = path.stat()
            hasher.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns};".encode())
        return hasher.hexdigest()[:32]

    def _weight(self, path: str) -> torch.Tensor:
        if self._modules is None:  # one walk of the UNet instead of one get_submodule per weight
            self._modules = dict(self.unet.named_modules())
        module = self._modules.get(path)
        if not isinstance(module, nn.Linear):
            raise KeyError(path)
        return module.weight

    def fingerprint(self, modules: list[str]) -> str:
        """A hash of the first and last values of each module's weight (reads two pages per weight)."""
        import hashlib

        hasher = hashlib.sha256()
        for path in modules:
            flat = self._weight(path).detach().reshape(-1)
            hasher.update(path.encode())
            hasher.update(torch.cat([flat[:16], flat[-16:]]).to("cpu", torch.float32).numpy().tobytes())
        return hasher.hexdigest()

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(ID encoder state dict, fused weights by module path) when the cache matches this UNet, else None."""
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        if self.path is None or not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            modules = json.loads(metadata.get("modules", "[]"))
            if metadata.get("format") != str(PREPARED_CACHE_FORMAT) or not modules:
                raise ValueError("unknown format")
            if metadata.get("fingerprint") != self.fingerprint(modules):
                logger.info("The prepared-adapter cache %s was made from other base weights", self.path)
                return None
            tensors = load_file(str(self.path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is rebuilt, never trusted
            logger.warning("Ignoring the prepared-adapter cache %s (%s)", self.path, exc)
            return None
        fused = {key[len("unet.") :]: value for key, value in tensors.items() if key.startswith("unet.")}
        encoder = {key[len("id_encoder.") :]: value for key, value in tensors.items() if key.startswith("id_encoder.")}
        for path in modules:
            weight = self._weight(path)
            if path not in fused or fused[path].shape != weight.shape or fused[path].dtype != weight.dtype:
                logger.warning("The prepared-adapter cache %s does not fit this UNet; loading again", self.path)
                return None
        return encoder, fused

    def apply(self, fused: Mapping[str, torch.Tensor]) -> None:
        """Put the cached fused weights into the UNet (mapped from the file: nothing is copied on the CPU)."""
        for path, tensor in fused.items():
            weight = self._weight(path)
            weight.data = tensor.to(weight.device)
        logger.info("Fused UNet weights and ID encoder mapped from %s", self.path)

    def save(self, modules: list[str], base_fingerprint: str, id_encoder: nn.Module) -> None:
        """Write the fused weights of ``modules`` and the encoder (after fusing, with the pre-fuse fingerprint)."""
        import json

        from safetensors.torch import save_file

        if self.path is None:
            return
        partial = self.path.with_name(self.path.name + f".{os.getpid()}.partial")
        # Called after the UNet was fused: any failure here (a full disk, a read-only folder, safetensors' own
        # SafetensorError, ...) only costs the next start its fuse and must never fail the load.
        try:
            tensors = {f"unet.{path}": self._weight(path).detach().to("cpu").contiguous() for path in modules}
            tensors.update(
                {
                    f"id_encoder.{name}": value.detach().to("cpu").contiguous()
                    for name, value in id_encoder.state_dict().items()
                }
            )
            metadata = {
                "format": str(PREPARED_CACHE_FORMAT),
                "modules": json.dumps(modules),
                "fingerprint": base_fingerprint,
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(partial), metadata=metadata)
            os.replace(partial, self.path)
            logger.info("Saved the prepared adapter to %s", self.path)
        except Exception as exc:  # noqa: BLE001 - see above
            logger.warning("Could not save the prepared-adapter cache %s: %s", self.path, exc)
            try:
                if partial.is_file():
                    partial.unlink()
            except OSError as cleanup_error:
                logger.warning("Could not remove the partial cache file %s: %s", partial, cleanup_error)


def resolve_checkpoint_file(
    path_or_repo_or_dict: Any, weight_name: str | None = None, subfolder: str = "", **hub_kwargs: Any
) -> Path | None:
    """The local file `load_checkpoint` would read for these arguments (a Hub file is downloaded into the Hub
    cache first), or None (a dict, or a file that cannot be had)."""
    if isinstance(path_or_repo_or_dict, Mapping) or not isinstance(path_or_repo_or_dict, (str, os.PathLike)):
        return None
    path = Path(os.fspath(path_or_repo_or_dict)).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = (path / subfolder if subfolder else path) / (weight_name or "")
        return candidate if weight_name and candidate.is_file() else None
    if weight_name is None or _looks_like_local_path(os.fspath(path_or_repo_or_dict)):
        return None
    try:
        # Downloaded now if missing (load_checkpoint then finds it in the Hub cache): the first start with a
        # Hub checkpoint fills the prepared-adapter cache too.
        return _download(os.fspath(path_or_repo_or_dict), weight_name, subfolder, dict(hub_kwargs))
    except Exception:  # noqa: BLE001 - load_checkpoint reports the same failure with its full explanation
        return None
