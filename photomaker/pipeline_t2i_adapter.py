"""PhotoMaker with a T2I-Adapter on SDXL: the person of the ID photos, drawn in the layout of a sketch.

As the reference's T2I-Adapter pipeline: the adapter sees only the control image; its features times
`adapter_conditioning_scale` are added to the UNet's down blocks while `i < int(steps * adapter_conditioning_factor)`;
the UNet switches from the text-only prompt to the ID-fused one after `start_merge_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionXLAdapterPipeline
from diffusers.models.adapter import MultiAdapter
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg, retrieve_timesteps
from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_xl_adapter import _preprocess_adapter_image

from .errors import InvalidRequestError
from .pipeline_mixin import IDEncoding, PhotoMakerMixin, PromptInput


class PhotoMakerStableDiffusionXLAdapterPipeline(PhotoMakerMixin, StableDiffusionXLAdapterPipeline):
    """SDXL + T2I-Adapter (one, or a `MultiAdapter`) + PhotoMaker.

    Example:
        >>> adapter = T2IAdapter.from_pretrained("TencentARC/t2i-adapter-sketch-sdxl-1.0", dtype=torch.float16)
        >>> pipe = PhotoMakerStableDiffusionXLAdapterPipeline.from_pretrained(
        ...     "SG161222/RealVisXL_V4.0", adapter=adapter, dtype=torch.float16).to("cuda")
        >>> pipe.load_photomaker_adapter("TencentARC/PhotoMaker-V2", weight_name="photomaker-v2.bin")
        >>> image = pipe("a photo of a man img", image=sketch, input_id_images=photos, id_embeds=embeds,
        ...              adapter_conditioning_scale=0.7, adapter_conditioning_factor=0.8,
        ...              start_merge_step=10).images[0]
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    @property
    def interrupt(self) -> bool:
        """Stop the loop from a callback (`pipe._interrupt = True`), as the other SDXL pipelines allow; diffusers'
        adapter pipeline has no such flag."""
        return self._interrupt

    def check_adapter_inputs(
        self, *, image: Any, adapter_conditioning_scale: float | list[float], adapter_conditioning_factor: float
    ) -> None:
        """Refuse a missing sketch or a factor outside [0, 1] before any model runs."""
        if image is None or (isinstance(image, (list, tuple)) and len(image) == 0):
            raise InvalidRequestError(
                "image (the adapter's control image, e.g. a sketch) is required for the T2I-Adapter pipeline; "
                "use PhotoMakerStableDiffusionXLPipeline for no control."
            )
        if isinstance(self.adapter, MultiAdapter):
            num_adapters = len(self.adapter.adapters)
            if not isinstance(image, (list, tuple)) or len(image) != num_adapters:
                raise InvalidRequestError(f"image must be a list of {num_adapters} images, one per adapter.")
            scales = adapter_conditioning_scale
            if isinstance(scales, (list, tuple)) and len(scales) != num_adapters:
                raise InvalidRequestError(
                    f"adapter_conditioning_scale has {len(scales)} values but there are {num_adapters} adapters."
                )
        elif isinstance(adapter_conditioning_scale, (list, tuple)):
            raise InvalidRequestError("adapter_conditioning_scale must be one number with a single adapter.")
        if not 0.0 <= adapter_conditioning_factor <= 1.0:
            raise InvalidRequestError(
                f"adapter_conditioning_factor must be between 0 and 1 (the fraction of steps the adapter acts on), "
                f"got {adapter_conditioning_factor}."
            )

    @torch.no_grad()
    def __call__(
        self,
        prompt: PromptInput = None,
        prompt_2: PromptInput = None,
        image: Any = None,
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
        adapter_conditioning_scale: float | list[float] = 1.0,
        adapter_conditioning_factor: float = 1.0,
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
        """Generate the person of `input_id_images` in the layout of the adapter's `image`.

        Takes the arguments of `StableDiffusionXLAdapterPipeline.__call__` and PhotoMaker's (see
        `PhotoMakerStableDiffusionXLPipeline.__call__`): steps `0..start_merge_step` give the UNet the text-only
        prompt, later steps the ID-fused one; the adapter's residuals apply while
        `i < int(num_inference_steps * adapter_conditioning_factor)`.
        """
        # 0. Size from the control image when not given, as diffusers
        height, width = self._default_height_width(height, width, image)
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)

        # 1. Check inputs (SDXL, PhotoMaker, adapter)
        self.check_adapter_inputs(
            image=image,
            adapter_conditioning_scale=adapter_conditioning_scale,
            adapter_conditioning_factor=adapter_conditioning_factor,
        )
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
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 2. Call parameters and the adapter's input
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        if isinstance(self.adapter, MultiAdapter):
            adapter_input = [
                _preprocess_adapter_image(one_image, height, width).to(device=device, dtype=self.adapter.dtype)
                for one_image in image
            ]
        else:
            adapter_input = _preprocess_adapter_image(image, height, width).to(device=device, dtype=self.adapter.dtype)

        # 3. PhotoMaker: ID tokens, the prompt ID-fused and text-only, negatives
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

        # 4. Timesteps
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        self._num_timesteps = len(timesteps)

        # 5. Latents
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
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 6. Adapter features, once: scaled, repeated per image, doubled for CFG
        if isinstance(self.adapter, MultiAdapter):
            adapter_state = self.adapter(adapter_input, adapter_conditioning_scale)
        else:
            adapter_state = [state * adapter_conditioning_scale for state in self.adapter(adapter_input)]
        if num_images_per_prompt > 1:
            adapter_state = [state.repeat(num_images_per_prompt, 1, 1, 1) for state in adapter_state]
        if self.do_classifier_free_guidance:
            adapter_state = [torch.cat([state] * 2, dim=0) for state in adapter_state]

        # 7. Micro-conditioning and the two phases
        projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            original_size,
            crops_coords_top_left,
            target_size,
            dtype=latent_dtype,
            text_encoder_projection_dim=projection_dim,
        )
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                dtype=latent_dtype,
                text_encoder_projection_dim=projection_dim,
            )
        if self.do_classifier_free_guidance:
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids])
        add_time_ids = add_time_ids.to(device).repeat(batch_size * num_images_per_prompt, 1)
        text_only, with_id = self.photomaker_phases(embeddings, num_images_per_prompt, device, latent_dtype)

        # 8. Denoising loop
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        if denoising_end is not None and 0 < denoising_end < 1:
            cutoff = int(round(self.scheduler.config.num_train_timesteps * (1 - denoising_end)))
            num_inference_steps = int((timesteps >= cutoff).sum())
            timesteps = timesteps[:num_inference_steps]
        adapter_steps = int(num_inference_steps * adapter_conditioning_factor)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                phase = text_only if i <= start_merge_step else with_id
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                added_cond_kwargs = {"text_embeds": phase.add_text_embeds, "time_ids": add_time_ids}
                if image_embeds is not None:
                    added_cond_kwargs["image_embeds"] = image_embeds
                # The UNet pops these lists: a fresh copy per step.
                residuals = [state.clone() for state in adapter_state] if i < adapter_steps else None
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=phase.prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=cross_attention_kwargs,
                    down_intrablock_additional_residuals=residuals,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                    if guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

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
