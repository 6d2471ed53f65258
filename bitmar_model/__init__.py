"""BitMar: a tiny BitNet 1.58-bit vision-language model (pure PyTorch).

    from bitmar_model import BitMarConfig, BitMarModel
    model = BitMarModel(BitMarConfig.tiny())

Exports are resolved lazily (PEP 562), so `import bitmar_model.robots` and similar light
imports do not pull in torch, transformers or huggingface_hub.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "BitMarConfig": "bitmar_model.config",
    "BitMarModel": "bitmar_model.modeling",
    "BitMarOutput": "bitmar_model.modeling",
    "create_bitmar_model": "bitmar_model.modeling",
    "parameter_report": "bitmar_model.modeling",
    "GenerationOutput": "bitmar_model.decoder",
    "BitLinear": "bitmar_model.bitlinear",
    "EpisodicMemory": "bitmar_model.memory",
    "parse_reasoning": "bitmar_model.reasoning_format",
    "format_reasoning": "bitmar_model.reasoning_format",
    "ROBOT_CLASSES": "bitmar_model.robots",
}

__all__ = [
    "ROBOT_CLASSES",
    "BitLinear",
    "BitMarConfig",
    "BitMarModel",
    "BitMarOutput",
    "EpisodicMemory",
    "GenerationOutput",
    "create_bitmar_model",
    "format_reasoning",
    "parameter_report",
    "parse_reasoning",
]

if TYPE_CHECKING:
    from bitmar_model.bitlinear import BitLinear
    from bitmar_model.config import BitMarConfig
    from bitmar_model.decoder import GenerationOutput
    from bitmar_model.memory import EpisodicMemory
    from bitmar_model.modeling import (
        BitMarModel,
        BitMarOutput,
        create_bitmar_model,
        parameter_report,
    )
    from bitmar_model.reasoning_format import format_reasoning, parse_reasoning
    from bitmar_model.robots import ROBOT_CLASSES


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bitmar_model' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
