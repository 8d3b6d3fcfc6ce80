"""PhotoMaker inpainting on SDXL: "put this person into my photo".

The masked region of a target photo (white = repaint) is regenerated as the person of the ID photos; outside
the mask the photo's own latents are put back after every step (4-channel UNet), or the inpainting UNet
(9 channels) sees the mask and the masked photo, as diffusers' SDXL inpaint pipeline does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg, retrieve_timesteps
from PIL import Image

from .errors import InvalidRequestError
from .pipeline_mixin import IDEncoding, PhotoMakerMixin, PromptInput


def _size(image: Any) -> tuple[int, int] | None:
    """(width, height) of a PIL image, an HxW(xC) array or a (B)xCxHxW / HxW tensor; the first of a list."""
    if isinstance(image, (list, tuple)):
        return _size(image[0]) if image else None
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, np.ndarray):
        return (image.shape[1], image.shape[0]) if image.ndim in (2, 3) else (image.shape[2], image.shape[1])
    if isinstance(image, torch.Tensor):
        return (image.shape[-1], image.shape[-2])
    return None


def _is_empty(mask: Any) -> bool:
    """True when a mask has nothing to repaint (all black)."""
    masks = mask if isinstance(mask, (list, tuple)) else [mask]
    for one in masks:
        values = (
            np.asarray(one.convert("L"))
            if isinstance(one, Image.Image)
            else (one.detach().cpu().numpy() if isinstance(one, torch.Tensor) else np.asarray(one))
        )
        if values.max() > 0:
            return False
    return True


class PhotoMakerStableDiffusionXLInpaintPipeline(PhotoMakerMixin, StableDiffusionXLInpaintPipeline):
    """SDXL inpaint + PhotoMaker.

    Example:
        >>> pipe = PhotoMakerStableDiffusionXLInpaintPipeline.from_pretrained(
        ...     "SG161222/RealVisXL_V4.0", dtype=torch.float16).to("cuda")
        >>> pipe.load_photomaker_adapter("TencentARC/PhotoMaker", weight_name="photomaker-v1.bin")
        >>> image = pipe("a photo of a man img", image=target_photo, mask_image=face_mask, strength=0.9,
        ...              input_id_images=photos, start_merge_step=5).images[0]
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    def check_inpaint_inputs(
        self,
        *,
        image: Any,
        mask_image: Any,
        masked_image_latents: torch.Tensor | None,
        strength: float,
        num_inference_steps: int | None,
    ) -> None:
        """Refuse a missing photo or mask, a mask of another size than the photo, an empty mask, or a strength
        outside (0, 1], naming the argument, before any model runs."""
        if image is None:
            raise InvalidRequestError("image (the photo to put the person into) is required for inpainting.")
        if mask_image is None:
            raise InvalidRequestError(
                "mask_image is required for inpainting: white where the person goes, black where the photo stays."
            )
        image_size, mask_size = _size(image), _size(mask_image)
        if masked_image_latents is None and image_size and mask_size and image_size != mask_size:
            raise InvalidRequestError(
                f"mask_image is {mask_size[0]}x{mask_size[1]} but image is {image_size[0]}x{image_size[1]}: give a "
                "mask of the photo's size."
            )
        if _is_empty(mask_image):
            raise InvalidRequestError(
                "mask_image is all black, so nothing would be repainted: paint the region to replace in white."
            )
        self.check_strength(strength, num_inference_steps)

    @torch.no_grad()
    def __call__(
        self,
        prompt: PromptInput = None,
        prompt_2: PromptInput = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
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
        """Repaint the white part of `mask_image` in `image` as the person of `input_id_images`.

        Takes the arguments of `StableDiffusionXLInpaintPipeline.__call__` and PhotoMaker's (see
        `PhotoMakerStableDiffusionXLPipeline.__call__`). With `strength < 1` only the last
        `int(num_inference_steps * strength)` steps run; `start_merge_step` counts those steps: steps
        `0..start_merge_step` of the ones that run use the text-only prompt, later ones the ID-fused prompt.
        """
        # 0. Default size, as diffusers' inpaint
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        # 1. Check inputs (photo, mask, strength; SDXL inpaint; PhotoMaker)
        steps_for_check = num_inference_steps if timesteps is None and sigmas is None else None
        self.check_inpaint_inputs(
            image=image,
            mask_image=mask_image,
            masked_image_latents=masked_image_latents,
            strength=strength,
            num_inference_steps=steps_for_check if denoising_start is None else None,
        )
        self.check_inputs(
            prompt=prompt,
            prompt_2=prompt_2,
            image=image,
            mask_image=mask_image,
            height=height,
            width=width,
            strength=strength,
            callback_steps=None,
            output_type=output_type,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            padding_mask_crop=padding_mask_crop,
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
            num_inference_steps=steps_for_check,
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
        image_embeds = self.style_image_embeds(
            ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt
        )

        # 4. Timesteps from strength (or denoising_start)
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        use_denoising_start = isinstance(denoising_start, float) and 0 < denoising_start < 1
        timesteps, num_inference_steps = self.get_timesteps(
            num_inference_steps, strength, device, denoising_start=denoising_start if use_denoising_start else None
        )
        if num_inference_steps < 1:
            raise InvalidRequestError(
                f"strength {strength} leaves no denoising step: raise strength or num_inference_steps."
            )
        latent_timestep = timesteps[:1].repeat(batch_size * num_images_per_prompt)

        # 5. Photo and mask, noised photo latents, mask latents (and masked photo latents for a 9-channel UNet)
        if padding_mask_crop is not None:
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        else:
            crops_coords, resize_mode = None, "default"
        original_image = image
        init_image = self.image_processor.preprocess(
            image, height=height, width=width, crops_coords=crops_coords, resize_mode=resize_mode
        ).to(dtype=torch.float32)
        mask = self.mask_processor.preprocess(
            mask_image, height=height, width=width, resize_mode=resize_mode, crops_coords=crops_coords
        )
        if masked_image_latents is not None:
            masked_image = masked_image_latents
        elif init_image.shape[1] == 4:
            masked_image = None
        else:
            masked_image = init_image * (mask < 0.5)
        if isinstance(generator, list) and init_image.shape[0] < len(generator):
            # One photo, one generator per image: each image samples its own VAE latents with its own generator, so
            # that image k depends on generator k alone (diffusers would draw them all from generator 0, and image k
            # of a batch would differ from the same seed asked alone).
            copies = len(generator) // init_image.shape[0]
            init_image = init_image.repeat(copies, 1, 1, 1)
            masked_image = masked_image.repeat(copies, 1, 1, 1) if masked_image is not None else None
        num_channels_unet = self.unet.config.in_channels
        if num_channels_unet not in (4, 9):
            raise InvalidRequestError(
                f"The UNet has {num_channels_unet} input channels; inpainting needs a 4-channel SDXL UNet or a "
                "9-channel SDXL inpainting UNet."
            )
        blends_latents = num_channels_unet == 4
        latent_dtype = embeddings.prompt_embeds.dtype
        latents_outputs = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.vae.config.latent_channels,
            height,
            width,
            latent_dtype,
            device,
            generator,
            latents,
            image=init_image,
            timestep=latent_timestep,
            is_strength_max=strength == 1.0,
            add_noise=denoising_start is None,
            return_noise=True,
            return_image_latents=blends_latents,
        )
        latents, noise = latents_outputs[:2]
        image_latents = latents_outputs[2] if blends_latents else None
        mask, masked_image_latents = self.prepare_mask_latents(
            mask,
            masked_image,
            batch_size * num_images_per_prompt,
            height,
            width,
            latent_dtype,
            device,
            generator,
            self.do_classifier_free_guidance,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6. Micro-conditioning (with the aesthetic score where the model wants it) and the two phases
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

        # 7. Denoising loop over the steps that run; outside the mask the photo's latents are put back
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
        init_mask = mask.chunk(2)[0] if self.do_classifier_free_guidance else mask
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                phase = text_only if i <= start_merge_step else with_id
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                if not blends_latents:
                    latent_model_input = torch.cat([latent_model_input, mask, masked_image_latents], dim=1)
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
                if blends_latents:
                    # The photo's latents, noised to the next step's level (clean after the last step).
                    init_latents_proper = image_latents
                    if i < len(timesteps) - 1:
                        init_latents_proper = self.scheduler.add_noise(
                            image_latents, noise, torch.tensor([timesteps[i + 1]])
                        )
                    latents = (1 - init_mask) * init_latents_proper + init_mask * latents

                latents, add_time_ids = self._step_callback(
                    callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, phase, add_time_ids
                )
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 8. Decode; with padding_mask_crop the repainted crop is pasted back into the full photo
        image = self._postprocess(latents, output_type)
        if padding_mask_crop is not None and output_type != "latent":
            image = [self.image_processor.apply_overlay(mask_image, original_image, i, crops_coords) for i in image]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)
