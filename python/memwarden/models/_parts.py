"""The placeable pieces of a model and the bytes of each tensor in a weight format.

A model is described as a list of ``Part``s (embeddings, each decoder layer's attention
and MLP or router, one part per routed expert, the head), each holding ``Tensor``s.
Every source (a transformers model built on the meta device, a GGUF header) produces
these; the planner and the estimator only read them. Imports nothing from memwarden but
the unit helpers, and nothing heavy.

Weight formats (``weight_format``), applied to the quantizable tensors (2-D projection
weights inside decoder layers: ``nn.Linear`` weights and fused expert tensors, routers
excluded); every other tensor (embeddings, head, router, norms, biases) stays in the
compute dtype:

* ``bfloat16``/``float16`` (2 bytes), ``float32`` (4 bytes): every tensor in that dtype.
* ``int8``: 1 byte per weight plus one fp32 scale per output row (per channel, as
  ``memwarden.quant``).
* ``int4``: half a byte plus one fp16 scale and one fp16 zero point per group of 128
  input weights (GPTQ/AWQ, group size 128).
* ``fp8``: 1 byte (e4m3) plus one fp32 scale per 128 x 128 block (the block-wise format
  of DeepSeek-V3's checkpoints and transformers' ``FineGrainedFP8Config``).
* ``mxfp4``: half a byte plus one E8M0 byte scale per 32 input weights (OCP MX, the
  format gpt-oss ships its experts in).

A tensor whose bytes a file fixes (GGUF's quantized blocks) carries ``stored_bytes`` and
keeps them whatever the format asked for.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Tensor", "Part", "weight_format", "FLOAT_BYTES", "QUANTIZED_FORMATS", "INT4_GROUP",
           "FP8_BLOCK", "MXFP4_BLOCK"]

FLOAT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
QUANTIZED_FORMATS = ("int8", "int4", "fp8", "mxfp4")
INT4_GROUP = 128
FP8_BLOCK = 128
MXFP4_BLOCK = 32

_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16", "torch.float16": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32", "torch.float32": "float32",
    "int8": "int8", "w8": "int8", "int4": "int4", "w4": "int4",
    "fp8": "fp8", "float8": "fp8", "fp8_e4m3": "fp8", "float8_e4m3fn": "fp8", "torch.float8_e4m3fn": "fp8",
    "mxfp4": "mxfp4",
}


def weight_format(dtype: Any, name: str = "dtype") -> str:
    """Canonical name of a weight format: bfloat16, float16, float32, int8, int4, fp8, mxfp4."""
    key = str(dtype).lower().strip()
    if key not in _ALIASES:
        raise ValueError(
            f"{name} must be one of bfloat16/bf16, float16/fp16, float32/fp32, int8, int4, fp8, mxfp4 "
            f"(or a torch float dtype), got {dtype!r}")
    return _ALIASES[key]


@dataclass(frozen=True)
class Tensor:
    """One parameter or buffer, or one expert's slice of a fused expert tensor."""

    name: str                      # full name; a slice of a fused tensor is "name[e]"
    shape: tuple                   # [out, in] for projections
    quantizable: bool = False      # a projection weight inside a decoder layer
    element_bytes: float | None = None   # fixed element size (buffers keep their dtype)
    stored_bytes: int | None = None      # exact bytes fixed by the file (GGUF)
    is_param: bool = True          # buffers count in bytes, not in parameters

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, fmt: str, compute_bytes: int, convert: bool = True) -> int:
        """Bytes of this tensor when the model's weights are in format ``fmt``
        (``convert=False``: a quantizable tensor the checkpoint left unquantized)."""
        if self.stored_bytes is not None:
            return self.stored_bytes
        if self.element_bytes is not None:
            return int(math.ceil(self.numel * self.element_bytes))
        if fmt in FLOAT_BYTES:
            return self.numel * FLOAT_BYTES[fmt]
        if not (self.quantizable and convert) or len(self.shape) < 2:
            return self.numel * compute_bytes
        out, inp = self.shape[-2], self.shape[-1]
        lead = math.prod(self.shape[:-2])
        if fmt == "int8":
            per = out * inp + out * 4
        elif fmt == "int4":
            per = (out * inp + 1) // 2 + out * math.ceil(inp / INT4_GROUP) * 4
        elif fmt == "fp8":
            per = out * inp + math.ceil(out / FP8_BLOCK) * math.ceil(inp / FP8_BLOCK) * 4
        elif fmt == "mxfp4":
            per = (out * inp + 1) // 2 + out * math.ceil(inp / MXFP4_BLOCK)
        else:
            raise ValueError(f"unknown weight format {fmt!r}")
        return lead * per


@dataclass
class Part:
    """One placeable piece of the model.

    ``modules`` are the names a ``device_map`` uses for this part: module paths of the
    transformers model (or GGUF tensor names), exact by construction. The parts of a
    layer's routed experts all name the fused experts module they are slices of.
    """

    name: str            # "embed", "layers.3.attn", "layers.3.mlp", "layers.3.moe", "layers.3.experts.17", "head"
    kind: str            # embed | attn | mlp | moe | expert | head
    layer: int           # -1 for embed, num_layers for head
    expert: int          # -1 unless kind == "expert"
    modules: tuple       # device_map keys this part covers
    tensors: tuple = field(repr=False, default=())
    params: int = 0
    bytes: int = 0

    @property
    def is_expert(self) -> bool:
        return self.expert >= 0

    def price(self, fmt: str, compute_bytes: int, keep: tuple = ()) -> None:
        """Fill ``params`` and ``bytes`` for weight format ``fmt``; tensors under the module
        patterns ``keep`` (a checkpoint's ``modules_to_not_convert``) stay in the compute dtype."""
        self.params = sum(t.numel for t in self.tensors if t.is_param)
        self.bytes = sum(t.nbytes(fmt, compute_bytes, convert=not (keep and _kept(t.name, keep)))
                         for t in self.tensors)


def _kept(name: str, patterns: tuple) -> bool:
    base = name.split("[")[0]
    return any(fnmatch.fnmatchcase(base, p) or fnmatch.fnmatchcase(base, p + ".*") for p in patterns)
