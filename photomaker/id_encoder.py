"""PhotoMaker ID encoders (v1 and v2) and the fuse module that merges ID tokens into class-word embeddings.

Parameter names follow the official checkpoints exactly (``vision_model.*``, ``visual_projection``,
``visual_projection_2``, ``fuse_module.*`` and, for v2, ``qformer_perceiver.*``), so an official
``id_encoder`` state dict loads strictly. See docs/ARCHITECTURE.md for how the pipeline uses these.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings, CLIPVisionModel

from .errors import CheckpointError, IDImageError

logger = logging.getLogger(__name__)

__all__ = [
    "FuseModule",
    "PhotoMakerIDEncoder",
    "PhotoMakerIDEncoderConfig",
    "PhotoMakerIDEncoderV2",
    "create_id_encoder",
]

# Prefixes of the parameter groups in the official checkpoints.
VISION_PREFIX = "vision_model."
PERCEIVER_PREFIX = "qformer_perceiver."
RESAMPLER_PREFIX = PERCEIVER_PREFIX + "perceiver_resampler."

# Conventions used when a size cannot be read off a tensor shape (documented in from_state_dict).
CLIP_HEAD_DIM = 64
RESAMPLER_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class PhotoMakerIDEncoderConfig:
    """Sizes of an ID encoder; the defaults are those of the official v1/v2 checkpoints.

    The v2 fields (``id_embed_dim`` ... ``token_proj_ratio``) are ignored by the v1 encoder.
    """

    vision_hidden_size: int = 1024
    vision_num_layers: int = 24
    vision_num_heads: int = 16
    vision_intermediate_size: int = 4096
    patch_size: int = 14
    image_size: int = 224
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim_1: int = 768
    projection_dim_2: int = 1280
    # v2: face embedding -> query tokens -> perceiver resampler over the CLIP patch tokens.
    id_embed_dim: int = 512
    num_tokens: int = 2
    resampler_depth: int = 4
    resampler_heads: int = 16
    resampler_dim_head: int = 128
    resampler_ff_mult: int = 4
    token_proj_ratio: int = 4

    @property
    def embed_dim(self) -> int:
        """Width of an ID token: the two projections concatenated, [CLIP-L | OpenCLIP-bigG] for SDXL."""
        return self.projection_dim_1 + self.projection_dim_2

    def vision_config(self) -> CLIPVisionConfig:
        """The transformers config of the CLIP vision tower."""
        return CLIPVisionConfig(
            hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size,
            num_hidden_layers=self.vision_num_layers,
            num_attention_heads=self.vision_num_heads,
            patch_size=self.patch_size,
            image_size=self.image_size,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            projection_dim=self.projection_dim_1,
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> PhotoMakerIDEncoderConfig:
        """Infer every size from the tensor shapes of an ``id_encoder`` state dict.

        Read off shapes: vision width/patch (patch embedding), image size (position count = (image/patch)^2 + 1),
        depth (largest layer index + 1), MLP width (fc1), projection dims, v2 face-embedding width and token
        proj ratio (``token_proj.0``), token count (``token_proj.2`` out / embed dim), resampler depth and
        feed-forward multiplier. Not stored in any shape, so by convention: CLIP heads = hidden // 64 (min 1);
        resampler heads = embed dim // 128 (min 1) with dim_head = to_q width // heads; activation quick_gelu
        and eps 1e-5 as in CLIP ViT-L/14. Raises CheckpointError naming a tensor that is needed but absent.
        """

        def shape(name: str) -> torch.Size:
            if name not in state_dict:
                raise CheckpointError(
                    f"The ID encoder state dict has no '{name}', so its sizes cannot be inferred; "
                    "it is not a PhotoMaker id_encoder (pass the 'id_encoder' part of a PhotoMaker checkpoint)."
                )
            return state_dict[name].shape

        patch = shape(VISION_PREFIX + "embeddings.patch_embedding.weight")
        hidden, patch_size = int(patch[0]), int(patch[-1])
        num_positions = int(shape(VISION_PREFIX + "embeddings.position_embedding.weight")[0])
        grid = round((num_positions - 1) ** 0.5)
        if grid * grid != num_positions - 1:
            raise CheckpointError(
                f"The vision position embedding has {num_positions} rows, which is not a square grid plus one "
                "class token; the checkpoint is damaged or not a PhotoMaker id_encoder."
            )
        values: dict[str, object] = {
            "vision_hidden_size": hidden,
            "patch_size": patch_size,
            "image_size": grid * patch_size,
            "vision_num_layers": _count_indexed(state_dict, VISION_PREFIX + "encoder.layers."),
            "vision_num_heads": max(1, hidden // CLIP_HEAD_DIM),
            "vision_intermediate_size": int(shape(VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0]),
            "projection_dim_1": int(shape("visual_projection.weight")[0]),
            "projection_dim_2": int(shape("visual_projection_2.weight")[0]),
        }
        embed_dim = int(values["projection_dim_1"]) + int(values["projection_dim_2"])
        if any(key.startswith(PERCEIVER_PREFIX) for key in state_dict):
            proj0 = shape(PERCEIVER_PREFIX + "token_proj.0.weight")
            id_embed_dim, proj_hidden = int(proj0[1]), int(proj0[0])
            proj_out = int(shape(PERCEIVER_PREFIX + "token_proj.2.weight")[0])
            if proj_hidden % id_embed_dim or proj_out % embed_dim:
                raise CheckpointError(
                    f"qformer_perceiver.token_proj has shapes {tuple(proj0)} -> {proj_out}, which do not fit "
                    f"face embeddings of {id_embed_dim} values and ID tokens of {embed_dim} values."
                )
            heads = max(1, embed_dim // RESAMPLER_HEAD_DIM)
            inner = int(shape(RESAMPLER_PREFIX + "layers.0.0.to_q.weight")[0])
            ff_inner = int(shape(RESAMPLER_PREFIX + "layers.0.1.1.weight")[0])
            values.update(
                id_embed_dim=id_embed_dim,
                token_proj_ratio=proj_hidden // id_embed_dim,
                num_tokens=proj_out // embed_dim,
                resampler_depth=_count_indexed(state_dict, RESAMPLER_PREFIX + "layers."),
                resampler_heads=heads,
                resampler_dim_head=max(1, inner // heads),
                resampler_ff_mult=max(1, ff_inner // embed_dim),
            )
        return cls(**values)  # type: ignore[arg-type]


def _count_indexed(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of ``prefix{i}.`` blocks (largest index + 1); 0 when there are none."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for key in state_dict if (m := pattern.match(key))]
    return max(indices) + 1 if indices else 0


def _placement(parameter: torch.Tensor, fallback: torch.device) -> tuple[torch.device, torch.dtype]:
    """Where inputs must go to meet ``parameter``.

    Under sequential CPU offload the weights sit on ``meta`` until a hook moves them in; inputs then stay
    on the caller's device (``fallback``), where the hook brings the weights.
    """
    device = fallback if parameter.device.type == "meta" else parameter.device
    return device, parameter.dtype


class _MLP(nn.Module):
    """``fc2(GELU(fc1(LayerNorm(x))))`` with exact (erf) GELU; residuals are added by the caller."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.layernorm(x))))


