"""The diffusion loss of PhotoMaker training, optionally restricted to the person mask.

The paper computes the loss inside the person mask half of the time (as Break-A-Scene does): the mask
multiplies prediction and target, so the background does not pull the model towards the training photo's
scenery. Normalisation: the masked squared error is divided by the number of masked latent elements
(channels x masked cells), not by the full latent size, so a sample's loss has the same scale whether its
person covers 10 % or 90 % of the image; an all-zero mask falls back to the whole image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import TrainingConfigError

__all__ = ["check_prediction_type", "diffusion_loss", "diffusion_target", "latent_mask"]


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Pixel mask [B, 1, H, W] in [0, 1] -> binary latent mask [B, 1, h, w].

    A latent cell is inside when any of its pixels is (max pooling), so a small face never vanishes.
    """
    return (F.adaptive_max_pool2d(mask.float(), latent_size) > 0.5).float()


def check_prediction_type(scheduler) -> str:
    """The base model's prediction type, if training supports it; `TrainingConfigError` before any step if not."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise TrainingConfigError(
            f"Training supports the scheduler prediction types 'epsilon' and 'v_prediction'; the base model's "
            f"scheduler uses {prediction_type!r}. Use an SDXL base model with one of those."
        )
    return prediction_type


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (``epsilon``) or the velocity (``v_prediction``)."""
    if check_prediction_type(scheduler) == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss [B]: mean squared error, over the whole latent or over the masked elements only.

    ``mask`` is [B, 1, h, w] with 1 inside the person (latent resolution, see `latent_mask`); rows whose mask
    is all zero use the whole latent. Computed in fp32 whatever the model's dtype.
    """
    prediction, target = prediction.float(), target.float()
    full = (prediction - target).pow(2).flatten(1).mean(dim=1)
    if mask is None:
        return full
    mask = mask.float().expand_as(prediction)
    masked_error = (prediction * mask - target * mask).pow(2).flatten(1).sum(dim=1)
    masked_count = mask.flatten(1).sum(dim=1)
    masked = masked_error / masked_count.clamp(min=1.0)
    return torch.where(masked_count > 0, masked, full)
