"""PhotoMaker with ControlNet on SDXL: the person of the ID photos, in the pose, edges or depth of a control image.

As the reference's ControlNet pipeline: the ControlNet always reads the text-only prompt (the ID tokens would
pull it towards the face instead of the layout), with the UNet's pooled embedding and time ids of the current
phase; the UNet switches from text-only to ID-fused after `start_merge_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

from .errors import InvalidRequestError
from .pipeline_mixin import IDEncoding, PhotoMakerMixin, PromptInput


def _per_net(value: float | list[float], num_nets: int, name: str) -> list[float]:
    """One value per ControlNet: a single value is shared; a list must have one entry per net."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_nets
    if len(values) != num_nets:
        raise InvalidRequestError(f"{name} has {len(values)} values but there are {num_nets} ControlNets.")
    return values


class PhotoMakerStableDiffusionXLControlNetPipeline(PhotoMakerMixin, StableDiffusionXLControlNetPipeline):
    """SDXL + ControlNet (one, or a `MultiControlNetModel`) + PhotoMaker.

    Example:
        >>> controlnet = ControlNetModel.from_pretrained("thibaud/controlnet-openpose-sdxl-1.0", dtype=torch.float16)
        >>> pipe = PhotoMakerStableDiffusionXLControlNetPipeline.from_pretrained(
        ...     "SG161222/RealVisXL_V4.0", controlnet=controlnet, dtype=torch.float16).to("cuda")
        >>> pipe.load_photomaker_adapter("TencentARC/PhotoMaker-V2", weight_name="photomaker-v2.bin")
        >>> image = pipe("a photo of a man img", image=pose_image, input_id_images=photos, id_embeds=embeds,
        ...              controlnet_conditioning_scale=1.0, start_merge_step=10).images[0]
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    def check_control_inputs(
        self,
        *,
        image: Any,
        controlnet_conditioning_scale: float | list[float],
        control_guidance_start: float | list[float],
        control_guidance_end: float | list[float],
    ) -> None:
        """Refuse a missing control image or a guidance window outside [0, 1] before any model runs."""
        num_nets = len(self.controlnet.nets) if isinstance(self.controlnet, MultiControlNetModel) else 1
        if image is None or (isinstance(image, (list, tuple)) and len(image) == 0):
            raise InvalidRequestError(
                "image (the control image) is required for the ControlNet pipeline: pass a pose, edge or depth "
                "map, or use PhotoMakerStableDiffusionXLPipeline for no control."
            )
        if num_nets > 1 and (not isinstance(image, (list, tuple)) or len(image) != num_nets):
            raise InvalidRequestError(f"image must be a list of {num_nets} control images, one per ControlNet.")
        _per_net(controlnet_conditioning_scale, num_nets, "controlnet_conditioning_scale")
        starts = _per_net(control_guidance_start, num_nets, "control_guidance_start")
        ends = _per_net(control_guidance_end, num_nets, "control_guidance_end")
        for start, end in zip(starts, ends, strict=True):
            if not 0.0 <= start < end <= 1.0:
                raise InvalidRequestError(
                    f"control_guidance_start ({start}) and control_guidance_end ({end}) must satisfy "
                    "0 <= start < end <= 1 (fractions of the denoising steps)."
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
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
        """Generate the person of `input_id_images` laid out as the control `image` says.

        Takes the arguments of `StableDiffusionXLControlNetPipeline.__call__` and PhotoMaker's (see
        `PhotoMakerStableDiffusionXLPipeline.__call__`): steps `0..start_merge_step` give the UNet the text-only
        prompt, later steps the ID-fused one; the ControlNet gets the text-only prompt at every step.
        """
        controlnet = self.controlnet
        num_nets = len(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else 1

        # 1. Check inputs (SDXL + ControlNet, PhotoMaker, control image and window)
        self.check_control_inputs(
            image=image,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end,
        )
        control_guidance_start = _per_net(control_guidance_start, num_nets, "control_guidance_start")
        control_guidance_end = _per_net(control_guidance_end, num_nets, "control_guidance_end")
        self.check_inputs(
            prompt=prompt,
            prompt_2=prompt_2,
            image=image,
            callback_steps=None,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end,
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
        self._denoising_end = denoising_end
        self._interrupt = False

        # 2. Call parameters
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        if num_nets > 1 and isinstance(controlnet_conditioning_scale, float):
            controlnet_conditioning_scale = [controlnet_conditioning_scale] * num_nets
        global_pool_conditions = (
            controlnet.config.global_pool_conditions
            if isinstance(controlnet, ControlNetModel)
            else controlnet.nets[0].config.global_pool_conditions
        )
        guess_mode = guess_mode or global_pool_conditions

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

        # 4. Control images
        control_images = [image] if num_nets == 1 else list(image)
        control_images = [
            self.prepare_image(
                image=control_image,
                width=width,
                height=height,
                batch_size=batch_size * num_images_per_prompt,
                num_images_per_prompt=num_images_per_prompt,
                device=device,
                dtype=controlnet.dtype,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                guess_mode=guess_mode,
            )
            for control_image in control_images
        ]
        height, width = control_images[0].shape[-2:]
        control_image = control_images[0] if num_nets == 1 else control_images

        # 5. Timesteps
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        self._num_timesteps = len(timesteps)

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
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Which ControlNets act at which step (diffusers' rule), micro-conditioning, the two phases
        controlnet_keep = []
        for i in range(len(timesteps)):
            keeps = [
                1.0 - float(i / len(timesteps) < s or (i + 1) / len(timesteps) > e)
                for s, e in zip(control_guidance_start, control_guidance_end, strict=True)
            ]
            controlnet_keep.append(keeps[0] if num_nets == 1 else keeps)
        original_size = original_size or tuple(control_images[0].shape[-2:])
        target_size = target_size or (height, width)
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
        if self.denoising_end is not None and 0 < self.denoising_end < 1:
            cutoff = int(round(self.scheduler.config.num_train_timesteps * (1 - self.denoising_end)))
            num_inference_steps = int((timesteps >= cutoff).sum())
            timesteps = timesteps[:num_inference_steps]
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                phase = text_only if i <= start_merge_step else with_id
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                added_cond_kwargs = {"text_embeds": phase.add_text_embeds, "time_ids": add_time_ids}

                # 8.1 ControlNet(s): text-only hidden states, the current phase's pooled embedding and time ids
                if guess_mode and self.do_classifier_free_guidance:
                    control_model_input = self.scheduler.scale_model_input(latents, t)
                    controlnet_prompt_embeds = text_only.prompt_embeds.chunk(2)[1]
                    controlnet_added_cond_kwargs = {
                        "text_embeds": phase.add_text_embeds.chunk(2)[1],
                        "time_ids": add_time_ids.chunk(2)[1],
                    }
                else:
                    control_model_input = latent_model_input
                    controlnet_prompt_embeds = text_only.prompt_embeds
                    controlnet_added_cond_kwargs = added_cond_kwargs
                if isinstance(controlnet_keep[i], list):
                    cond_scale = [c * s for c, s in zip(controlnet_conditioning_scale, controlnet_keep[i], strict=True)]
                else:
                    scale = controlnet_conditioning_scale
                    cond_scale = (scale[0] if isinstance(scale, list) else scale) * controlnet_keep[i]
                down_block_res_samples, mid_block_res_sample = self.controlnet(
                    control_model_input,
                    t,
                    encoder_hidden_states=controlnet_prompt_embeds,
                    controlnet_cond=control_image,
                    conditioning_scale=cond_scale,
                    guess_mode=guess_mode,
                    added_cond_kwargs=controlnet_added_cond_kwargs,
                    return_dict=False,
                )
                if guess_mode and self.do_classifier_free_guidance:
                    # Only the conditional half got residuals; the unconditional half gets zeros.
                    down_block_res_samples = [torch.cat([torch.zeros_like(d), d]) for d in down_block_res_samples]
                    mid_block_res_sample = torch.cat([torch.zeros_like(mid_block_res_sample), mid_block_res_sample])

                # 8.2 UNet: the phase's prompt (text-only, then ID-fused), plus the residuals and a style image
                if image_embeds is not None:
                    added_cond_kwargs["image_embeds"] = image_embeds
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=phase.prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    down_block_additional_residuals=down_block_res_samples,
                    mid_block_additional_residual=mid_block_res_sample,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
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
