"""BitMarConfig: every size and switch of the model, as one JSON-serialisable dataclass.

The config is the only thing needed to rebuild the architecture (save_pretrained writes
it as config.json, packed exports embed it), so `from_dict` refuses keys it does not know
instead of silently dropping them: a typo in a YAML profile must fail loudly, not train
a different model.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from bitmar_model.robots import NUM_ROBOT_CLASSES

HIDDEN_ACTIVATIONS = ("swiglu", "gelu")


@dataclass
class BitMarConfig:
    """Sizes of BitMar. The defaults are the pipeline's sample-profile model (~2M parameters,
    the `model:` section's defaults read them); `paper()` gives the BitMar paper's ~14M model
    that configs/coco.yaml spells out."""

    # Text (encoder and decoder share one token embedding, tied with the LM head).
    vocab_size: int = 4096
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    intermediate_size: int = 384
    hidden_act: str = "swiglu"
    max_seq_len: int = 128  # encoder input length; decoder length is bounded by the window instead
    rope_theta: float = 10000.0
    # Vision: cached DINOv2 features (CLS + pooled patch grid), compressed to a few tokens.
    vision_feature_dim: int = 768
    vision_num_patches: int = 16
    num_vision_tokens: int = 4
    # Cross-modal fusion and the contrastive (InfoNCE) projection heads.
    num_fusion_layers: int = 1
    projection_dim: int = 64
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    # Episodic memory.
    memory_slots: int = 32
    memory_dim: int = 128
    memory_alpha: float = 0.1
    # Reasoning and robot selection.
    reasoning_steps: int = 5
    num_robot_classes: int = NUM_ROBOT_CLASSES
    # The decoder also cross-attends to the task's own tokens, so the reasoning can quote its cues.
    decoder_reads_task: bool = True
    # ... and its output head can copy the task's tokens (pointer-sentinel mixture, bitmar_model.copying).
    decoder_copies_task: bool = True
    # Cell words (bitmar_model.cell_words): a reader shared by the patch-grid cells names each cell's
    # words; this many (from the 2 best cells) join what the decoder reads and copies. 0: none.
    cell_words: int = 8
    # Width of the teacher-distilled static token table whose logits join the selection head's
    # (bitmar_model.knowledge); 0: no such table (no teacher configured).
    knowledge_dim: int = 0
    # ... and a sparse TF-IDF view of the same tokens next to the static vectors.
    knowledge_token_tfidf: bool = False
    # Rows of a whole-word table (found in the token ids by hash) in place of the per-token one; 0: tokens.
    knowledge_words: int = 0
    # Layers of a contextual encoder over the word rows, distilled from the teacher's sentence vectors
    # (needs knowledge_words), and its output width (the teacher's); 0: the SIF mean of static rows.
    knowledge_context_layers: int = 0
    knowledge_context_out: int = 0
    # Trained robots' description vectors whose fit margins join the knowledge logits; 0: none.
    knowledge_fleet_texts: int = 0
    # Vectors of the labelled train (and typed) tasks kept so the fleet fit counts (1 - the task's best cosine to them)
    # ^ knowledge_fit_novelty_power: in full on wording unlike the labelled tasks, little on wording like
    # them, where the classifier has learned the cues; 0 tasks: the fit counts in full everywhere.
    knowledge_known_tasks: int = 0
    knowledge_fit_novelty_power: float = 0.0
    # Robot sets (label sets) scored by a classifier over the task: a selected robot's runners-up get
    # P(in the set | the set holds the top robot) (bitmar_model.knowledge.secondary_from_sets); 0: none.
    knowledge_label_sets: int = 0
    # A no-robot gate over the task vector (logistic regression on labelled non-robot tasks) decides "No Robot".
    knowledge_no_robot_gate: bool = False
    # Decoder attention: StreamingLLM-style sinks + sliding window bound the KV cache.
    attention_sink_tokens: int = 4
    sliding_window: int = 256
    # Training.
    dropout: float = 0.1
    initializer_range: float = 0.02
    quantized: bool = True  # False swaps every BitLinear for nn.Linear (ablations, benchmarks)
    # Special tokens.
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def paper(cls, **overrides: Any) -> BitMarConfig:
        """The ~14M-parameter model of the BitMar paper (configs/coco.yaml's `model:` section)."""
        values: dict[str, Any] = dict(
            vocab_size=16384,
            hidden_size=256,
            num_encoder_layers=4,
            num_decoder_layers=4,
            intermediate_size=512,
            max_seq_len=256,
            num_vision_tokens=8,
            projection_dim=128,
        )
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def tiny(cls, **overrides: Any) -> BitMarConfig:
        """A sub-1M-parameter config for tests and smoke runs (CPU, seconds)."""
        values: dict[str, Any] = dict(
            vocab_size=256,
            hidden_size=32,
            num_attention_heads=2,
            num_encoder_layers=1,
            num_decoder_layers=2,
            intermediate_size=64,
            max_seq_len=64,
            vision_feature_dim=32,
            vision_num_patches=4,
            num_vision_tokens=2,
            num_fusion_layers=1,
            projection_dim=16,
            memory_slots=8,
            memory_dim=16,
            reasoning_steps=3,
            attention_sink_tokens=2,
            sliding_window=32,
            dropout=0.0,
        )
        values.update(overrides)
        return cls.from_dict(values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_cache_len(self) -> int:
        """Upper bound on the decoder's self-attention KV cache length per layer."""
        return self.attention_sink_tokens + self.sliding_window

    @property
    def special_token_ids(self) -> tuple[int, int, int]:
        """(pad, bos, eos), padding first."""
        return (self.pad_token_id, self.bos_token_id, self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BitMarConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"BitMarConfig: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**values)

    def fingerprint(self) -> str:
        """Stable short hash of the config (the same dict always gives the same string)."""
        return self.fingerprint_of(self.to_dict())

    @staticmethod
    def fingerprint_of(values: dict[str, Any]) -> str:
        """`fingerprint` of a config dict as stored: a release saved before a key existed hashes
        without it, and its stored dict still matches its manifest."""
        canonical = json.dumps(values, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "num_encoder_layers",
            "num_decoder_layers",
            "intermediate_size",
            "max_seq_len",
            "vision_feature_dim",
            "num_vision_tokens",
            "projection_dim",
            "memory_slots",
            "memory_dim",
            "reasoning_steps",
            "sliding_window",
        )
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BitMarConfig.{key} must be a positive integer, got {value!r}")
        for key in ("vision_num_patches", "num_fusion_layers", "attention_sink_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"BitMarConfig.{key} must be a non-negative integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BitMarConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                "BitMarConfig: head_dim = hidden_size / num_attention_heads "
                f"must be even for rotary embeddings, got {self.head_dim}"
            )
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"BitMarConfig.hidden_act must be one of {HIDDEN_ACTIVATIONS}, got {self.hidden_act!r}")
        if self.num_robot_classes != NUM_ROBOT_CLASSES:
            raise ValueError(
                f"BitMarConfig.num_robot_classes must be {NUM_ROBOT_CLASSES} (len(ROBOT_CLASSES)), "
                f"got {self.num_robot_classes!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BitMarConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < self.memory_alpha <= 1.0:
            raise ValueError(f"BitMarConfig.memory_alpha must be in (0, 1], got {self.memory_alpha!r}")
        for key in ("rope_theta", "logit_scale_max", "initializer_range"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"BitMarConfig.{key} must be a positive number, got {value!r}")
        if not isinstance(self.logit_scale_init, (int, float)) or not 0 <= self.logit_scale_init <= math.log(
            self.logit_scale_max
        ):
            raise ValueError(
                f"BitMarConfig.logit_scale_init must be in [0, log(logit_scale_max)] = "
                f"[0, {math.log(self.logit_scale_max):.3f}], got {self.logit_scale_init!r}"
            )
        for key in ("quantized", "knowledge_no_robot_gate"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"BitMarConfig.{key} must be a bool, got {getattr(self, key)!r}")
        counts = (
            "knowledge_dim", "knowledge_words", "knowledge_context_layers", "knowledge_context_out",
            "knowledge_fleet_texts", "knowledge_known_tasks", "knowledge_label_sets", "cell_words",
        )
        for key in counts:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"BitMarConfig.{key} must be an integer >= 0, got {value!r}")
        power = self.knowledge_fit_novelty_power
        if not isinstance(power, (int, float)) or isinstance(power, bool) or not 0 <= power < math.inf:
            raise ValueError(f"BitMarConfig.knowledge_fit_novelty_power must be a number >= 0, got {power!r}")
        if self.knowledge_known_tasks and not self.knowledge_fleet_texts:
            raise ValueError("BitMarConfig.knowledge_known_tasks needs knowledge_fleet_texts > 0: they weight its fit")
        if self.decoder_copies_task and not self.decoder_reads_task:
            raise ValueError(
                "BitMarConfig.decoder_copies_task needs decoder_reads_task=True: it copies from the task tokens "
                "the decoder reads"
            )
        if self.cell_words and not self.decoder_reads_task:
            raise ValueError(
                "BitMarConfig.cell_words needs decoder_reads_task=True: the decoder reads the cell words "
                "as it reads the task"
            )
        special = {
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        for key, value in special.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"BitMarConfig.{key} must be an integer in [0, vocab_size={self.vocab_size}), got {value!r}"
                )
        if len(set(special.values())) != len(special):
            raise ValueError(f"BitMarConfig: pad, bos and eos token ids must differ, got {special}")
