"""Packed ternary export: the BitNet b1.58 edge format for BitMar checkpoints.

A trained BitLinear only ever uses ternary weights times one absmean scale, so the edge
form stores 2 bits per weight (four weights per byte) plus one fp32 scale per layer; every
other floating tensor (embeddings, norms, biases, memory) is stored in fp16, as BitNet keeps
them, and read back in the model's dtype. `model_bytes_report` counts exactly these bytes.
The packed model therefore computes what the trained model computes with those tensors
rounded to fp16 (`round_to_stored`), bit for bit:

    pack_ternary / unpack_ternary   {-1, 0, 1} tensor <-> uint8 codes (exact inverse)
    PackedBitLinear                 integer inference layer (int8 weights in memory, 2-bit
                                    codes in its state dict); outputs equal BitLinear's
    pack_model                      deep copy with every BitLinear replaced
    packed_skeleton                 the same in place, with empty layers, for loading
    replace_bitlinears              the in-place replacement both use
    matmul_counts                   integer-kernel and fallback calls of a packed model
    held_weight_bytes               BitLinear weight memory of a trained or packed model
    save_packed / read_packed_config / load_packed_into
                                    directory with model.packed.safetensors + packed_config.json
    model_bytes_report              fp32 / fp16 / packed size, total and per component

Byte layout: weights are flattened row-major (shape [out_features, in_features]), padded
with zeros to a multiple of 4, and weight i lands in bits 2*(i % 4)..2*(i % 4)+1 of byte
i // 4 (little-endian within the byte). Codes: 0 -> 0, 1 -> +1, 2 -> -1; code 3 is invalid.

Loading goes in two steps because only the caller knows how to build its architecture:

    config = read_packed_config(directory)           # the dict passed to save_packed
    with placeholder_weights():                      # no fp32 BitLinear weights allocated
        packed = packed_skeleton(build_model(config))  # same structure, empty packed layers
    load_packed_into(packed, directory)              # validated, all or nothing

`save_packed` records the SHA-256 of the weights file in packed_config.json, so a
truncated, corrupted or edited file is refused before any tensor reaches the model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from bitmar_model.bitlinear import EPS, BitLinear, quantize_activations, rescale, ternarize
from bitmar_model.integer import MatmulCounts, ternary_product
from bitmar_model.io import atomic_write_bytes, atomic_write_json, check_stored_tensors, read_json, sha256_file

WEIGHTS_FILE = "model.packed.safetensors"
CONFIG_FILE = "packed_config.json"
FORMAT_NAME = "bitmar-packed-ternary"
FORMAT_VERSION = 2  # 2: non-ternary floating tensors stored in fp16 (1 stored them in fp32)
STORED_FLOAT_DTYPE = torch.float16

_CODE_TO_VALUE = (0.0, 1.0, -1.0)
_SHIFTS = (0, 2, 4, 6)


def packed_numel(num_weights: int) -> int:
    """Bytes needed for `num_weights` ternary weights at 2 bits each."""
    return math.ceil(num_weights / 4)


def pack_ternary(ternary: torch.Tensor) -> torch.Tensor:
    """Pack a tensor of values in {-1, 0, 1} (any dtype) into a flat uint8 tensor."""
    flat = ternary.detach().reshape(-1)
    if not ((flat == 0) | (flat == 1) | (flat == -1)).all():
        raise ValueError("pack_ternary: tensor has values outside {-1, 0, 1}")
    codes = torch.zeros(flat.numel() + (-flat.numel()) % 4, dtype=torch.uint8, device=flat.device)
    codes[: flat.numel()][flat == 1] = 1
    codes[: flat.numel()][flat == -1] = 2
    codes = codes.view(-1, 4)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_ternary(
    packed: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `pack_ternary`: the ternary tensor of `shape` as `dtype`."""
    shape = tuple(int(s) for s in shape)
    num_weights = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"unpack_ternary: expected a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed.numel() != packed_numel(num_weights):
        raise ValueError(
            f"unpack_ternary: {packed.numel()} bytes cannot hold shape {shape} "
            f"(expected {packed_numel(num_weights)} bytes)"
        )
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    codes = ((packed.unsqueeze(-1) >> shifts) & 3).reshape(-1)[:num_weights].long()
    if (codes == 3).any():
        raise ValueError("unpack_ternary: invalid code 3 in packed weights")
    table = torch.tensor(_CODE_TO_VALUE, dtype=dtype, device=packed.device)
    return table[codes].reshape(shape)


