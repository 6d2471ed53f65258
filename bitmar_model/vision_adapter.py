"""Vision adapter: cached DINOv2 features -> a few hidden-size vision tokens + a pooled vector.

The image encoder is frozen and run once by the pipeline (features are cached), so the
model sees only its CLS vector [B, F] and a pooled patch grid [B, P, F]. A learned
compression maps F (768 for dinov2-base) to the hidden size, and a small set of learned
queries attention-pools the 1 + P feature tokens into `num_vision_tokens` tokens plus one
pooled vector (a Perceiver-resampler-style bottleneck: the fusion cost no longer depends on
the patch grid). Text-only inputs use learned "no image" tokens instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bitmar_model.config import BitMarConfig
from bitmar_model.layers import FeedForward, MultiHeadAttention, RMSNorm, make_linear


@dataclass
class VisionFeatures:
    """Validated image features of a batch."""

    cls: torch.Tensor  # [B, F]
    patches: torch.Tensor  # [B, P, F] (P may be 0)
    has_image: torch.Tensor | None = None  # [B] bool; rows without an image use the "no image" tokens


VisionFeaturesInput = Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | VisionFeatures


def _shape(x: torch.Tensor) -> list[int]:
    return list(x.shape)


def as_vision_features(value: VisionFeaturesInput, *, config: BitMarConfig, batch_size: int) -> VisionFeatures:
    """Accept {"cls", "patches"[, "has_image"]}, a (cls, patches) tuple or VisionFeatures;
    check ranks, widths, batch size and finiteness. Errors name `vision_features`."""
    if isinstance(value, VisionFeatures):
        cls, patches, has_image = value.cls, value.patches, value.has_image
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - {"cls", "patches", "has_image"})
        if unknown or "cls" not in value:
            raise ValueError(
                f"vision_features: expected keys 'cls', optional 'patches' and 'has_image'; received {sorted(value)}"
            )
        cls, patches, has_image = value["cls"], value.get("patches"), value.get("has_image")
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) in (1, 2):
        cls, patches, has_image = value[0], value[1] if len(value) == 2 else None, None
    else:
        raise ValueError(
            "vision_features: expected a dict, a (cls, patches) tuple or "
            f"VisionFeatures; received {type(value).__name__}"
        )

    width, num_patches = config.vision_feature_dim, config.vision_num_patches
    if not isinstance(cls, torch.Tensor) or not cls.is_floating_point() or _shape(cls) != [batch_size, width]:
        got = _shape(cls) if isinstance(cls, torch.Tensor) else type(cls).__name__
        raise ValueError(
            f"vision_features['cls']: expected a float tensor of shape [{batch_size}, {width}] "
            f"(batch, vision_feature_dim); received {got}"
        )
    if patches is None:
        if num_patches:
            raise ValueError(
                f"vision_features['patches']: expected shape [{batch_size}, {num_patches}, {width}]; received None"
            )
        patches = cls.new_zeros(batch_size, 0, width)
    if (
        not isinstance(patches, torch.Tensor)
        or not patches.is_floating_point()
        or _shape(patches) != [batch_size, num_patches, width]
    ):
        got = _shape(patches) if isinstance(patches, torch.Tensor) else type(patches).__name__
        raise ValueError(
            f"vision_features['patches']: expected a float tensor of shape [{batch_size}, {num_patches}, {width}] "
            f"(batch, vision_num_patches, vision_feature_dim); received {got}"
        )
    for name, tensor in (("cls", cls), ("patches", patches)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"vision_features['{name}'] (shape {_shape(tensor)}) contains NaN or infinite values")
    if has_image is not None and (not isinstance(has_image, torch.Tensor) or _shape(has_image) != [batch_size]):
        got = _shape(has_image) if isinstance(has_image, torch.Tensor) else type(has_image).__name__
        raise ValueError(
            f"vision_features['has_image']: expected a bool tensor of shape [{batch_size}]; received {got}"
        )
    return VisionFeatures(cls=cls, patches=patches, has_image=None if has_image is None else has_image.bool())


@dataclass
class VisionAdapterOutput:
    tokens: torch.Tensor  # [B, num_vision_tokens, hidden]
    pooled: torch.Tensor  # [B, hidden], image-only summary (input of the contrastive image head)
    has_image: torch.Tensor  # [B] bool
    attention: torch.Tensor | None  # [B, H, 1 + num_vision_tokens, 1 + P] pooling weights, when requested


class VisionAdapter(nn.Module):
    def __init__(self, config: BitMarConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        # DINOv2 features have large, channel-dependent offsets; a full-precision LayerNorm
        # centres them before the (ternary) compression.
        self.input_norm = nn.LayerNorm(config.vision_feature_dim)
        self.compress = make_linear(config.vision_feature_dim, hidden, quantized=config.quantized)
        # Marks which input token is the CLS vector and where each patch sits in the grid.
        self.feature_positions = nn.Parameter(
            torch.randn(1 + config.vision_num_patches, hidden) * config.initializer_range
        )
        # Query 0 produces the pooled vector, the others the vision tokens. Initialised at
        # initializer_range like every other weight: at unit scale the query (added back by the
        # residual) swamped the image-dependent attention output, so every image's pooled vector
        # and vision tokens started near-identical (mean pairwise cosine 0.99 -> 0.44 at 0.02).
        self.queries = nn.Parameter(torch.randn(1 + config.num_vision_tokens, hidden) * config.initializer_range)
        self.query_norm = RMSNorm(hidden)
        self.source_norm = RMSNorm(hidden)
        self.pool_attn = MultiHeadAttention(
            hidden, config.num_attention_heads, dropout=config.dropout, quantized=config.quantized
        )
        self.mlp_norm = RMSNorm(hidden)
        self.mlp = FeedForward(
            hidden,
            config.intermediate_size,
            activation=config.hidden_act,
            dropout=config.dropout,
            quantized=config.quantized,
        )
        self.out_norm = RMSNorm(hidden)
        self.no_image_tokens = nn.Parameter(torch.randn(config.num_vision_tokens, hidden))
        self.no_image_pooled = nn.Parameter(torch.randn(hidden))

    def forward(
        self, features: VisionFeatures | None, batch_size: int, output_attentions: bool = False
    ) -> VisionAdapterOutput:
        no_image_tokens = self.no_image_tokens.expand(batch_size, -1, -1)
        no_image_pooled = self.no_image_pooled.expand(batch_size, -1)
        if features is None:
            has_image = torch.zeros(batch_size, dtype=torch.bool, device=no_image_pooled.device)
            return VisionAdapterOutput(
                tokens=no_image_tokens, pooled=no_image_pooled, has_image=has_image, attention=None
            )

        dtype = self.input_norm.weight.dtype
        x = torch.cat((features.cls[:, None], features.patches), dim=1).to(dtype)
        source = self.compress(self.input_norm(x)) + self.feature_positions
        queries = self.queries.expand(batch_size, -1, -1)
        attn = self.pool_attn(self.query_norm(queries), self.source_norm(source), output_attentions=output_attentions)
        h = queries + attn.hidden_states
        h = self.out_norm(h + self.mlp(self.mlp_norm(h)))
        pooled, tokens = h[:, 0], h[:, 1:]

        has_image = features.has_image
        if has_image is None:
            has_image = torch.ones(batch_size, dtype=torch.bool, device=h.device)
        else:
            tokens = torch.where(has_image[:, None, None], tokens, no_image_tokens)
            pooled = torch.where(has_image[:, None], pooled, no_image_pooled)
        return VisionAdapterOutput(tokens=tokens, pooled=pooled, has_image=has_image, attention=attn.weights)
