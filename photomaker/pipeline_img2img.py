"""PhotoMaker img2img on SDXL: the person of the ID photos, in a picture that starts from a given image.

The start image is encoded and noised to the level `strength` asks for; the remaining steps denoise it with the
text-only prompt, then the ID-fused prompt after `start_merge_step`, as the text-to-image pipeline does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg, retrieve_timesteps

from .errors import InvalidRequestError
from .pipeline_mixin import IDEncoding, PhotoMakerMixin, PromptInput


class PhotoMakerStableDiffusionXLImg2ImgPipeline(PhotoMakerMixin, StableDiffusionXLImg2ImgPipeline):
    """SDXL img2img + PhotoMaker.

    Example:
        >>> pipe = PhotoMakerStableDiffusionXLImg2ImgPipeline.from_pretrained(
        ...     "SG161222/RealVisXL_V4.0", dtype=torch.float16).to("cuda")
        >>> pipe.load_photomaker_adapter("TencentARC/PhotoMaker", weight_name="photomaker-v1.bin")
        >>> image = pipe("a photo of a man img in a garden", image=start_photo, strength=0.6,
        ...              input_id_images=photos, num_inference_steps=50, start_merge_step=5).images[0]
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    @torch.no_grad()
    def __call__(
        self,
        prompt: PromptInput = None,
        prompt_2: PromptInput = None,
        image: Any = None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
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
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
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
        """Repaint `image` (by `strength`) as the person of `input_id_images`, described by `prompt`.

        Takes the arguments of `StableDiffusionXLImg2ImgPipeline.__call__` and PhotoMaker's (see
        `PhotoMakerStableDiffusionXLPipeline.__call__`). With `strength < 1` only the last
        `int(num_inference_steps * strength)` steps run; `start_merge_step` counts those steps: steps
        `0..start_merge_step` of the ones that run use the text-only prompt, later ones the ID-fused prompt.
        """
        # 1. Check inputs (image and strength, SDXL img2img, PhotoMaker)
        if image is None:
            raise InvalidRequestError("image (the start image) is required for img2img: pass the photo to repaint.")
        self.check_strength(
            strength, num_inference_steps if timesteps is None and sigmas is None and denoising_start is None else None
        )
        self.check_inputs(
            prompt=prompt,
            prompt_2=prompt_2,
            strength=strength,
            num_inference_steps=num_inference_steps,
            callback_steps=None,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
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
        self._denoising_start = denoising_start
        self._interrupt = False

        # 2. Call parameters
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device

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

        # 4. Start image, timesteps from strength (or denoising_start), noised start latents
        image = self.image_processor.preprocess(image)
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        use_denoising_start = isinstance(denoising_start, float) and 0 < denoising_start < 1
        timesteps, num_inference_steps = self.get_timesteps(
            num_inference_steps, strength, device, denoising_start=denoising_start if use_denoising_start else None
        )
        latent_timestep = timesteps[:1].repeat(batch_size * num_images_per_prompt)
        latent_dtype = embeddings.prompt_embeds.dtype
        if latents is None:
            latents = self.prepare_latents(
                image,
                latent_timestep,
                batch_size,
                num_images_per_prompt,
                latent_dtype,
                device,
                generator,
                add_noise=denoising_start is None,
            )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Micro-conditioning (with the aesthetic score where the model wants it) and the two phases
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        add_time_ids, add_neg_time_ids = self._get_add_time_ids(
            original_size,
            crops_coords_top_left,
            target_size,
            aesthetic_score,
            negative_aesthetic_score,
            negative_original_size or original_size,
            negative_crops_coords_top_left,
            negative_target_size or target_size,
            dtype=latent_dtype,
            text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
        )
        add_time_ids = add_time_ids.repeat(batch_size * num_images_per_prompt, 1)
        if self.do_classifier_free_guidance:
            add_neg_time_ids = add_neg_time_ids.repeat(batch_size * num_images_per_prompt, 1)
            add_time_ids = torch.cat([add_neg_time_ids, add_time_ids])
        add_time_ids = add_time_ids.to(device)
        text_only, with_id = self.photomaker_phases(embeddings, num_images_per_prompt, device, latent_dtype)
        image_embeds = self.style_image_embeds(
            ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt
        )

        # 6. Denoising loop over the steps that run
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        if denoising_end is not None and 0 < denoising_end < 1:
            if use_denoising_start and denoising_start >= denoising_end:
                raise InvalidRequestError(
                    f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})."
                )
            cutoff = int(round(self.scheduler.config.num_train_timesteps * (1 - denoising_end)))
            num_inference_steps = int((timesteps >= cutoff).sum())
            timesteps = timesteps[:num_inference_steps]
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)
        self._num_timesteps = len(timesteps)
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
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=phase.prompt_embeds,
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
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                latents, add_time_ids = self._step_callback(
                    callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, phase, add_time_ids
                )
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 7. Decode
        image = self._postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)
