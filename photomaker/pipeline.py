"""PhotoMaker on Stable Diffusion XL: the text-to-image diffusers pipeline.

`PhotoMakerStableDiffusionXLPipeline` is SDXL's pipeline plus `PhotoMakerMixin` (see `pipeline_mixin`):

* `load_photomaker_adapter` loads an official PhotoMaker checkpoint: the ID encoder (v1 or v2) and the LoRA
  that goes into the UNet;
* `encode_id_images` turns 1-N photos of a person into ID tokens, once, reusable across calls;
* `__call__` replaces the class word of the prompt ("man" in "a man img") by those ID tokens fused with it,
  and switches from the text-only prompt to the ID-fused prompt after `start_merge_step` (delayed subject
  conditioning).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    rescale_noise_cfg,
    retrieve_timesteps,
)

from .pipeline_mixin import (  # noqa: F401  (IDEncoding and _return_freed_memory are imported from here)
    IDEncoding,
    PhotoMakerMixin,
    PromptInput,
    _return_freed_memory,
)


class PhotoMakerStableDiffusionXLPipeline(PhotoMakerMixin, StableDiffusionXLPipeline):
    """SDXL with PhotoMaker's stacked ID embedding. Load an SDXL base, then `load_photomaker_adapter`.

    Example:
        >>> pipe = PhotoMakerStableDiffusionXLPipeline.from_pretrained(
        ...     "SG161222/RealVisXL_V4.0", dtype=torch.float16).to("cuda")
        >>> pipe.load_photomaker_adapter("TencentARC/PhotoMaker", weight_name="photomaker-v1.bin")
        >>> image = pipe("a photo of a man img", input_id_images=["me1.jpg", "me2.jpg"],
        ...              start_merge_step=10).images[0]
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    @torch.no_grad()
    def __call__(
        self,
        prompt: PromptInput = None,
        prompt_2: PromptInput = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: PromptInput = None,
        negative_prompt_2: PromptInput = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature; never mutated)
        # PhotoMaker
        input_id_images: Sequence[Any] | IDEncoding | None = None,
        start_merge_step: int = 0,
        class_tokens_mask: torch.Tensor | None = None,
        id_embeds: torch.Tensor | None = None,
        id_weights: Sequence[float] | torch.Tensor | None = None,
        prompt_embeds_text_only: torch.Tensor | None = None,
        pooled_prompt_embeds_text_only: torch.Tensor | None = None,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        """Generate images of the person in `input_id_images` as described by `prompt`.

        Takes every argument of `StableDiffusionXLPipeline.__call__` (IP-Adapter inputs too, after
        `load_ip_adapter`) plus:

        Args:
            input_id_images: 1-N photos of the person (PIL, paths, arrays, tensors) or an `IDEncoding` from
                `encode_id_images`, which skips the ID encoder.
            start_merge_step: denoising steps `0..start_merge_step` use the text-only prompt (layout and
                style settle first); later steps use the ID-fused prompt.
            class_tokens_mask: with `prompt_embeds` only: which rows hold the class-word copies to fuse.
            id_embeds: PhotoMaker v2: [N, 512] face embeddings aligned with the photos.
            id_weights: one weight per photo for identity mixing: each class-copy row of photo i becomes
                `c + w_i * (fuse(c, e) - c)`; 1 (the default) is the reference, 0 leaves the plain class word.
            prompt_embeds_text_only, pooled_prompt_embeds_text_only: precomputed text-only conditioning.
        """
        # 0. Default size, as SDXL
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)

        # 1. Check inputs
        self.check_inputs(
            prompt=prompt,
            prompt_2=prompt_2,
            height=height,
            width=width,
            callback_steps=None,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self.check_photomaker_inputs(
            input_id_images=input_id_images,
            id_embeds=id_embeds,
            id_weights=id_weights,
            start_merge_step=start_merge_step,
            prompt=prompt,
            prompt_embeds=prompt_embeds,
            class_tokens_mask=class_tokens_mask,
            prompt_embeds_text_only=prompt_embeds_text_only,
            pooled_prompt_embeds_text_only=pooled_prompt_embeds_text_only,
            num_inference_steps=num_inference_steps if timesteps is None and sigmas is None else None,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False

        # 2. Call parameters
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device

        # 3-4. ID tokens (reused or encoded once), then the prompt ID-fused and text-only; negatives once
        embeddings = self.encode_photomaker_inputs(
            prompt=prompt,
            prompt_2=prompt_2,
            input_id_images=input_id_images,
            id_embeds=id_embeds,
            id_weights=id_weights,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            batch_size=batch_size,
            device=device,
            clip_skip=clip_skip,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            class_tokens_mask=class_tokens_mask,
            prompt_embeds_text_only=prompt_embeds_text_only,
            pooled_prompt_embeds_text_only=pooled_prompt_embeds_text_only,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )
        image_embeds = self.style_image_embeds(
            ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt
        )

        # 5. Timesteps
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )

        # 6. Latents
        latent_dtype = embeddings.prompt_embeds.dtype
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.unet.config.in_channels,
            height,
            width,
            latent_dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Micro-conditioning and the two conditionings (text-only first, ID-fused after the merge step)
        add_time_ids = self._get_add_time_ids(
            original_size,
            crops_coords_top_left,
            target_size,
            dtype=latent_dtype,
            text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
        )
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                dtype=latent_dtype,
                text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
            )

        text_only, with_id = self.photomaker_phases(embeddings, num_images_per_prompt, device, latent_dtype)
        time_ids = (
            torch.cat([negative_add_time_ids, add_time_ids]) if self.do_classifier_free_guidance else add_time_ids
        )
        add_time_ids = time_ids.to(device).repeat(batch_size * num_images_per_prompt, 1)

        # 8. Denoising loop
        if self.denoising_end is not None and 0 < self.denoising_end < 1:
            cutoff = int(round(self.scheduler.config.num_train_timesteps * (1 - self.denoising_end)))
            num_inference_steps = int((timesteps >= cutoff).sum())
            timesteps = timesteps[:num_inference_steps]
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                phase = text_only if i <= start_merge_step else with_id
                prompt_embeds, add_text_embeds = phase.prompt_embeds, phase.add_text_embeds

                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                added_cond_kwargs = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
                if image_embeds is not None:
                    added_cond_kwargs["image_embeds"] = image_embeds
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                    if self.guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, self.guidance_rescale)
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                latents = latents.to(latents_dtype)

                latents, add_time_ids = self._step_callback(
                    callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, phase, add_time_ids
                )
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 9. Decode
        image = self._postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)
