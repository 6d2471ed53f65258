"""The cell reader (issue 10, item 11): the decoder reads and can copy the words it names per cell."""

from __future__ import annotations

import pytest
import torch

from bitmar_model import BitMarConfig, BitMarModel
from bitmar_model.cell_words import cell_bag_of_words_loss, fit_cell_reader
from bitmar_model.losses import PretrainWeights, pretrain_loss


def _model(**overrides) -> BitMarModel:
    torch.manual_seed(0)
    return BitMarModel(BitMarConfig.tiny(cell_words=4, **overrides)).eval()


def _inputs(cfg: BitMarConfig, batch: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    prompt = torch.randint(3, cfg.vocab_size, (batch, 5))
    vision = {
        "cls": torch.randn(batch, cfg.vision_feature_dim),
        "patches": torch.randn(batch, cfg.vision_num_patches, cfg.vision_feature_dim),
    }
    return prompt, vision


def test_caption_path_copies_the_word_the_cell_reader_names():
    model = _model()
    prompt, vision = _inputs(model.config)
    named = 77
    assert named not in prompt.tolist()
    with torch.no_grad():
        model.cell_reader.word_bias[named] = 50.0  # every cell names word 77 first
        model.copy_head.sentinel_bias.fill_(-50.0)  # and the head copies
        out = model.generate(prompt, None, vision, max_new_tokens=1)
    assert out.new_tokens[:, 0].tolist() == [named, named]
    # Without image features there are no cell words to copy.
    with torch.no_grad():
        blind = model.generate(prompt, None, None, max_new_tokens=1)
    assert named not in blind.new_tokens[:, 0].tolist()


def test_cell_words_change_what_the_decoder_reads():
    model = _model()
    prompt, vision = _inputs(model.config)
    decoder = torch.full((2, 1), model.config.bos_token_id)
    with torch.no_grad():
        before = model(prompt, None, vision, decoder_input_ids=decoder).logits
        model.cell_reader.word_bias[77] = 50.0
        after = model(prompt, None, vision, decoder_input_ids=decoder).logits
    assert not torch.allclose(before, after)


def test_pretraining_trains_the_cell_reader_from_the_caption_words():
    model = _model()
    model.train()
    cfg = model.config
    prompt, vision = _inputs(cfg, batch=4)
    captions = torch.randint(3, cfg.vocab_size, (4, 6))
    decoder = torch.cat((torch.full((4, 1), cfg.bos_token_id), captions, torch.full((4, 1), cfg.eos_token_id)), dim=1)
    batch = {
        "cls": vision["cls"], "patches": vision["patches"], "image_ids": torch.arange(4),
        "caption_ids": captions, "caption_mask": torch.ones_like(captions),
        "prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt),
        "decoder_ids": decoder, "decoder_mask": torch.ones_like(decoder), "labels": decoder,
    }
    loss, logs = pretrain_loss(model, batch, PretrainWeights())
    loss.backward()
    assert logs["cell_word_loss"] > 0
    assert model.cell_reader.proj.weight.grad.abs().sum() > 0


def test_cell_bag_of_words_loss_rewards_the_best_cell_naming_the_caption_words():
    captions = torch.tensor([[5, 6, 0]])
    mask = torch.tensor([[1, 1, 0]])
    logits = torch.zeros(1, 3, 10)
    good = logits.clone()
    good[0, 1, 5] = good[0, 2, 6] = 8.0  # two cells, one word each
    special = (0, 1, 2)
    loss_good = cell_bag_of_words_loss(good, captions, mask, special)
    assert loss_good < cell_bag_of_words_loss(logits, captions, mask, special)


def test_cell_words_need_the_decoder_to_read_the_task():
    with pytest.raises(ValueError, match="cell_words"):
        BitMarConfig.tiny(cell_words=4, decoder_reads_task=False, decoder_copies_task=False)


def test_reader_warmup_learns_which_cell_names_which_caption_word():
    torch.manual_seed(0)
    model = _model()
    cfg = model.config
    colours = torch.randn(3, cfg.vision_feature_dim)  # word 10 + k is drawn as "colour" k

    def batches():
        while True:
            which = torch.randint(3, (16,))
            patches = torch.randn(16, cfg.vision_num_patches, cfg.vision_feature_dim) * 0.1
            cell = torch.randint(cfg.vision_num_patches, (16,))
            patches[torch.arange(16), cell] += 3 * colours[which]
            captions = torch.stack((torch.full((16,), 7), 10 + which), dim=1)  # a shared word + the colour
            yield patches, captions, torch.ones_like(captions)

    losses = fit_cell_reader(model.cell_reader, model.embed_tokens.weight, batches(), 150, 1e-2, (0, 1, 2))
    assert losses[-1] < losses[0]
    model.eval()
    patches, captions, _ = next(batches())
    with torch.no_grad():
        words = model.cell_reader.words(model.cell_reader.logits(patches, model.embed_tokens.weight))
    named = (words[:, 0] == captions[:, 1]).float().mean()
    assert named > 0.9  # the colour word, not the word every caption has


def test_forward_without_decoding_skips_the_cell_reader():
    model = _model()
    prompt, vision = _inputs(model.config)
    assert model(prompt, None, vision).cell_word_logits is None
    decoder = torch.full((2, 1), model.config.bos_token_id)
    logits = model(prompt, None, vision, decoder_input_ids=decoder).cell_word_logits
    assert logits.shape[:2] == (2, model.config.vision_num_patches)
