"""BitMarModel: the full vision-language model, its typed output, and Hub (de)serialisation.

Data flow of `forward`:

    input_ids ──embed──> encoder ─────────────────┐
    vision_features ──> vision adapter ───────────┤ (learned "no image" tokens when absent)
                                                  v
                      fusion (text <-> vision) -> fused text, fused vision, joint embedding,
                                                  contrastive image/text embeddings
    joint embedding -> episodic memory read -> memory token
    [memory token, fused text, fused vision] -> reasoning -> robot logits, value, thought scores
                      (the selection head also reads the input's mean token embedding;
                      with config.knowledge_dim, teacher-distilled knowledge logits are added;
                      with knowledge_no_robot_gate, its gate decides "No Robot")
    decoder_input_ids -> decoder (cross-attends to [memory token, reasoning state, selection
                      token, fused vision, task tokens]) -> tied LM head -> logits

The LM head is tied to the token embedding and kept in full precision: BitNet quantizes
the transformer's linear layers but not the embedding and output head, and at this size
the vocab x hidden matrix is the largest tensor, so tying it halves the fp budget.

The selection token is the selection head's probabilities, embedded: the generated
reasoning explains the decision the head made instead of re-deciding from the state alone
(when it did, its parsed selections agreed with the head on few multi-robot tasks:
exact-set 0.10 against the head's 0.42 on the test split). The probabilities are detached,
so the language-modelling loss trains the decoder to read the decision, never the head.

Caveat for trainers: the decoder's context has seen `input_ids` (through fusion and
reasoning), so LM targets must not appear in `input_ids`; put the text to predict only
in `decoder_input_ids`/`labels`.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from bitmar_model.cell_words import CellReader
from bitmar_model.config import BitMarConfig
from bitmar_model.copying import CopyHead, CopySource, read_tokens
from bitmar_model.decoder import BitMarDecoder, GenerationOutput, token_log_probs
from bitmar_model.encoder import BitMarEncoder
from bitmar_model.fusion import CrossModalFusion, FusionOutput, masked_mean
from bitmar_model.knowledge import TaskKnowledge
from bitmar_model.layers import RMSNorm, make_linear, positions_from_mask
from bitmar_model.memory import EpisodicMemory, MemoryReadout
from bitmar_model.packing import model_bytes_report
from bitmar_model.reasoning import ReasoningModule, ReasoningOutput
from bitmar_model.robots import ROBOT_CLASSES, select_robots
from bitmar_model.vision_adapter import (
    VisionAdapter,
    VisionAdapterOutput,
    VisionFeaturesInput,
    as_vision_features,
)

IGNORE_INDEX = -100
# Bump when forward semantics change without changing parameter shapes (e.g. what the
# decoder attends to): trained checkpoints of an older revision must not be resumed.
MODEL_REVISION = 8


@dataclass
class BitMarOutput:
    logits: torch.Tensor | None  # [B, T_dec, vocab]; None without decoder_input_ids
    loss: torch.Tensor | None  # next-token cross entropy over `labels` (ignore_index -100)
    robot_logits: torch.Tensor  # [B, num_robot_classes]
    robot_probs: torch.Tensor  # [B, num_robot_classes], independent sigmoids (multi-label)
    value: torch.Tensor  # [B]
    thought_scores: torch.Tensor  # [B, reasoning_steps]
    reasoning_state: torch.Tensor  # [B, hidden]
    memory_readout: torch.Tensor  # [B, memory_dim]
    memory_attention: torch.Tensor  # [B, memory_slots]
    image_embeds: torch.Tensor | None  # [B, projection_dim], L2-normalised; None for text-only calls
    text_embeds: torch.Tensor  # [B, projection_dim], L2-normalised
    logit_scale: torch.Tensor  # scalar
    joint_embedding: torch.Tensor  # [B, hidden]
    has_image: torch.Tensor  # [B] bool: rows whose vision tokens come from image features
    cell_word_logits: torch.Tensor | None = None  # [B, P, vocab], the cell reader's (config.cell_words)
    attentions: dict[str, Any] | None = None  # per component, when output_attentions=True


@dataclass
class SequenceScores:
    """Teacher-forced scores of a decoder sequence (see `BitMarModel.sequence_scores`)."""

    log_probs: torch.Tensor  # [B, T-1], fp32, 0 where not scored
    entropy: torch.Tensor | None  # [B, T-1], entropy of the next-token distribution; None unless asked
    robot_logits: torch.Tensor  # [B, num_robot_classes], the selection head on the same forward


@dataclass
class _Conditioning:
    """Everything computed from the inputs before the decoder (shared by forward and generate)."""

    vision: VisionAdapterOutput
    fusion: FusionOutput
    memory: MemoryReadout
    reasoning: ReasoningOutput
    decoder_context: torch.Tensor  # [B, 3 + num_vision_tokens (+ T task tokens), hidden]
    decoder_context_mask: torch.Tensor | None  # [B, C], 1 = real token; None when nothing is padded
    attentions: dict[str, Any] | None
    copy_source: CopySource | None = None  # the task tokens the output head can copy
    cell_word_logits: torch.Tensor | None = None  # [B, P, vocab] (config.cell_words)


def _describe(x: Any) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_token_ids(
    name: str, ids: Any, config: BitMarConfig, batch_size: int | None = None, max_len: int | None = None
) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name}: expected an integer tensor of shape [batch, seq_len]; received {_describe(ids)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [batch, seq_len] tensor; received {_describe(ids)}")
    if batch_size is not None and ids.shape[0] != batch_size:
        raise ValueError(f"{name}: expected batch size {batch_size} (that of input_ids); received {_describe(ids)}")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(
            f"{name}: sequence length {ids.shape[1]} exceeds max_seq_len={max_len}; received {_describe(ids)}"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"{name}: token ids must be in [0, {config.vocab_size}); received values in [{low}, {high}]")


def _check_mask(name: str, mask: Any, ids_name: str, ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise ValueError(
            f"{name}: expected shape {list(ids.shape)} (the shape of {ids_name}); received {_describe(mask)}"
        )
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{name}: expected values in {{0, 1}}")
    return mask.long()


class BitMarModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="bitmar",
    license="mit",
    tags=["bitnet", "ternary", "vision-language", "robot-selection", "episodic-memory"],
):
    """BitMar vision-language model. `save_pretrained`/`from_pretrained` (huggingface_hub)
    write and read model.safetensors + config.json (the BitMarConfig dict)."""

    def __init__(self, config: BitMarConfig | dict | None = None) -> None:
        super().__init__()
        if config is None:
            config = BitMarConfig()
        elif isinstance(config, dict):
            config = BitMarConfig.from_dict(config)
        elif not isinstance(config, BitMarConfig):
            raise ValueError(f"config: expected a BitMarConfig, a dict or None; received {type(config).__name__}")
        self.config = config
        # What the Hub mixin writes as config.json, whichever way the model was built.
        self._hub_mixin_config = config.to_dict()

        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.encoder = BitMarEncoder(config)
        self.vision_adapter = VisionAdapter(config)
        self.fusion = CrossModalFusion(config)
        self.memory = EpisodicMemory(config.memory_slots, config.memory_dim, config.memory_alpha, query_dim=hidden)
        self.memory_out = make_linear(config.memory_dim, hidden, quantized=config.quantized)
        self.memory_norm = RMSNorm(hidden)
        self.reasoning = ReasoningModule(config)
        self.reasoning_norm = RMSNorm(hidden)
        self.selection_embed = nn.Linear(config.num_robot_classes, hidden)
        self.selection_norm = RMSNorm(hidden)
        if config.decoder_reads_task:
            # Cross-attention has no positions of its own: the task tokens carry learned ones.
            self.task_positions = nn.Embedding(config.max_seq_len, hidden)
            self.task_norm = RMSNorm(hidden)
        if config.decoder_copies_task:
            self.copy_head = CopyHead(hidden)
        if config.knowledge_dim:
            self.knowledge = self._new_knowledge(config)
        self.decoder = BitMarDecoder(config)
        if config.cell_words:
            # Built (and initialised) last: the other modules start exactly as they do without it.
            self.cell_reader = CellReader(config.vision_feature_dim, hidden, config.vocab_size, config.cell_words)
        for module in self.modules():
            self._init_module(module)
        if config.cell_words:
            self.cell_reader.reset_scale(config.initializer_range)

    @staticmethod
    def _new_knowledge(config: BitMarConfig) -> TaskKnowledge:
        return TaskKnowledge(
            config.vocab_size, config.knowledge_dim, config.num_robot_classes, config.knowledge_token_tfidf,
            config.knowledge_words, config.knowledge_context_layers, config.knowledge_context_out, config.max_seq_len,
            config.knowledge_fleet_texts, config.knowledge_no_robot_gate, config.knowledge_known_tasks,
            config.knowledge_fit_novelty_power, config.knowledge_label_sets,
        )

    def add_knowledge(
        self, dim: int, token_tfidf: bool = False, words: int = 0, context_layers: int = 0, context_out: int = 0,
        fleet_texts: int = 0, no_robot_gate: bool = False, known_tasks: int = 0, novelty_power: float = 0.0,
        label_sets: int = 0,
    ) -> TaskKnowledge:
        """Give a trained model an (empty) knowledge table of width `dim` (with a token TF-IDF
        view if asked; over `words` whole words if > 0, read by a `context_layers`-layer encoder
        of output width `context_out` if > 0; storing `fleet_texts` robot description vectors for the
        fleet fit if > 0, weighted by novelty against `known_tasks` train task vectors if > 0; with a
        no-robot gate if asked; scoring `label_sets` robot sets if > 0) and record it in the config, so
        save/load round-trips it; the caller installs the fitted tensors (`TaskKnowledge.load_fitted`,
        `load_fleet`, `load_known`, `load_gate`, `load_label_sets`). Until then its weights are 0 and the
        outputs are unchanged."""
        if self.config.knowledge_dim:
            raise ValueError(f"add_knowledge: already has one (knowledge_dim {self.config.knowledge_dim})")
        # replace() validates the values
        self.config = replace(
            self.config, knowledge_dim=dim, knowledge_token_tfidf=token_tfidf, knowledge_words=words,
            knowledge_context_layers=context_layers, knowledge_context_out=context_out,
            knowledge_fleet_texts=fleet_texts, knowledge_no_robot_gate=no_robot_gate,
            knowledge_known_tasks=known_tasks, knowledge_fit_novelty_power=novelty_power,
            knowledge_label_sets=label_sets,
        )
        self._hub_mixin_config = self.config.to_dict()
        self.knowledge = self._new_knowledge(self.config).to(self.embed_tokens.weight.device)
        return self.knowledge

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):  # includes BitLinear and the memory's query projection
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs: Any) -> BitMarModel:
        # The mixin loads non-strictly by default; a checkpoint that does not cover every
        # tensor of the architecture must fail, not leave random weights behind. It also print()s
        # "Loading weights from local directory", which would corrupt `bitmar predict --json` on
        # stdout and adds a line per stage to `bitmar run`.
        with contextlib.redirect_stdout(io.StringIO()):
            return super()._from_pretrained(strict=strict, **kwargs)

    # ------------------------------------------------------------------ conditioning

    def _validate(
        self,
        input_ids: Any,
        attention_mask: Any,
        vision_features: VisionFeaturesInput | None,
        decoder_input_ids: Any,
        decoder_attention_mask: Any,
        labels: Any,
    ) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        cfg = self.config
        # Only the encoder is bounded by max_seq_len (full attention); the decoder's sliding
        # window bounds its attention cost, so long completions are fine.
        _check_token_ids("input_ids", input_ids, cfg, max_len=cfg.max_seq_len)
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = _check_mask("attention_mask", attention_mask, "input_ids", input_ids)
        vision = None if vision_features is None else as_vision_features(vision_features, config=cfg, batch_size=batch)
        if decoder_input_ids is None:
            if decoder_attention_mask is not None or labels is not None:
                raise ValueError(
                    "decoder_input_ids: required when decoder_attention_mask or labels is given; received None"
                )
            return attention_mask, vision, None
        _check_token_ids("decoder_input_ids", decoder_input_ids, cfg, batch)
        if decoder_attention_mask is None:
            decoder_attention_mask = torch.ones_like(decoder_input_ids)
        decoder_attention_mask = _check_mask(
            "decoder_attention_mask", decoder_attention_mask, "decoder_input_ids", decoder_input_ids
        )
        if labels is not None:
            if (
                not isinstance(labels, torch.Tensor)
                or labels.shape != decoder_input_ids.shape
                or labels.is_floating_point()
            ):
                raise ValueError(
                    f"labels: expected an integer tensor of shape {list(decoder_input_ids.shape)} "
                    f"(the shape of decoder_input_ids); received {_describe(labels)}"
                )
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= cfg.vocab_size))
            if bad.any():
                raise ValueError(f"labels: expected token ids in [0, {cfg.vocab_size}) or {IGNORE_INDEX}")
        return attention_mask, vision, decoder_attention_mask

    def _condition(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision_features: Any,
        output_attentions: bool,
        update_memory: bool,
        decodes: bool = True,
    ) -> _Conditioning:
        batch = input_ids.shape[0]
        embedded = self.embed_tokens(input_ids)
        text = self.encoder(self.embed_dropout(embedded), attention_mask, output_attentions)
        vision = self.vision_adapter(vision_features, batch, output_attentions)
        fused = self.fusion(text.last_hidden_state, attention_mask, vision.tokens, vision.pooled, output_attentions)

        memory = self.memory.read(fused.joint_embedding)
        memory_token = self.memory_norm(self.memory_out(memory.readout))[:, None]
        if update_memory:
            # Episodes are filed under the projected query, so a later read of a similar
            # input addresses the slots this one wrote. Written after the read: a sample
            # never retrieves itself.
            with torch.no_grad():
                self.memory.write(self.memory.query_proj(fused.joint_embedding.detach()))

        ones = attention_mask.new_ones(batch, 1)
        reasoning_context = torch.cat((memory_token, fused.text_states, fused.vision_tokens), dim=1)
        reasoning_mask = torch.cat((ones, attention_mask, ones.expand(-1, fused.vision_tokens.shape[1])), dim=1)
        bag_of_words = masked_mean(embedded, attention_mask)
        reasoning = self.reasoning(
            reasoning_context, reasoning_mask, fused.joint_embedding, bag_of_words, output_attentions
        )
        if self.config.knowledge_dim:
            logits = self.knowledge.selection_logits(reasoning.robot_logits, input_ids, attention_mask)
            reasoning = replace(reasoning, robot_logits=logits, robot_probs=torch.sigmoid(logits))
        selection_token = self.selection_norm(self.selection_embed(reasoning.robot_probs.detach()))
        decoder_context = torch.cat(
            (
                memory_token,
                self.reasoning_norm(reasoning.state)[:, None],
                selection_token[:, None],
                fused.vision_tokens,
            ),
            dim=1,
        )
        decoder_context_mask = copy_source = cell_word_logits = None
        # The cell words are read by the decoder only: a forward without decoding (InfoNCE) skips the reader.
        if self.config.cell_words and decodes and vision_features is not None and vision_features.patches.shape[1]:
            cell_word_logits = self.cell_reader.logits(vision_features.patches, self.embed_tokens.weight)
        if self.config.decoder_reads_task:
            task = self._task_tokens(embedded, attention_mask)
            fixed = attention_mask.new_ones(decoder_context.shape[:2])  # memory, reasoning, selection, vision
            source_ids, source_mask, unphrased = input_ids, attention_mask, 0
            if cell_word_logits is not None:
                # The cell words come before the task, so the task still ends the copy source (its end cue).
                word_ids = self.cell_reader.words(cell_word_logits)
                ranks = torch.arange(word_ids.shape[1], device=word_ids.device)
                words = self.task_norm(self.embed_tokens(word_ids) + self.cell_reader.rank_positions(ranks))
                word_mask = vision.has_image[:, None].expand_as(word_ids).to(attention_mask.dtype)
                task = torch.cat((words, task), dim=1)
                source_ids = torch.cat((word_ids, input_ids), dim=1)
                source_mask = torch.cat((word_mask, attention_mask), dim=1)
                unphrased = word_ids.shape[1]
            decoder_context = torch.cat((decoder_context, task), dim=1)
            decoder_context_mask = torch.cat((fixed, source_mask), dim=1)
            if self.config.decoder_copies_task:
                copy_source = CopySource(source_ids, task, source_mask, unphrased)

        attentions = None
        if output_attentions:
            attentions = {
                "encoder": text.attentions,
                "vision_pooling": vision.attention,
                "fusion_text_to_vision": fused.text_to_vision_attentions,
                "fusion_vision_to_text": fused.vision_to_text_attentions,
                "memory": memory.attention,
                "reasoning_context": reasoning.context_attention,
                "reasoning_robots": reasoning.robot_attention,
            }
        return _Conditioning(
            vision, fused, memory, reasoning, decoder_context, decoder_context_mask, attentions, copy_source,
            cell_word_logits,
        )

    def _task_tokens(self, embedded: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The task's token embeddings with learned positions, as the decoder's context reads them
        (padding is masked by the caller). Token embeddings rather than encoder states, so this path
        adds no new route from the LM loss into the encoder the selection head reads: only into the
        embedding table, which the tied LM head trains anyway."""
        # Counted over real tokens, so a left-padded row gets the positions it has alone.
        return self.task_norm(embedded + self.task_positions(positions_from_mask(attention_mask)))

    def output_logits(
        self, hidden: torch.Tensor, read: torch.Tensor, copy_source: CopySource | None
    ) -> torch.Tensor:
        """Next-token logits [B, T, V] from decoder states [B, T, d] and the tokens read [B, T, 2] (`read_tokens`):
        the tied LM head, mixed with copying from the task when config.decoder_copies_task (then
        normalised log-probs)."""
        logits = F.linear(hidden, self.embed_tokens.weight)
        if copy_source is None:
            return logits
        return self.copy_head(hidden, logits, read, copy_source)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        vision_features: VisionFeaturesInput | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        update_memory: bool = False,
    ) -> BitMarOutput:
        """Encode text (+ optional image features), reason, and decode `decoder_input_ids`.

        vision_features: {"cls": [B, F], "patches": [B, P, F], optional "has_image": [B] bool}
            or (cls, patches); None for text-only inputs.
        labels: aligned with decoder_input_ids (causal-LM convention: position t is
            predicted from tokens < t; the shift happens here); -100 is ignored.
        update_memory: file this batch's episodes in the episodic memory (no gradients).
        """
        attention_mask, vision, decoder_attention_mask = self._validate(
            input_ids, attention_mask, vision_features, decoder_input_ids, decoder_attention_mask, labels
        )
        cond = self._condition(
            input_ids, attention_mask, vision, output_attentions, update_memory, decodes=decoder_input_ids is not None
        )

        logits = loss = None
        attentions = cond.attentions
        if decoder_input_ids is not None:
            dec = self.decoder(
                self.embed_dropout(self.embed_tokens(decoder_input_ids)),
                decoder_attention_mask,
                cond.decoder_context,
                context_mask=cond.decoder_context_mask,
                output_attentions=output_attentions,
            )
            logits = self.output_logits(dec.last_hidden_state, read_tokens(decoder_input_ids), cond.copy_source)
            if labels is not None:
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    labels[:, 1:].reshape(-1),
                    ignore_index=IGNORE_INDEX,
                )
            if attentions is not None:
                attentions["decoder_self"] = dec.self_attentions
                attentions["decoder_cross"] = dec.cross_attentions

        reasoning, fused = cond.reasoning, cond.fusion
        return BitMarOutput(
            logits=logits,
            loss=loss,
            robot_logits=reasoning.robot_logits,
            robot_probs=reasoning.robot_probs,
            value=reasoning.value,
            thought_scores=reasoning.thought_scores,
            reasoning_state=reasoning.state,
            memory_readout=cond.memory.readout,
            memory_attention=cond.memory.attention,
            image_embeds=None if vision is None else fused.image_embeds,
            text_embeds=fused.text_embeds,
            logit_scale=fused.logit_scale,
            joint_embedding=fused.joint_embedding,
            has_image=cond.vision.has_image,
            cell_word_logits=cond.cell_word_logits,
            attentions=attentions,
        )

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        vision_features: VisionFeaturesInput | None = None,
        *,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_at_eos: bool = True,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        return_log_probs: bool = False,
        logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> GenerationOutput:
        """Generate decoder text for each input (call .eval() first for deterministic dropout).

        The decoder prompt defaults to one BOS token per row; `decoder_input_ids` may be
        left or right padded (`decoder_attention_mask`). Rows stop at config.eos_token_id
        unless `stop_at_eos=False`. The memory is read, never written.
        """
        if decoder_input_ids is None:
            if decoder_attention_mask is not None:
                raise ValueError("decoder_input_ids: required when decoder_attention_mask is given; received None")
            if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
                decoder_input_ids = input_ids.new_full((input_ids.shape[0], 1), self.config.bos_token_id)
        attention_mask, vision, decoder_attention_mask = self._validate(
            input_ids, attention_mask, vision_features, decoder_input_ids, decoder_attention_mask, None
        )
        cond = self._condition(input_ids, attention_mask, vision, output_attentions=False, update_memory=False)
        output_head = None
        if cond.copy_source is not None:
            source = cond.copy_source

            def output_head(hidden: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
                return self.output_logits(hidden[:, None], read[:, None], source)[:, 0]

        return self.decoder.generate(
            self.embed_tokens,
            cond.decoder_context,
            decoder_input_ids,
            decoder_attention_mask,
            context_mask=cond.decoder_context_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=self.config.eos_token_id if stop_at_eos else None,
            pad_token_id=self.config.pad_token_id,
            generator=generator,
            use_cache=use_cache,
            return_log_probs=return_log_probs,
            output_head=output_head,
            logits_processor=logits_processor,
        )

    def sequence_log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        vision_features: VisionFeaturesInput | None,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Teacher-forced log-probs of decoder_input_ids[:, 1:], [B, T-1], with gradients.

        Entry t-1 is log p(token t | the real tokens before it), predicted from the last
        real column before t (not blindly from t-1, so a right-padded prompt followed by
        generated tokens is scored the way it was sampled). Entries are 0 where token t is
        padding or has no real token before it. For GRPO pass a generation's `sequences`
        and `attention_mask`: columns [T0 - 1:] are the new tokens' log-probs and match
        `generate(return_log_probs=True)` (same temperature) up to float rounding.
        """
        return self.sequence_scores(
            input_ids, attention_mask, vision_features, decoder_input_ids, decoder_attention_mask, temperature
        ).log_probs

    def sequence_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        vision_features: VisionFeaturesInput | None,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        entropy: bool = False,
    ) -> SequenceScores:
        """`sequence_log_probs`, plus (with `entropy`) the entropy of the whole next-token
        distribution at each scored position, and the selection head's logits of the same
        forward pass, so GRPO gets all three from one pass."""
        out = self(input_ids, attention_mask, vision_features, decoder_input_ids, decoder_attention_mask)
        mask = torch.ones_like(decoder_input_ids) if decoder_attention_mask is None else decoder_attention_mask.long()
        columns = torch.arange(mask.shape[1], device=mask.device)
        last_real = torch.where(mask.bool(), columns, -1).cummax(dim=1).values  # last real column <= t
        previous = last_real[:, :-1]  # last real column < t, for t = 1..T-1
        logits = (
            out.logits.gather(1, previous.clamp(min=0)[..., None].expand(-1, -1, out.logits.shape[-1])) / temperature
        )
        scored = (mask[:, 1:].bool() & (previous >= 0)).float()
        log_probs = token_log_probs(logits, decoder_input_ids[:, 1:]) * scored
        entropies = None
        if entropy:
            log_dist = torch.log_softmax(logits.float(), dim=-1)
            entropies = -(log_dist.exp() * log_dist).sum(dim=-1) * scored
        return SequenceScores(log_probs, entropies, out.robot_logits)

    # ------------------------------------------------------------------ analysis

    @staticmethod
    def extract_robot_selections(outputs: BitMarOutput, threshold: float = 0.5) -> list[list[str]]:
        """Per sample, in class order: "No Robot" alone when it beats the best robot, else
        the robots with probability >= threshold and always the best (`select_robots`)."""
        selected = select_robots(outputs.robot_probs.detach().float().cpu().numpy(), threshold)
        return [[ROBOT_CLASSES[i] for i in np.flatnonzero(row)] for row in selected]

    @staticmethod
    def get_reasoning_analysis(outputs: BitMarOutput, threshold: float = 0.5) -> dict[str, Any]:
        """JSON-ready summary: per-class probabilities, selections, and reasoning quality
        (mean thought score per sample) with the per-step scores and state values."""
        probs = outputs.robot_probs.detach().float().cpu()
        scores = outputs.thought_scores.detach().float().cpu()
        quality = scores.mean(dim=-1)
        return {
            "robot_probabilities": [dict(zip(ROBOT_CLASSES, row.tolist(), strict=True)) for row in probs],
            "selections": BitMarModel.extract_robot_selections(outputs, threshold),
            "thought_scores": scores.tolist(),
            "reasoning_quality": quality.tolist(),
            "mean_reasoning_quality": float(quality.mean()),
            "value": outputs.value.detach().float().cpu().tolist(),
        }


def create_bitmar_model(config: BitMarConfig | dict | None = None) -> BitMarModel:
    """Build a freshly initialised BitMarModel (default config when None)."""
    return BitMarModel(config)


def parameter_report(model: BitMarModel) -> dict[str, Any]:
    """Parameters per top-level component and the model's size in fp32, fp16 and packed
    ternary form (packing.model_bytes_report; buffers such as the memory slots included)."""
    sizes = model_bytes_report(model)
    components: dict[str, dict[str, int]] = {}
    for name, child in model.named_children():
        if name not in sizes["components"]:  # stateless modules (dropout)
            continue
        entry = {"parameters": sum(p.numel() for p in child.parameters())}
        entry.update({k: v for k, v in sizes["components"].get(name, {}).items() if k.endswith("_bytes")})
        components[name] = entry
    return {
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "components": components,
        "fp32_bytes": sizes["total"]["fp32_bytes"],
        "fp16_bytes": sizes["total"]["fp16_bytes"],
        "packed_bytes": sizes["total"]["packed_bytes"],
        "compression_vs_fp32": sizes["compression_vs_fp32"],
    }
