"""The PhotoMaker part of every PhotoMaker pipeline, as one mixin over a diffusers SDXL pipeline.

`PhotoMakerMixin` holds what does not depend on the kind of pipeline (text-to-image, ControlNet, T2I-Adapter,
img2img, inpaint): loading the adapter (ID encoder + UNet LoRA + trigger word), moving and offloading the ID
encoder, encoding ID photos once, the prompt surgery that makes the ID-fused and the text-only conditionings,
and the negative prompt. Each pipeline's `__call__` asks it for the two conditionings and picks one per step.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import CLIPImageProcessor

from .errors import CheckpointError, IDImageError, InvalidRequestError, ModelLoadError, PromptError
from .id_encoder import PhotoMakerIDEncoder
from .loading import (
    PreparedAdapterCache,
    build_id_encoder,
    check_lora_applied,
    fuse_lora_into_unet,
    load_checkpoint,
    lora_target_modules,
    resolve_checkpoint_file,
)
from .prompt import (
    DEFAULT_TRIGGER_WORD,
    add_trigger_token,
    expand_class_tokens,
    pad_or_truncate,
    remove_trigger,
)

logger = logging.getLogger(__name__)

PromptInput = str | list[str] | None

# Set on the UNet once a PhotoMaker LoRA is in it: "fused", or the adapter name. The UNet is what changes and it
# can be shared by several pipelines (`P(**pipe.components)`), so the pipeline's own state cannot tell.
_UNET_MARK = "_photomaker_lora"


@dataclass
class IDEncoding:
    """The ID tokens of a set of photos: compute once with `encode_id_images`, pass to any later call.

    `id_tokens` has shape [N, T, D]: N photos, T tokens per photo (v1: 1, v2: 2), D = SDXL's text width.
    """

    id_tokens: torch.Tensor
    version: int

    @property
    def num_images(self) -> int:
        return self.id_tokens.shape[0]

    @property
    def tokens_per_image(self) -> int:
        return self.id_tokens.shape[1]

    @property
    def num_id_tokens(self) -> int:
        return self.num_images * self.tokens_per_image


@dataclass
class _Conditioning:
    """Everything one denoising phase feeds the UNet (negatives first when CFG is on)."""

    prompt_embeds: torch.Tensor
    add_text_embeds: torch.Tensor


@dataclass
class PhotoMakerEmbeddings:
    """One call's prompt, encoded once, one row per prompt: ID-fused, text-only, and the negative (None without
    CFG). Each pipeline turns it into its two phases with `PhotoMakerMixin.photomaker_phases`."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_only_embeds: torch.Tensor
    text_only_pooled: torch.Tensor
    negative_embeds: torch.Tensor | None
    negative_pooled: torch.Tensor | None


def _labelled(message: str, label: str | None) -> str:
    """A prompt message that names the argument it is about ("prompt_2 has no trigger word ...")."""
    if label is None:
        return message
    if message.startswith("The prompt "):
        return f"{label} " + message[len("The prompt ") :]
    return f"{label}: {message}"