class PackedBitLinear(nn.Module):
    """The packed model's BitLinear: W1.58A8 integer inference.

    Holds the ternary weight as int8 [out, in] (one byte per weight, a quarter of fp32; no float
    copy is ever cached) and the fp32 absmean scale. Its state dict, and so the packed file,
    carries the 2-bit codes (`packed_weight`) instead, converted on save and on load.

    forward: rms_norm -> (levels, s) = quantize_activations -> product = sum_i levels_i * ternary_i
    (`integer.ternary_product`: int32 from torch._int_mm, or the counted float fallback) ->
    `rescale(product, gamma, s, bias)`: BitLinear.forward's operations in the same order, so with
    fp32 activations the output equals BitLinear's bit for bit, on CPU and CUDA (the integer sum is
    exact in both). bf16/fp16 activations: the fallback is BitLinear's own F.linear, equal again;
    the CUDA kernel rounds the exact int32 sum to the activation dtype once, as a GEMM with fp32
    accumulation does, so the outputs should still be equal and differ at most by one ulp of the
    product (relative 2^-8 in bf16) before the scales. That CUDA bf16 bound is not tested here (no GPU).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("ternary", torch.zeros(out_features, in_features, dtype=torch.int8), persistent=False)
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.counts = MatmulCounts()

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, layer: BitLinear) -> PackedBitLinear:
        """Quantize a (trained) BitLinear; ternarized in the layer's own dtype, as its forward does."""
        packed = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
        ternary, scale = ternarize(layer.weight)
        packed.ternary = ternary.to(torch.int8)  # exact: the values are -1, 0, 1
        packed.weight_scale = scale.detach().to(torch.float32).clone()
        if layer.bias is not None:
            packed.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
        return packed

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def ternary_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.ternary.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (self.in_features,), eps=EPS)
        levels, scale = quantize_activations(x)
        return rescale(ternary_product(levels, self.ternary, self.counts), self.weight_scale, scale, self.bias)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "packed_weight"] = pack_ternary(self.ternary)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "packed_weight"
        if key in state_dict:
            try:
                ternary = unpack_ternary(state_dict[key], self.weight_shape, torch.int8)
            except ValueError as exc:
                error_msgs.append(f"{key}: {exc}")
            else:
                with torch.no_grad():
                    self.ternary.copy_(ternary)
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in unexpected_keys:  # not a buffer of this module (it holds the int8 form): handled above
            unexpected_keys.remove(key)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def replace_bitlinears(model: nn.Module, make: Callable[[BitLinear], nn.Module]) -> nn.Module:
    """`model` with every BitLinear child replaced, in place, by make(child); a BitLinear shared by
    two parents stays shared."""
    replaced: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear):
                if id(child) not in replaced:
                    replaced[id(child)] = make(child)
                setattr(parent, name, replaced[id(child)])
    return model


def pack_model(model: nn.Module) -> nn.Module:
    """Deep copy of `model` with every BitLinear replaced by a PackedBitLinear of its weights."""
    if isinstance(model, BitLinear):
        return PackedBitLinear.from_bitlinear(model)
    return replace_bitlinears(copy.deepcopy(model), PackedBitLinear.from_bitlinear)


def packed_skeleton(model: nn.Module) -> nn.Module:
    """`model` itself with every BitLinear replaced by an empty PackedBitLinear of its shape, for
    `load_packed_into`: no copy of the model and no ternarization of placeholder weights (built
    under `bitlinear.placeholder_weights`, the model never allocates its fp32 latent weights)."""
    return replace_bitlinears(
        model, lambda layer: PackedBitLinear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    )


def matmul_counts(model: nn.Module) -> MatmulCounts:
    """Integer-kernel and fallback calls summed over the PackedBitLinear layers of `model`."""
    total = MatmulCounts()
    for layer in _packed_layers(model).values():
        total = total.add(layer.counts)
    return total


def held_weight_bytes(model: nn.Module) -> int:
    """Bytes of weight that the BitLinear layers of `model` hold in memory: a BitLinear's latent
    weight (4 per weight in fp32), a PackedBitLinear's int8 ternary weight and fp32 scale
    (1 per weight + 4 per layer). Biases are left out: both forms hold the same ones."""
    total = 0
    for module in model.modules():  # each shared module once
        if isinstance(module, BitLinear):
            tensors = [module.weight]
        elif isinstance(module, PackedBitLinear):
            tensors = [module.ternary, module.weight_scale]
        else:
            continue
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _packed_layers(model: nn.Module) -> dict[str, PackedBitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedBitLinear)}


