"""The image-text contrastive path can learn at the sample profile's pretraining settings
(issue 10 item 11): image embeddings are not collapsed at initialisation, and a short run of
the real model, loss and optimizer on synthetic "colour shape" pairs gets well below chance.

Before the fix the vision adapter's unit-scale queries made every image embedding nearly the
same (mean pairwise cosine 0.99 here, 0.65 after)."""

from __future__ import annotations

import math

import torch

from bitmar_model import BitMarConfig, BitMarModel
from bitmar_model.losses import info_nce
from bitmar_model.trainer import parameter_groups
from bitmar_pipeline.config import PipelineConfig

COLOURS, SHAPES, FEATURE_DIM, PATCHES = 6, 4, 64, 4
FILLER = [5, 6, 7, 8]  # "a picture of a": shared by every caption, as in the sample captions


def small_config() -> BitMarConfig:
    # The sample model's widths, with the synthetic features' size and a small vocabulary.
    return BitMarConfig(vocab_size=64, vision_feature_dim=FEATURE_DIM, vision_num_patches=PATCHES)


def synthetic_pairs(n: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Features = a large shared component + a colour and a shape direction + noise (the stored
    sample features share ~70 % of their squared norm); captions name the colour and shape."""
    colour = torch.randint(COLOURS, (n,), generator=generator)
    shape = torch.randint(SHAPES, (n,), generator=generator)
    basis = torch.randn(COLOURS + SHAPES + 1, FEATURE_DIM, generator=torch.Generator().manual_seed(1))
    signal = basis[colour] + basis[COLOURS + shape] + 3.0 * basis[-1]
    cls = signal + 0.3 * torch.randn(n, FEATURE_DIM, generator=generator)
    patches = signal[:, None] + 0.3 * torch.randn(n, PATCHES, FEATURE_DIM, generator=generator)
    ids = torch.tensor([[*FILLER, 10 + int(c), 20 + int(s)] for c, s in zip(colour, shape, strict=True)])
    image_ids = colour * SHAPES + shape  # same colour and shape: same "image" (not a negative)
    return {"cls": cls, "patches": patches}, ids, image_ids


def mean_pairwise_cosine(embeds: torch.Tensor) -> float:
    sims = embeds @ embeds.t()
    n = len(embeds)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def test_image_embeddings_are_not_collapsed_at_init() -> None:
    torch.manual_seed(0)
    model = BitMarModel(small_config()).eval()
    vision, ids, _ = synthetic_pairs(64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), vision)
    # Unit-scale adapter queries gave 0.99 here: every image started at the same embedding.
    assert mean_pairwise_cosine(out.image_embeds) < 0.8


def test_contrastive_path_learns_at_the_sample_pretraining_settings() -> None:
    schedule = PipelineConfig().training.pretrain
    torch.manual_seed(0)
    model = BitMarModel(small_config()).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=schedule.learning_rate, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    batch = 16
    losses = []
    for step in range(80):
        vision, ids, image_ids = synthetic_pairs(batch, generator)
        out = model(ids, torch.ones_like(ids), vision)
        loss = info_nce(out.image_embeds, out.text_embeds, out.logit_scale, image_ids)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:  # the trainer's linear warmup
            group["lr"] = schedule.learning_rate * min(1.0, (step + 1) / schedule.warmup_steps)
        optimizer.step()
        losses.append(float(loss.detach()))
    # A guard that the path trains at all at the configured rate (chance is below ln 16 = 2.77
    # because repeated colour-shape pairs are masked); this easy task also learns at 2e-3, the
    # rate that failed on the stored sample features (docs/decisions.md).
    assert sum(losses[-10:]) / 10 < 0.6 * math.log(batch), losses[-10:]