def _return_freed_memory() -> None:
    """Hand freed memory back to the OS: glibc keeps freed blocks below its (adaptive) mmap threshold in the
    process, about 40 MB after loading the real-size adapter on a CPU and 75 MB after encoding photos there."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to do
            pass


class PhotoMakerMixin:
    """PhotoMaker for a diffusers SDXL pipeline: put it first in the bases, e.g.
    `class P(PhotoMakerMixin, StableDiffusionXLControlNetPipeline)`. Load an SDXL base, then
    `load_photomaker_adapter`."""

    id_encoder: PhotoMakerIDEncoder | None = None
    id_image_processor: CLIPImageProcessor | None = None
    trigger_word: str | None = None
    pm_version: int | None = None

    # ------------------------------------------------------------------ loading

    def load_photomaker_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | dict,
        weight_name: str | None = None,
        subfolder: str = "",
        trigger_word: str = DEFAULT_TRIGGER_WORD,
        pm_version: int | str | None = None,
        fuse: bool = True,
        adapter_name: str = "photomaker",
        fused_cache_dir: str | None = None,
        **hub_kwargs: Any,
    ) -> None:
        """Load a PhotoMaker checkpoint: ID encoder, UNet LoRA, trigger word.

        Args:
            pretrained_model_name_or_path_or_dict: a checkpoint file (official pickled `.bin` or flat
                `.safetensors`), a local folder or Hub repo id (with `weight_name`), or a state dict.
            weight_name: file name inside the folder or repo, e.g. `"photomaker-v1.bin"`.
            subfolder: folder inside the repo.
            trigger_word: the word that follows the class word in prompts; added to both tokenizers.
            pm_version: 1 or 2 (or "v1" / "v2", as the official file names say); detected from the keys when
                None.
            fuse: bake the LoRA into the UNet weights (fastest). With `fuse=False` it stays a named adapter
                (`adapter_name`) that can be mixed with other LoRAs through `set_adapters`.
            fused_cache_dir: with `fuse=True`, a folder where the adapter is kept as loaded (fused UNet weights and
                the ID encoder in the model's dtype, about 2.6 GB per base model, adapter and dtype): later loads
                of the same pair map that file instead of reading the checkpoint and fusing, so a cold start costs
                about what loading the base model costs. See `loading.PreparedAdapterCache`.
            hub_kwargs: passed to `huggingface_hub.hf_hub_download` (cache_dir, revision, token, ...).
        """
        if self.id_encoder is not None:
            raise CheckpointError(
                "A PhotoMaker adapter is already loaded into this pipeline; load the base model again to use "
                "another one (a fused LoRA cannot be taken out exactly)."
            )
        self._check_unet_has_no_photomaker_lora()
        self._check_no_offload_hooks()
        existing_adapters = self.get_list_adapters().get("unet", []) if hasattr(self.unet, "peft_config") else []
        if fuse and existing_adapters:
            raise ValueError(
                f"The UNet already has LoRA adapters {existing_adapters}: load the PhotoMaker adapter first, "
                "or pass fuse=False to keep it as a named adapter next to them."
            )
        cache = None
        if fuse and fused_cache_dir is not None:
            adapter_file = resolve_checkpoint_file(
                pretrained_model_name_or_path_or_dict, weight_name, subfolder, **hub_kwargs
            )
            cache = PreparedAdapterCache(fused_cache_dir, self.unet, adapter_file)
        cached = cache.load() if cache is not None else None
        if cached is not None:
            encoder_state, fused_weights = cached
            checkpoint = None
        else:
            checkpoint = load_checkpoint(
                pretrained_model_name_or_path_or_dict, weight_name=weight_name, subfolder=subfolder, **hub_kwargs
            )
            encoder_state = checkpoint["id_encoder"]
        unet_dtype = self.unet.dtype  # a walk over the parameters in diffusers: once
        id_encoder = build_id_encoder(encoder_state, version=pm_version, dtype=unet_dtype)
        cross_attention_dim = self.unet.config.cross_attention_dim
        if id_encoder.embed_dim != cross_attention_dim:
            raise CheckpointError(
                f"The PhotoMaker ID encoder produces {id_encoder.embed_dim}-d tokens but this base model's UNet "
                f"expects {cross_attention_dim}-d text embeddings: PhotoMaker needs an SDXL base model."
            )

        if cached is not None:
            cache.apply(fused_weights)
            setattr(self.unet, _UNET_MARK, "fused")
        elif fuse:
            # Straight into the weights, no peft layers: what load + fuse + unload would leave, about 10x faster
            # (no layer injection, no random init, no copy check, one addmm per weight), and a plain UNet, so
            # LoRAs loaded later (fast-mode adapters) are not shadowed by a merged one.
            lora_state_dict = checkpoint["lora_weights"]
            modules = lora_target_modules(self.unet, lora_state_dict) if cache is not None else []
            base_fingerprint = cache.fingerprint(modules) if cache is not None else ""
            fuse_lora_into_unet(self.unet, lora_state_dict)
            setattr(self.unet, _UNET_MARK, "fused")  # at once: a later failure must not let a retry fuse again
            if cache is not None:
                cache.save(modules, base_fingerprint, id_encoder)
        else:
            # PhotoMaker's LoRA targets the UNet only; loading just there also avoids diffusers' warnings about
            # text encoders without LoRA keys. Diffusers skips unmatched keys with a log line: check them all.
            lora_state_dict = checkpoint["lora_weights"]
            state_dict, network_alphas = self.lora_state_dict(dict(lora_state_dict), unet_config=self.unet.config)
            self.load_lora_into_unet(state_dict, network_alphas, self.unet, adapter_name=adapter_name, _pipeline=self)
            setattr(self.unet, _UNET_MARK, adapter_name)
            check_lora_applied(self.unet, lora_state_dict, adapter_name)
        if checkpoint is not None:
            # The checkpoint is memory-mapped: weights that still view it would keep all of it mapped (the LoRA's
            # pages too, once read); own copies let the mapping go when the checkpoint is dropped.
            mapped = {t.untyped_storage().data_ptr() for part in checkpoint.values() for t in part.values()}
            for parameter in id_encoder.parameters():
                if parameter.untyped_storage().data_ptr() in mapped:
                    parameter.data = parameter.data.clone()
            del checkpoint
        _return_freed_memory()

        self.id_encoder = id_encoder.to(device=self.unet.device, dtype=unet_dtype).eval()
        image_size = id_encoder.config.image_size
        self.id_image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        self.pm_version = id_encoder.version
        self.trigger_word = trigger_word
        for tokenizer in (self.tokenizer, self.tokenizer_2):
            if tokenizer is not None:
                add_trigger_token(tokenizer, trigger_word)
        logger.info("Loaded PhotoMaker v%d adapter (fused=%s).", self.pm_version, fuse)

    def use_photomaker_adapter_of(self, other: PhotoMakerMixin) -> None:
        """Take the PhotoMaker adapter that `other` loaded into the UNet both share, e.g. a ControlNet pipeline
        built as `PhotoMakerStableDiffusionXLControlNetPipeline(**pipe.components, controlnet=...)`: the ID encoder
        and the trigger word come along; nothing is read or fused again (loading again would refuse, as the LoRA
        is already in the UNet)."""
        if other.id_encoder is None:
            raise CheckpointError(
                "The other pipeline has no PhotoMaker adapter loaded: call its load_photomaker_adapter(...) first."
            )
        pairs = ((other.unet, self.unet), (other.tokenizer, self.tokenizer), (other.tokenizer_2, self.tokenizer_2))
        if not all(theirs is ours for theirs, ours in pairs):
            raise CheckpointError(
                "use_photomaker_adapter_of needs a pipeline that shares this one's UNet and tokenizers (build it "
                "with Pipeline(**other.components, ...)); otherwise call load_photomaker_adapter."
            )
        if self.id_encoder is not None:
            raise CheckpointError("A PhotoMaker adapter is already loaded into this pipeline.")
        self.id_encoder, self.id_image_processor = other.id_encoder, other.id_image_processor
        self.trigger_word, self.pm_version = other.trigger_word, other.pm_version
        # Under model CPU offload the encoder's hook comes along too, or this pipeline would fuse on the CPU copy.
        self._id_encoder_offload_hook = getattr(other, "_id_encoder_offload_hook", None)

    def fuse_lora(self, *args: Any, **kwargs: Any) -> None:
        """`load_photomaker_adapter` already fused the PhotoMaker LoRA (unless `fuse=False`): the official v1 example
        calls `pipe.fuse_lora()` right after it, which must not add the LoRA a second time. With no other LoRA
        loaded this is then a no-op; otherwise diffusers fuses the LoRAs that are loaded as adapters."""
        has_adapters = bool(getattr(self.unet, "peft_config", None)) or any(
            getattr(getattr(self, name, None), "peft_config", None) for name in ("text_encoder", "text_encoder_2")
        )
        if getattr(self.unet, _UNET_MARK, None) == "fused" and not has_adapters:
            logger.info("fuse_lora(): the PhotoMaker LoRA is already fused into the UNet; nothing to do.")
            return
        super().fuse_lora(*args, **kwargs)

    def _check_unet_has_no_photomaker_lora(self) -> None:
        """Refuse a UNet that already holds a PhotoMaker LoRA, e.g. one shared with the pipeline that loaded it:
        a second fuse would add the LoRA twice. An unfused adapter that was unloaded since does not count."""
        mark = getattr(self.unet, _UNET_MARK, None)
        if mark is None:
            return
        if mark != "fused" and mark not in (getattr(self.unet, "peft_config", None) or {}):
            return
        how = "fused into its weights" if mark == "fused" else f"as the adapter {mark!r}"
        raise CheckpointError(
            f"This UNet already holds a PhotoMaker LoRA ({how}), loaded through another pipeline that shares it "
            "(e.g. one built with `Pipeline(**pipe.components)`): use that pipeline, or load the base model again "
            "for a second adapter (loading another would add the LoRA to the UNet twice)."
        )

    def _check_no_offload_hooks(self) -> None:
        """Refuse to load under CPU offload: the hooks are attached to what exists when offload is enabled, so the
        ID encoder would get none (model offload) and the LoRA would be fused into placeholder weights
        (sequential offload)."""
        hooked = [
            name
            for name, component in self.components.items()
            if isinstance(component, torch.nn.Module) and getattr(component, "_hf_hook", None) is not None
        ]
        if getattr(self, "_all_hooks", None) or (hooked and not self._is_pipeline_device_mapped()):
            raise ModelLoadError(
                "CPU offload is already enabled on this pipeline (accelerate hooks on "
                f"{', '.join(hooked) or 'its components'}): call load_photomaker_adapter before "
                "enable_model_cpu_offload / enable_sequential_cpu_offload, or call pipe.remove_all_hooks() first."
            )

    # ------------------------------------------------------------------ devices

    def to(self, *args: Any, **kwargs: Any) -> PhotoMakerMixin:
        """Move the pipeline and the ID encoder (which is not a registered component) together."""
        super().to(*args, **kwargs)
        if self.id_encoder is not None and not hasattr(self.id_encoder, "_hf_hook"):
            self.id_encoder.to(device=self.unet.device, dtype=self.unet.dtype)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """Model offload that covers the ID encoder: it visits the accelerator only while encoding photos or fusing."""
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        if self.id_encoder is not None:
            from accelerate import cpu_offload_with_hook

            _, hook = cpu_offload_with_hook(self.id_encoder, self._offload_device)
            self._all_hooks.append(hook)
            self._id_encoder_offload_hook = hook

    @contextlib.contextmanager
    def _id_encoder_on_device(self) -> Iterator[None]:
        """Under model CPU offload, bring the ID encoder to the accelerator for the block, then send it back.

        Its accelerate hook only fires on `forward`, which nothing calls (`encode_images` and `fuse` are used), so
        without this the encoder would run where it is offloaded, on the CPU. Same idea as diffusers'
        `apply_forward_hook` for `vae.decode`.
        """
        hook = getattr(self, "_id_encoder_offload_hook", None)
        if hook is None or getattr(self.id_encoder, "_hf_hook", None) is None:
            yield
            return
        hook.hook.pre_forward(self.id_encoder)
        try:
            yield
        finally:
            hook.offload()

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """Sequential (per-layer) offload, ID encoder included."""
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        if self.id_encoder is not None:
            from accelerate import cpu_offload

            cpu_offload(self.id_encoder, self._offload_device, offload_buffers=True)

    def remove_all_hooks(self) -> None:
        super().remove_all_hooks()
        self._id_encoder_offload_hook = None
        if self.id_encoder is not None and hasattr(self.id_encoder, "_hf_hook"):
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(self.id_encoder, recurse=True)

    # ------------------------------------------------------------------ ID photos

    def _require_adapter(self) -> PhotoMakerIDEncoder:
        if self.id_encoder is None:
            raise CheckpointError("No PhotoMaker adapter is loaded: call pipe.load_photomaker_adapter(...) first.")
        return self.id_encoder

    @staticmethod
    def _as_photo_list(input_id_images: Any) -> list:
        """One photo or many (a list, or a tensor batch [N,C,H,W]) as a list of photos."""
        if isinstance(input_id_images, torch.Tensor) and input_id_images.ndim == 4:
            return list(input_id_images)
        if isinstance(input_id_images, (str, bytes)) or not isinstance(input_id_images, Sequence):
            return [input_id_images]
        return list(input_id_images)

    @staticmethod
    def _photo_label(index: int, image: Any) -> str:
        """How messages name an ID photo: "ID photo 2 (me.jpg)" for a path, so the user knows which file."""
        name = os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else None
        from .images import photo_label

        return photo_label(index, name, "ID photo")

    @torch.no_grad()
    def encode_id_images(
        self,
        input_id_images: Sequence[Any] | torch.Tensor,
        id_embeds: torch.Tensor | Sequence[Any] | None = None,
    ) -> IDEncoding:
        """Run the ID encoder once over the photos; the result can replace `input_id_images` in later calls.

        Args:
            input_id_images: photos of one person (or of several, for identity mixing): PIL images, paths,
                bytes, numpy arrays (HxWxC uint8) or tensors ([C,H,W] or a batch [N,C,H,W], values in [0, 1]).
            id_embeds: PhotoMaker v2 only: one 512-d face-recognition embedding per photo, in the same order
                (see `photomaker.faces`).
        """
        from .images import load_image  # light; kept local so the module imports fast

        id_encoder = self._require_adapter()
        input_id_images = self._as_photo_list(input_id_images)
        if len(input_id_images) == 0:
            raise IDImageError("No ID photos were given: pass at least one photo of the person.")
        images = [load_image(image, name=self._photo_label(i, image)) for i, image in enumerate(input_id_images)]

        device = self._execution_device
        dtype = next(id_encoder.parameters()).dtype
        pixel_values = self.id_image_processor(images, return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=device, dtype=dtype)
        face_embeds = None
        if id_encoder.version >= 2:
            if id_embeds is None:
                raise IDImageError(
                    "PhotoMaker v2 needs one face embedding per ID photo: pass id_embeds (an [N, 512] tensor "
                    "from photomaker.faces, InsightFace backend), in the same order as the photos."
                )
            face_embeds = torch.as_tensor(
                id_embeds
                if not isinstance(id_embeds, Sequence)
                else torch.stack([torch.as_tensor(e) for e in id_embeds])
            )
            face_embeds = face_embeds.reshape(-1, face_embeds.shape[-1]).to(device=device, dtype=dtype)
        with self._id_encoder_on_device():
            id_tokens = id_encoder.encode_images(pixel_values, face_embeds)
        if device.type == "cpu":
            _return_freed_memory()  # the vision tower's activations, ~75 MB real-size, would stay in the heap
        return IDEncoding(id_tokens=id_tokens, version=id_encoder.version)

    # ------------------------------------------------------------------ prompts

    def _tokenize(self, tokenizer, prompts: list[str]) -> list[list[int]]:
        """Full token ids with BOS/EOS and no truncation (surgery decides what to cut)."""
        return tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False).input_ids

    @staticmethod
    def _pad_id(tokenizer) -> int:
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @staticmethod
    def _dropped_note(tokenizer, ids: list[int], dropped: int, label: str | None = None) -> str | None:
        """What a too-long prompt loses at its end; `ids` is the tokenizer's full, untruncated output."""
        if not dropped:
            return None
        cut = tokenizer.decode(ids[-1 - dropped : -1])
        note = f"The prompt is longer than {tokenizer.model_max_length} tokens; these last words were cut: {cut!r}"
        return _labelled(note, label)

    def _surgery(
        self, prompts: list[list[str]], num_id_tokens: int, labels: Sequence[str | None] = (None, None)
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[str]]:
        """Per tokenizer: ids with class copies [B,77], their mask [B,77], text-only ids [B,77]; and notes on
        words cut from too-long prompts. `labels` name the argument each tokenizer's prompts came from in
        errors and notes ("prompt_2" when it was given): the messages say "The prompt" otherwise."""
        id_ids, masks, text_ids, notes = [], [], [], []
        for tokenizer, batch, label in zip(self._tokenizers(), prompts, labels, strict=True):
            trigger_id = tokenizer.convert_tokens_to_ids(self.trigger_word)
            eos_id, pad_id = tokenizer.eos_token_id, self._pad_id(tokenizer)
            max_length = tokenizer.model_max_length
            rows_ids, rows_mask, rows_text = [], [], []
            for prompt, ids in zip(batch, self._tokenize(tokenizer, batch), strict=True):
                try:
                    expanded = expand_class_tokens(
                        ids,
                        trigger_id=trigger_id,
                        num_id_tokens=num_id_tokens,
                        eos_id=eos_id,
                        pad_id=pad_id,
                        max_length=max_length,
                        trigger_word=self.trigger_word,
                        prompt=prompt,
                        decode=tokenizer.decode,
                    )
                except PromptError as exc:
                    if label is None:
                        raise
                    raise PromptError(
                        _labelled(str(exc), label) + f" ({label} is the second text encoder's prompt and is "
                        "checked like prompt; leave it out to use prompt for both.)"
                    ) from exc
                note = self._dropped_note(tokenizer, ids, expanded.num_dropped_tokens, label)
                if note and note not in notes:
                    notes.append(note)
                text_only, _ = pad_or_truncate(
                    remove_trigger(ids, trigger_id), eos_id=eos_id, pad_id=pad_id, max_length=max_length
                )
                rows_ids.append(expanded.input_ids)
                rows_mask.append(expanded.class_tokens_mask)
                rows_text.append(text_only)
            id_ids.append(torch.tensor(rows_ids))
            masks.append(torch.tensor(rows_mask, dtype=torch.bool))
            text_ids.append(torch.tensor(rows_text))
        return id_ids, masks, text_ids, notes

    def _tokenizers(self) -> list:
        return [self.tokenizer, self.tokenizer_2]

    def _encode_ids(
        self, ids_per_encoder: list[torch.Tensor], device: torch.device, clip_skip: int | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Hidden states of each text encoder (penultimate layer, or `clip_skip`) and the pooled output."""
        hidden, pooled = [], None
        for text_encoder, ids in zip((self.text_encoder, self.text_encoder_2), ids_per_encoder, strict=True):
            output = text_encoder(ids.to(device), output_hidden_states=True)
            layer = -2 if clip_skip is None else -(clip_skip + 2)
            hidden.append(output.hidden_states[layer])
            pooled = output[0]  # the last encoder (text_encoder_2) gives SDXL's pooled text embedding
        return hidden, pooled

    def check_prompt(
        self,
        prompt: str | list[str],
        prompt_2: PromptInput = None,
        num_id_images: int = 1,
        negative_prompt: PromptInput = None,
        negative_prompt_2: PromptInput = None,
    ) -> list[str]:
        """Raise `PromptError` now, before any model runs, if the prompt cannot be used with these photos.

        Returns notes for the user (words a too-long prompt or negative prompt loses), so that nothing is
        dropped silently.
        """
        self._require_adapter()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts_2 = prompts if prompt_2 is None else ([prompt_2] if isinstance(prompt_2, str) else list(prompt_2))
        notes = self._surgery(
            [prompts, prompts_2], num_id_images * self.id_encoder.tokens_per_image, self._prompt_labels(prompt_2)
        )[3]
        return notes + self.negative_prompt_notes(negative_prompt, negative_prompt_2)

    def negative_prompt_notes(self, negative_prompt: PromptInput, negative_prompt_2: PromptInput = None) -> list[str]:
        """What a negative prompt longer than the tokenizers' 77 tokens loses at its end, one note per cut."""
        notes: list[str] = []
        negatives = (
            []
            if negative_prompt is None
            else ([negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt))
        )
        negatives_2 = (
            negatives
            if negative_prompt_2 is None
            else ([negative_prompt_2] if isinstance(negative_prompt_2, str) else list(negative_prompt_2))
        )
        label_2 = "The negative prompt" if negative_prompt_2 is None else "negative_prompt_2"
        for tokenizer, batch, label in zip(
            self._tokenizers(), (negatives, negatives_2), ("The negative prompt", label_2), strict=True
        ):
            if tokenizer is None or not batch:
                continue
            for ids in self._tokenize(tokenizer, batch):
                note = self._dropped_note(tokenizer, ids, max(len(ids) - tokenizer.model_max_length, 0), label)
                if note and note not in notes:
                    notes.append(note)
        return notes

    @staticmethod
    def _prompt_labels(prompt_2: PromptInput) -> tuple[str | None, str | None]:
        """Labels for `_surgery`: the second tokenizer's prompts are named only when they are prompt_2's."""
        return (None, None if prompt_2 is None else "prompt_2")

    @torch.no_grad()
    def encode_photomaker_prompt(
        self,
        prompt: str | list[str],
        prompt_2: PromptInput,
        id_encoding: IDEncoding,
        device: torch.device,
        clip_skip: int | None = None,
        id_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the prompt twice: ID-fused, and text-only (trigger removed).

        Returns `(prompt_embeds, pooled_prompt_embeds, prompt_embeds_text_only, pooled_prompt_embeds_text_only)`,
        each with one row per prompt. Each tokenizer is handled on its own: the class copies of prompt 1 and
        prompt 2 may sit at different positions; the fuse module sees [text_encoder row | text_encoder_2 row]
        and writes each half back where it came from. With `prompt_2=None` this is the reference algorithm.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts_2 = prompts if prompt_2 is None else ([prompt_2] if isinstance(prompt_2, str) else list(prompt_2))
        if len(prompts_2) != len(prompts):
            raise ValueError(f"prompt_2 has {len(prompts_2)} entries but prompt has {len(prompts)}.")
        id_ids, masks, text_ids, notes = self._surgery(
            [prompts, prompts_2], id_encoding.num_id_tokens, self._prompt_labels(prompt_2)
        )
        for note in notes:
            logger.warning(note)

        hidden, pooled = self._encode_ids(id_ids, device, clip_skip)
        batch = len(prompts)
        class_rows = torch.cat(
            [h[m.to(device)].view(batch, id_encoding.num_id_tokens, -1) for h, m in zip(hidden, masks, strict=True)],
            dim=-1,
        )
        all_rows = torch.ones(class_rows.shape[:2], dtype=torch.bool, device=device)
        with self._id_encoder_on_device():
            fused = self.id_encoder.fuse(
                class_rows.to(id_encoding.id_tokens.dtype), id_encoding.id_tokens.to(device), all_rows, id_weights
            ).to(hidden[0].dtype)
        widths = [h.shape[-1] for h in hidden]
        for h, m, part in zip(hidden, masks, fused.split(widths, dim=-1), strict=True):
            h[m.to(device)] = part.reshape(-1, part.shape[-1])
        prompt_embeds = torch.cat(hidden, dim=-1)

        text_hidden, text_pooled = self._encode_ids(text_ids, device, clip_skip)
        return prompt_embeds, pooled, torch.cat(text_hidden, dim=-1), text_pooled

    @torch.no_grad()
    def encode_negative_prompt(
        self,
        negative_prompt: PromptInput,
        negative_prompt_2: PromptInput,
        batch_size: int,
        device: torch.device,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Negative embeddings, encoded once for both phases; zeros for an absent negative (SDXL's rule)."""
        if negative_prompt is None and negative_prompt_2 is None and self.config.force_zeros_for_empty_prompt:
            return None
        for note in self.negative_prompt_notes(negative_prompt, negative_prompt_2):
            logger.warning(note)
        negatives = negative_prompt or ""
        negatives = [negatives] * batch_size if isinstance(negatives, str) else list(negatives)
        negatives_2 = (
            negatives
            if negative_prompt_2 is None
            else ([negative_prompt_2] * batch_size if isinstance(negative_prompt_2, str) else list(negative_prompt_2))
        )
        if len(negatives) != batch_size or len(negatives_2) != batch_size:
            raise ValueError(f"Give one negative prompt or {batch_size} (one per prompt).")
        ids = []
        removed = False
        for tokenizer, batch in zip(self._tokenizers(), (negatives, negatives_2), strict=True):
            # The trigger is an added token the text encoders have no embedding for: it must not reach them.
            trigger_id = tokenizer.convert_tokens_to_ids(self.trigger_word) if self.trigger_word else None
            if trigger_id == tokenizer.unk_token_id:  # not added to this tokenizer: nothing to remove (not EOS!)
                trigger_id = None
            rows = []
            for row in self._tokenize(tokenizer, batch):
                if trigger_id is not None and trigger_id in row:
                    row, removed = remove_trigger(row, trigger_id), True
                rows.append(
                    pad_or_truncate(
                        row,
                        eos_id=tokenizer.eos_token_id,
                        pad_id=self._pad_id(tokenizer),
                        max_length=tokenizer.model_max_length,
                    )[0]
                )
            ids.append(torch.tensor(rows))
        if removed:
            logger.warning(
                "The negative prompt contains the trigger word '%s'; it was removed (the trigger only marks the "
                "subject in the prompt).",
                self.trigger_word,
            )
        hidden, pooled = self._encode_ids(ids, device, clip_skip)
        return torch.cat(hidden, dim=-1), pooled

    # ------------------------------------------------------------------ sampling

    def check_photomaker_inputs(
        self,
        input_id_images,
        id_embeds,
        id_weights,
        start_merge_step,
        prompt,
        prompt_embeds,
        class_tokens_mask,
        prompt_embeds_text_only,
        pooled_prompt_embeds_text_only,
        num_inference_steps,
    ) -> None:
        """PhotoMaker's own argument checks (SDXL's are done by `check_inputs`)."""
        self._require_adapter()
        if input_id_images is None:
            raise IDImageError("input_id_images is required: pass 1-4 photos of the person or an IDEncoding.")
        if not isinstance(start_merge_step, int) or start_merge_step < 0:
            raise ValueError(f"start_merge_step must be an integer >= 0, got {start_merge_step!r}.")
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        if isinstance(input_id_images, IDEncoding):
            if input_id_images.version != self.pm_version:
                raise ValueError(
                    f"This IDEncoding was made by a PhotoMaker v{input_id_images.version} encoder but the loaded "
                    f"adapter is v{self.pm_version}: encode the photos again."
                )
            if id_embeds is not None:
                raise ValueError("id_embeds belong to encode_id_images; an IDEncoding already contains them.")
        if prompt_embeds is not None:  # then there is no prompt: SDXL's check_inputs refuses both together
            if class_tokens_mask is None:
                raise ValueError("With prompt_embeds, pass class_tokens_mask ([batch, 77] bool) as well.")
            if prompt_embeds_text_only is None:
                raise ValueError("With prompt_embeds and no prompt, pass prompt_embeds_text_only as well.")
        if (prompt_embeds_text_only is None) != (pooled_prompt_embeds_text_only is None):
            raise ValueError("Pass prompt_embeds_text_only and pooled_prompt_embeds_text_only together.")
        if id_weights is not None:
            weights = torch.as_tensor(id_weights, dtype=torch.float32)
            if weights.ndim != 1 or not torch.isfinite(weights).all():
                raise ValueError(f"id_weights must be a list of finite numbers, one per ID photo; got {id_weights}.")

    def _text_embeds_dtype(self) -> torch.dtype:
        """The dtype of the text encoders' output, which given embeddings are cast to (SDXL's `encode_prompt`)."""
        return self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode; fp16 VAEs that overflow are run in fp32 for the decode, as SDXL does."""
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if not needs_upcasting:
            return self._decode_in_vae_dtype(latents)
        self.vae.to(dtype=torch.float32)
        try:
            return self._decode_in_vae_dtype(latents)
        finally:  # also after a failed decode (out of memory): the VAE must not stay in fp32 for later calls
            self.vae.to(dtype=torch.float16)

    def _decode_in_vae_dtype(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscale the latents (SDXL's scaling factor, and mean/std where the VAE has them) and decode."""
        vae_dtype = next(iter(self.vae.post_quant_conv.parameters())).dtype
        latents = latents.to(vae_dtype)
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]

    # ------------------------------------------------------------------ the two conditionings of a call

    def encode_photomaker_inputs(
        self,
        *,
        prompt: PromptInput,
        prompt_2: PromptInput,
        input_id_images: Sequence[Any] | IDEncoding,
        id_embeds: torch.Tensor | None,
        id_weights: Sequence[float] | torch.Tensor | None,
        negative_prompt: PromptInput,
        negative_prompt_2: PromptInput,
        batch_size: int,
        device: torch.device,
        clip_skip: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        class_tokens_mask: torch.Tensor | None = None,
        prompt_embeds_text_only: torch.Tensor | None = None,
        pooled_prompt_embeds_text_only: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> PhotoMakerEmbeddings:
        """ID tokens (reused from an `IDEncoding`, or the encoder run once), then the prompt encoded ID-fused and
        text-only, and the negative prompt once for both phases (when CFG is on)."""
        if isinstance(input_id_images, IDEncoding):
            id_encoding = input_id_images
        else:
            input_id_images = self._as_photo_list(input_id_images)
            if prompt is not None:  # refuse a bad prompt before spending time on the photos
                self.check_prompt(prompt, prompt_2, len(input_id_images))
            id_encoding = self.encode_id_images(input_id_images, id_embeds)
        weights = None
        if id_weights is not None:
            weights = torch.as_tensor(id_weights, dtype=torch.float32, device=device)
            if weights.shape != (id_encoding.num_images,):
                raise ValueError(
                    f"id_weights has {weights.numel()} values but there are {id_encoding.num_images} ID photos."
                )

        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds, text_embeds, text_pooled = self.encode_photomaker_prompt(
                prompt, prompt_2, id_encoding, device, clip_skip, weights
            )
        else:
            # Given embeddings take the dtype the text encoders would have produced, as SDXL's encode_prompt does.
            embeds_dtype = self._text_embeds_dtype()
            prompt_embeds, pooled_prompt_embeds, text_embeds, text_pooled = (
                t.to(device=device, dtype=embeds_dtype)
                for t in (prompt_embeds, pooled_prompt_embeds, prompt_embeds_text_only, pooled_prompt_embeds_text_only)
            )
            with self._id_encoder_on_device():
                prompt_embeds = self.id_encoder.fuse(
                    prompt_embeds,
                    id_encoding.id_tokens.to(device),
                    class_tokens_mask.to(device=device, dtype=torch.bool),
                    weights,
                )
        if self.do_classifier_free_guidance:
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=prompt_embeds.dtype)
                negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.to(
                    device=device, dtype=prompt_embeds.dtype
                )
            else:
                negatives = self.encode_negative_prompt(
                    negative_prompt, negative_prompt_2, batch_size, device, clip_skip
                )
                if negatives is None:
                    negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                    negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
                else:
                    negative_prompt_embeds, negative_pooled_prompt_embeds = negatives
        return PhotoMakerEmbeddings(
            prompt_embeds,
            pooled_prompt_embeds,
            text_embeds,
            text_pooled,
            negative_prompt_embeds,
            negative_pooled_prompt_embeds,
        )

    def style_image_embeds(
        self, ip_adapter_image: Any, ip_adapter_image_embeds: Any, device: torch.device, num_images: int
    ) -> list[torch.Tensor] | None:
        """The IP-Adapter's image embeddings for `num_images` outputs (None without a style image); they ride
        `added_cond_kwargs["image_embeds"]` on every step of both PhotoMaker phases."""
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return None
        return self.prepare_ip_adapter_image_embeds(
            ip_adapter_image, ip_adapter_image_embeds, device, num_images, self.do_classifier_free_guidance
        )

    def photomaker_phases(
        self, embeddings: PhotoMakerEmbeddings, num_images_per_prompt: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[_Conditioning, _Conditioning]:
        """`(text_only, with_id)`: what the UNet gets while `i <= start_merge_step`, and after; each repeated per
        image and with the negatives in front when CFG is on."""

        def conditioning(embeds: torch.Tensor, pooled: torch.Tensor) -> _Conditioning:
            embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
            pooled = pooled.repeat_interleave(num_images_per_prompt, dim=0)
            if self.do_classifier_free_guidance:
                embeds = torch.cat([embeddings.negative_embeds.repeat_interleave(num_images_per_prompt, 0), embeds])
                pooled = torch.cat([embeddings.negative_pooled.repeat_interleave(num_images_per_prompt, 0), pooled])
            return _Conditioning(embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype))

        return (
            conditioning(embeddings.text_only_embeds, embeddings.text_only_pooled),
            conditioning(embeddings.prompt_embeds, embeddings.pooled_prompt_embeds),
        )

    def _step_callback(
        self,
        callback_on_step_end: Callable[..., dict] | None,
        tensor_inputs: list[str],
        i: int,
        t: torch.Tensor,
        latents: torch.Tensor,
        phase: _Conditioning,
        add_time_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusers' `callback_on_step_end`: the callback sees the current phase's tensors and may replace them
        (a replaced prompt embedding stays in that phase). Returns `(latents, add_time_ids)`."""
        if callback_on_step_end is None:
            return latents, add_time_ids
        tensors = {
            "latents": latents,
            "prompt_embeds": phase.prompt_embeds,
            "add_text_embeds": phase.add_text_embeds,
            "add_time_ids": add_time_ids,
        }
        outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in tensor_inputs}) or {}
        phase.prompt_embeds = outputs.pop("prompt_embeds", phase.prompt_embeds)
        phase.add_text_embeds = outputs.pop("add_text_embeds", phase.add_text_embeds)
        return outputs.pop("latents", latents), outputs.pop("add_time_ids", add_time_ids)

    def _postprocess(self, latents: torch.Tensor, output_type: str) -> Any:
        """Decode (unless latents are asked for), watermark, convert: SDXL's last step."""
        if output_type == "latent":
            return latents
        image = self._decode_latents(latents)
        watermark = getattr(self, "watermark", None)  # diffusers' T2I-Adapter pipeline has none
        if watermark is not None:
            image = watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)

    @staticmethod
    def check_strength(strength: float, num_inference_steps: int | None) -> None:
        """img2img and inpaint: `strength` in (0, 1], and at least one denoising step left after it."""
        if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise InvalidRequestError(
                f"strength must be in (0, 1] (how much of the start image is repainted; 1 = all), got {strength!r}."
            )
        if num_inference_steps is not None and int(num_inference_steps * strength) < 1:
            raise InvalidRequestError(
                f"strength {strength} with num_inference_steps {num_inference_steps} leaves no denoising step "
                f"(int({num_inference_steps} * {strength}) = 0): raise one of them."
            )