def _is_kept_exact(key: str, module_of: dict[str, nn.Module]) -> bool:
    # Ternary weights are stored exactly (codes + fp32 scale); BitLinear's latent weight is
    # what gets packed, so rounding it would change the ternarization.
    owner = module_of.get(key.rsplit(".", 1)[0] if "." in key else "")
    leaf = key.rsplit(".", 1)[-1]
    return (isinstance(owner, PackedBitLinear) and leaf in ("packed_weight", "weight_scale")) or (
        isinstance(owner, BitLinear) and leaf == "weight"
    )


def _to_stored(key: str, value: torch.Tensor) -> torch.Tensor:
    stored = value.to(STORED_FLOAT_DTYPE)
    if bool(torch.isinf(stored).any()) and not bool(torch.isinf(value).any()):
        raise ValueError(f"tensor {key!r} exceeds the {STORED_FLOAT_DTYPE} range of the packed format")
    return stored


def round_to_stored(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose tensors are what `save_packed` stores: every floating
    tensor but the ternary (latent) weights rounded through fp16. The packed file loaded
    back computes exactly what this copy computes."""
    rounded = copy.deepcopy(model)
    modules = dict(rounded.named_modules())
    with torch.no_grad():
        for key, value in rounded.state_dict(keep_vars=True).items():
            if value.is_floating_point() and not _is_kept_exact(key, modules):
                value.copy_(_to_stored(key, value).to(value.dtype))
    return rounded


def save_packed(model: nn.Module, directory: str | Path, config: dict[str, Any]) -> Path:
    """Write `model` in packed form to `directory`; returns the weights file path.

    `model` may be the trained model (its BitLinears are packed on a copy) or the output
    of `pack_model`. `config` must be JSON-serialisable; it comes back from
    `read_packed_config` so the caller can rebuild the architecture. Tied tensors (one
    Parameter under two names) are stored once and restored to both names.
    """
    if any(isinstance(m, BitLinear) for m in model.modules()):
        model = pack_model(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_key: dict[int, str] = {}
    modules = dict(model.named_modules())
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in first_key:
            aliases[key] = first_key[id(value)]
            continue
        first_key[id(value)] = key
        value = value.detach().cpu()
        if value.is_floating_point() and not _is_kept_exact(key, modules):
            value = _to_stored(key, value)
        tensors[key] = value.contiguous()

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "weights_file": WEIGHTS_FILE,
        "float_dtype": str(STORED_FLOAT_DTYPE).removeprefix("torch."),
        "config": config,
        "packed_layers": {
            name: {"shape": list(layer.weight_shape), "bias": layer.bias is not None}
            for name, layer in _packed_layers(model).items()
        },
        "aliases": aliases,
    }
    json.dumps(manifest)  # a non-JSON config fails here, before anything is written
    weights_path = directory / WEIGHTS_FILE
    atomic_write_bytes(weights_path, save_safetensors(tensors, metadata={"format": FORMAT_NAME}))
    manifest["sha256"] = sha256_file(weights_path)
    # The manifest is written last: it carries the checksum, so a crash in between
    # leaves a directory that load refuses rather than a silently mismatched pair.
    atomic_write_json(directory / CONFIG_FILE, manifest, indent=2, sort_keys=True)
    return weights_path


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    manifest = read_json(path, lambda exc: ValueError(f"{path}: cannot read packed config ({exc})"))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a {FORMAT_NAME} config")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    for key, kind in (("config", dict), ("packed_layers", dict), ("aliases", dict), ("sha256", str)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    return manifest


def read_packed_config(directory: str | Path) -> dict[str, Any]:
    """The config dict given to `save_packed`, for rebuilding the architecture."""
    return _read_manifest(Path(directory))["config"]


def load_packed_into(packed_model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Load a `save_packed` directory into `packed_model` (built by `packed_skeleton` or `pack_model`);
    returns the config.

    Everything is validated before the model is touched: checksum, key sets, packed layer
    shapes and every tensor's shape. Any mismatch raises ValueError naming the file and key.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    config_path = directory / CONFIG_FILE
    weights_path = directory / WEIGHTS_FILE
    try:
        raw = weights_path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{weights_path}: cannot read packed weights ({exc})") from exc
    if hashlib.sha256(raw).hexdigest() != manifest["sha256"]:
        raise ValueError(
            f"{weights_path}: checksum mismatch with {config_path.name}; the file is corrupt or was modified"
        )
    try:
        stored = load_safetensors(raw)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    del raw  # the tensors are copies: drop the file's bytes before they are widened to the model's dtype

    layers = _packed_layers(packed_model)
    recorded = manifest["packed_layers"]
    for name in sorted(set(layers) ^ set(recorded)):
        where = "the model" if name in layers else config_path.name
        raise ValueError(f"{config_path}: packed layer {name!r} exists only in {where}")
    for name, layer in layers.items():
        if list(layer.weight_shape) != recorded[name].get("shape"):
            raise ValueError(
                f"{config_path}: packed layer {name!r} has shape {recorded[name].get('shape')}, "
                f"the model expects {list(layer.weight_shape)}"
            )

    expected = packed_model.state_dict()
    aliases = manifest["aliases"]
    for key, target in aliases.items():
        if key not in expected or target not in stored:
            raise ValueError(f"{config_path}: alias {key!r} -> {target!r} does not match the model or {WEIGHTS_FILE}")
        stored[key] = stored[target]
    check_stored_tensors(weights_path, expected, stored, "key")
    for key, value in expected.items():
        if key.endswith("packed_weight") and stored[key].dtype != torch.uint8:
            raise ValueError(f"{weights_path}: key {key!r} has dtype {stored[key].dtype}, expected torch.uint8")
        if stored[key].is_floating_point() != value.is_floating_point():
            raise ValueError(
                f"{weights_path}: key {key!r} has dtype {stored[key].dtype}, the model expects {value.dtype}"
            )
        stored[key] = stored[key].to(value.dtype)  # fp16 on disk, the model's dtype in memory
    packed_model.load_state_dict(stored, strict=True)
    return manifest["config"]


def _sizes(num_elements: int, fp32: int, fp16: int, packed: int) -> dict[str, int]:
    return {"num_elements": num_elements, "fp32_bytes": fp32, "fp16_bytes": fp16, "packed_bytes": packed}


def model_bytes_report(model: nn.Module) -> dict[str, Any]:
    """Model size in fp32, fp16 and packed form (works on a trained or a packed model).

    Counted from the state dict (parameters and persistent buffers; tied tensors once).
    BitLinear weights: 4 / 2 bytes per weight in fp32 / fp16; packed = 2 bits per weight
    (rounded up to whole bytes) + a 4-byte fp32 scale per layer. Everything else
    (embeddings, norms, biases, memory slots, ...) is counted at 4 / 2 bytes per element
    in fp32 / fp16 and at fp16 in the packed form (as `save_packed` writes them: the
    packed bytes equal the tensor data of its file); non-float tensors keep their own size.
    Returns {"total", "bitlinear", "other"}, each {"num_elements", "fp32_bytes",
    "fp16_bytes", "packed_bytes"}, plus "components" (the same per first-level child;
    "(root)" for tensors held by the model itself) and "compression_vs_fp32".
    """
    bitlinear_weights: dict[str, int] = {}  # state-dict key -> number of ternary weights
    skipped: set[str] = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, BitLinear):
            bitlinear_weights[prefix + "weight"] = module.weight.numel()
        elif isinstance(module, PackedBitLinear):
            bitlinear_weights[prefix + "packed_weight"] = module.in_features * module.out_features
            skipped.add(prefix + "weight_scale")  # counted with the packed weight

    def component(key: str) -> str:
        return key.split(".", 1)[0] if "." in key else "(root)"

    groups: dict[str, list[int]] = {}
    seen: set[int] = set()

    def add(group: str, counts: tuple[int, int, int, int]) -> None:
        totals = groups.setdefault(group, [0, 0, 0, 0])
        for i, c in enumerate(counts):
            totals[i] += c

    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen or key in skipped:
            continue
        seen.add(id(value))
        if key in bitlinear_weights:
            n = bitlinear_weights[key]
            counts = (n, 4 * n, 2 * n, packed_numel(n) + 4)
            kind = "bitlinear"
        else:
            n = value.numel()
            if value.is_floating_point():
                counts = (n, 4 * n, 2 * n, 2 * n)
            else:
                size = n * value.element_size()
                counts = (n, size, size, size)
            kind = "other"
        add(kind, counts)
        add("total", counts)
        add("component:" + component(key), counts)

    empty = (0, 0, 0, 0)
    total = _sizes(*groups.get("total", empty))
    return {
        "total": total,
        "bitlinear": _sizes(*groups.get("bitlinear", empty)),
        "other": _sizes(*groups.get("other", empty)),
        "components": {
            group.removeprefix("component:"): _sizes(*counts)
            for group, counts in groups.items()
            if group.startswith("component:")
        },
        "compression_vs_fp32": total["fp32_bytes"] / total["packed_bytes"] if total["packed_bytes"] else 1.0,
    }