class FuseModule(nn.Module):
    """Merges a class-word embedding ``c`` with an ID token ``e`` (the reference implementation's fuse module).

    ``h = mlp1([c, e]) + c; h = mlp2(h) + h; out = LayerNorm(h)``: the residual on ``c`` keeps the class
    word's meaning and the MLPs add the identity.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.mlp1 = _MLP(2 * embed_dim, embed_dim, embed_dim)
        self.mlp2 = _MLP(embed_dim, embed_dim, embed_dim)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, class_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        h = self.mlp1(torch.cat([class_embeds, id_embeds], dim=-1)) + class_embeds
        h = self.mlp2(h) + h
        return self.layer_norm(h)


class PhotoMakerIDEncoder(nn.Module):
    """ID encoder v1: one ID token per image from the pooled CLIP ViT output, plus the fuse module."""

    version: ClassVar[int] = 1

    def __init__(self, config: PhotoMakerIDEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or PhotoMakerIDEncoderConfig()
        self.vision_model = CLIPVisionModel(self.config.vision_config())
        hidden = self.config.vision_hidden_size
        self.visual_projection = nn.Linear(hidden, self.config.projection_dim_1, bias=False)
        self.visual_projection_2 = nn.Linear(hidden, self.config.projection_dim_2, bias=False)
        self.fuse_module = FuseModule(self.config.embed_dim)

    @property
    def tokens_per_image(self) -> int:
        """ID tokens produced per photo; the prompt's class word is repeated this many times per photo."""
        return 1

    @property
    def embed_dim(self) -> int:
        """Width of an ID token, equal to the text encoders' concatenated width (2048 for SDXL)."""
        return self.config.embed_dim

    def reset_position_ids(self) -> None:
        """Recreate the vision tower's non-persistent ``position_ids`` (needed after building on ``meta``)."""
        for module in self.modules():
            if isinstance(module, CLIPVisionEmbeddings):
                device = module.position_embedding.weight.device
                module.position_ids = torch.arange(module.num_positions, device=device).expand((1, -1))

    def _vision_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise IDImageError(
                f"ID images must be a tensor [N, 3, H, W]; got shape {tuple(pixel_values.shape)}. "
                "Preprocess the photos with the CLIP image processor first."
            )
        weight = self.vision_model.embeddings.patch_embedding.weight
        return pixel_values.to(*_placement(weight, pixel_values.device))

    def encode_images(self, pixel_values: torch.Tensor, face_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """ID tokens [N, 1, D]: pooled CLIP output projected to [proj_1 | proj_2]. ``face_embeds`` is unused."""
        pooled = self.vision_model(pixel_values=self._vision_inputs(pixel_values)).pooler_output
        tokens = torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)
        return tokens.unsqueeze(1)

    def fuse(
        self,
        prompt_embeds: torch.Tensor,
        id_tokens: torch.Tensor,
        class_tokens_mask: torch.Tensor,
        id_weights: torch.Tensor | Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Replace the masked class-word rows of every prompt by their fusion with the ID tokens.

        Each prompt row ``b`` must have exactly ``N*T`` True entries; its k-th masked position receives
        ``Fuse(c_k, e_k)`` where ``e`` is ``id_tokens`` flattened image-major (img0 tok0, img0 tok1, img1 tok0, ...).

        Identity weights blend per image: for the rows of image ``i``,
        ``out = c + w_i * (Fuse(c, e) - c)`` (computed with ``torch.lerp``, exact at both ends). ``w_i = 1``
        (or ``id_weights=None``) is the reference method, ``w_i = 0`` leaves the plain class-word embedding,
        values in between attenuate an identity, which is how several people's photos are mixed with
        weights. Unmasked rows are returned unchanged; inputs are not modified.
        """
        if prompt_embeds.ndim != 3 or id_tokens.ndim != 3:
            raise ValueError(
                f"fuse expects prompt_embeds [B, L, D] and id_tokens [N, T, D]; got shapes "
                f"{tuple(prompt_embeds.shape)} and {tuple(id_tokens.shape)}."
            )
        batch, length, dim = prompt_embeds.shape
        num_images, tokens, id_dim = id_tokens.shape
        if dim != self.embed_dim or id_dim != self.embed_dim:
            raise ValueError(
                f"Embedding width mismatch: the ID encoder works with {self.embed_dim} values, prompt_embeds have "
                f"{dim} and id_tokens {id_dim}. Use text encoders whose hidden sizes add up to {self.embed_dim}."
            )
        mask = class_tokens_mask.to(device=prompt_embeds.device, dtype=torch.bool)
        if mask.shape != (batch, length):
            raise ValueError(
                f"class_tokens_mask must have shape {(batch, length)} like prompt_embeds; got {tuple(mask.shape)}."
            )
        expected = num_images * tokens
        counts = mask.sum(dim=1).tolist()
        wrong = {row: count for row, count in enumerate(counts) if count != expected}
        if wrong:
            raise ValueError(
                f"Every prompt needs exactly {expected} class-token positions ({num_images} image(s) x {tokens} "
                f"token(s)); prompt rows {sorted(wrong)} have {sorted(set(wrong.values()))}. Build the mask with "
                "photomaker.prompt.expand_class_tokens using the same number of ID images."
            )

        fuse_device, fuse_dtype = _placement(self.fuse_module.layer_norm.weight, prompt_embeds.device)
        class_embeds = prompt_embeds[mask].reshape(batch, expected, dim).to(fuse_device, fuse_dtype)
        flat_ids = id_tokens.reshape(1, expected, dim).to(fuse_device, fuse_dtype).expand(batch, -1, -1)
        fused = self.fuse_module(class_embeds, flat_ids)
        if id_weights is not None:
            weights = torch.as_tensor(id_weights, dtype=fuse_dtype, device=fuse_device)
            if weights.shape != (num_images,):
                raise ValueError(
                    f"id_weights needs one weight per ID image ({num_images}); got shape {tuple(weights.shape)}."
                )
            if not torch.isfinite(weights).all():
                raise ValueError(f"id_weights must be finite numbers; got {weights.tolist()}.")
            per_token = weights.repeat_interleave(tokens).view(1, expected, 1)
            fused = torch.lerp(class_embeds, fused, per_token.expand_as(fused))
        out = prompt_embeds.clone()
        out[mask] = fused.reshape(batch * expected, dim).to(prompt_embeds.device, prompt_embeds.dtype)
        return out


class _PerceiverAttention(nn.Module):
    """Latents attend to [image features, latents]; q and k each scaled by dim_head^-0.25, softmax in fp32."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        q = self._split_heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)
        scale = self.dim_head**-0.25
        scores = (q * scale) @ (k * scale).transpose(-2, -1)
        attn = scores.float().softmax(dim=-1).to(scores.dtype)
        out = (attn @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, Linear(no bias), GELU, Linear(no bias): keys ``.0``, ``.1``, ``.3`` as in the checkpoint."""
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class _PerceiverResampler(nn.Module):
    """Refines the face-derived query tokens with the CLIP patch tokens (the reference's v2 resampler)."""

    def __init__(self, config: PhotoMakerIDEncoderConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.proj_in = nn.Linear(config.vision_hidden_size, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    _PerceiverAttention(dim, config.resampler_heads, config.resampler_dim_head),
                    _feed_forward(dim, config.resampler_ff_mult),
                ]
            )
            for _ in range(config.resampler_depth)
        )
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, latents: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(image_features)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class _QFormerPerceiver(nn.Module):
    """Face embedding -> ``num_tokens`` query tokens, refined by the resampler; output = x + resampler(x)."""

    def __init__(self, config: PhotoMakerIDEncoderConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.num_tokens = config.num_tokens
        hidden = config.id_embed_dim * config.token_proj_ratio
        self.token_proj = nn.Sequential(
            nn.Linear(config.id_embed_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, dim * config.num_tokens),
        )
        self.token_norm = nn.LayerNorm(dim)
        self.perceiver_resampler = _PerceiverResampler(config)

    def forward(self, face_embeds: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        x = self.token_proj(face_embeds).reshape(face_embeds.shape[0], self.num_tokens, -1)
        x = self.token_norm(x)
        return x + self.perceiver_resampler(x, image_features)


class PhotoMakerIDEncoderV2(PhotoMakerIDEncoder):
    """ID encoder v2: two ID tokens per image from a 512-d face embedding and the CLIP patch tokens.

    The v1 projections stay (the official checkpoint has them) but are not used by ``encode_images``.
    """

    version: ClassVar[int] = 2

    def __init__(self, config: PhotoMakerIDEncoderConfig | None = None) -> None:
        super().__init__(config)
        self.qformer_perceiver = _QFormerPerceiver(self.config)

    @property
    def tokens_per_image(self) -> int:
        """Query tokens per ID photo (2 in the official checkpoint)."""
        return self.config.num_tokens

    def encode_images(self, pixel_values: torch.Tensor, face_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """ID tokens [N, T, D] from the photos and their face embeddings [N, id_embed_dim] (same order).

        ``[1, N, id_embed_dim]`` (the reference pipeline's batched layout) is accepted too.
        """
        num_images = pixel_values.shape[0]
        expected = self.config.id_embed_dim
        if face_embeds is None:
            raise IDImageError(
                f"PhotoMaker v2 needs a face embedding for every ID photo: pass face_embeds / id_embeds as a "
                f"tensor [{num_images}, {expected}] (InsightFace buffalo_l ArcFace embeddings, one per photo)."
            )
        face_embeds = torch.as_tensor(face_embeds)
        face_embeds = face_embeds.reshape(-1, face_embeds.shape[-1]) if face_embeds.ndim == 3 else face_embeds
        if face_embeds.ndim != 2 or face_embeds.shape != (num_images, expected):
            raise IDImageError(
                f"PhotoMaker v2 needs one {expected}-value face embedding per ID photo: got face embeddings of "
                f"shape {tuple(face_embeds.shape)} for {num_images} photo(s). Pass a tensor [{num_images}, "
                f"{expected}] in the same order as the photos."
            )
        clip_tokens = self.vision_model(pixel_values=self._vision_inputs(pixel_values)).last_hidden_state
        device, dtype = _placement(self.qformer_perceiver.token_norm.weight, clip_tokens.device)
        return self.qformer_perceiver(face_embeds.to(device, dtype), clip_tokens.to(device, dtype))


def create_id_encoder(config: PhotoMakerIDEncoderConfig | None = None, version: int = 1) -> PhotoMakerIDEncoder:
    """A randomly initialised encoder of the given version (1 or 2); loading.build_id_encoder loads weights."""
    classes: dict[int, type[PhotoMakerIDEncoder]] = {
        1: PhotoMakerIDEncoder,
        2: PhotoMakerIDEncoderV2,
    }
    if version not in classes:
        raise ValueError(f"PhotoMaker version must be 1 or 2; got {version!r}.")
    return classes[version](config)
