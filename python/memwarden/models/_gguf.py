"""GGUF (llama.cpp) model files: architecture facts and exact tensor sizes from the header.

``read_gguf(path)`` parses the header of a GGUF file (versions 2 and 3, either byte
order) with the standard library alone: the key/value metadata and the tensor infos
(name, dimensions, ggml type, offset). It reads the header bytes and nothing past
them, so a file whose tensor data is truncated, or only the first megabytes of a
download, still reads. The exact byte size of each tensor follows from its ggml type's
block size (``gguf.GGML_QUANT_SIZES`` when the ``gguf`` package is installed, the same
table built in otherwise). A split model (``name-00001-of-00003.gguf``) is read whole:
every shard's header, the first shard's metadata.

Why not ``gguf.GGUFReader``: it memory-maps the file and builds a numpy view of every
tensor's data (a truncated file fails there), and it turns every tokenizer string into
numpy arrays, several seconds for a 150k-token vocabulary. The tests check this reader
against ``GGUFReader`` on the files they write.

``gguf_parts(header)`` turns the tensors into memwarden's ``Part``s: ``embed``, per
layer ``layers.{i}.attn`` and ``layers.{i}.mlp`` (or ``layers.{i}.moe`` plus one
``layers.{i}.experts.{e}`` per routed expert, slices of the fused ``*_exps`` tensors),
then ``head``. Every tensor carries its bytes in the file as ``stored_bytes``.
"""
from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from memwarden.models._parts import Part, Tensor

__all__ = ["GGUFArray", "GGUFTensorInfo", "GGUFHeader", "read_gguf", "gguf_parts",
           "ggml_type_size", "HF_MODEL_TYPES"]

GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_NUMERIC_ARRAY = 4096      # longer numeric arrays (token scores) keep their length only

# GGUF value types: id -> (name, struct code or None for string/array)
_VALUE_TYPES = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
    4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
    8: ("string", None), 9: ("array", None), 10: ("uint64", "Q"), 11: ("int64", "q"),
    12: ("float64", "d"),
}

# ggml types: id -> (name, block size in weights, bytes per block). Used when the gguf
# package is not installed; with it, gguf.GGML_QUANT_SIZES is authoritative.
_QK_K = 256
_GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 2 + 2 + _QK_K // 16 + _QK_K // 4),
    11: ("Q3_K", 256, 2 + _QK_K // 4 + _QK_K // 8 + 12),
    12: ("Q4_K", 256, 2 + 2 + _QK_K // 2 + 12),
    13: ("Q5_K", 256, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
    14: ("Q6_K", 256, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
    15: ("Q8_K", 256, 4 + _QK_K + _QK_K // 8),
    16: ("IQ2_XXS", 256, 2 + _QK_K // 4), 17: ("IQ2_XS", 256, 2 + _QK_K // 4 + _QK_K // 32),
    18: ("IQ3_XXS", 256, 2 + _QK_K // 4 + _QK_K // 8),
    19: ("IQ1_S", 256, 2 + _QK_K // 8 + _QK_K // 16), 20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
    22: ("IQ2_S", 256, 2 + _QK_K // 4 + _QK_K // 16),
    23: ("IQ4_XS", 256, 2 + 2 + _QK_K // 2 + _QK_K // 64),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 2 + 4 * 13), 35: ("TQ2_0", 256, 2 + 64),
    39: ("MXFP4", 32, 17),
}

# general.file_type (llama_ftype) -> readable name, for when gguf is not installed.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 1024: "GUESSED",
}

# llama.cpp architecture -> Hugging Face model_type, where the correspondence is plain.
HF_MODEL_TYPES = {
    "llama": "llama", "llama4": "llama4", "mistral3": "mistral3", "qwen2": "qwen2",
    "qwen2moe": "qwen2_moe", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "qwen3next": "qwen3_next",
    "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "gemma3n": "gemma3n_text",
    "deepseek": "deepseek", "deepseek2": "deepseek_v3", "phi2": "phi", "phi3": "phi3",
    "phimoe": "phimoe", "gpt-oss": "gpt_oss", "gptoss": "gpt_oss", "olmo": "olmo",
    "olmo2": "olmo2", "olmoe": "olmoe", "starcoder2": "starcoder2", "falcon": "falcon",
    "gpt2": "gpt2", "gptj": "gptj", "gptneox": "gpt_neox", "bloom": "bloom", "mpt": "mpt",
    "stablelm": "stablelm", "command-r": "cohere", "cohere2": "cohere2", "dbrx": "dbrx",
    "granite": "granite", "granitemoe": "granitemoe", "exaone": "exaone", "nemotron": "nemotron",
    "internlm2": "internlm2", "minicpm": "minicpm", "glm4": "glm4", "glm4moe": "glm4_moe",
    "ernie4_5": "ernie4_5", "ernie4_5-moe": "ernie4_5_moe", "smollm3": "smollm3",
    "hunyuan-moe": "hunyuan_v1_moe", "hunyuan-dense": "hunyuan_v1_dense", "arcee": "arcee",
    "bailingmoe": "bailing_moe", "dots1": "dots1", "seed_oss": "seed_oss", "apertus": "apertus",
    "exaone4": "exaone4", "lfm2": "lfm2", "bert": "bert", "mamba": "mamba", "mamba2": "mamba2",
    "jamba": "jamba", "t5": "t5", "chatglm": "chatglm", "orion": "orion", "xverse": "xverse",
}


def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size, bytes per block), from gguf when installed."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except Exception:  # gguf not installed (or broken): the built-in table
        return _GGML_TYPES
    table = dict(_GGML_TYPES)
    for qtype, (block, size) in GGML_QUANT_SIZES.items():
        table[int(qtype)] = (qtype.name, int(block), int(size))
    return table


def _file_type_name(value: Any) -> Any:
    if not isinstance(value, int) or isinstance(value, bool):
        return value
    try:
        from gguf.constants import LlamaFileType
        name = LlamaFileType(value).name
        for prefix in ("MOSTLY_", "ALL_"):
            if name.startswith(prefix):
                name = name[len(prefix):]
        return name
    except Exception:
        return _FILE_TYPES.get(value, value)


def ggml_type_size(ggml_type: str | int) -> tuple[int, int]:
    """(block size in weights, bytes per block) of a ggml type, by name or id."""
    table = _ggml_types()
    if isinstance(ggml_type, int):
        if ggml_type not in table:
            raise ValueError(f"unknown ggml type id {ggml_type}")
        return table[ggml_type][1:]
    for name, block, size in table.values():
        if name == str(ggml_type).upper():
            return block, size
    raise ValueError(f"unknown ggml type {ggml_type!r}")


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array kept as its length only (tokenizer lists, long score arrays)."""

    type: str       # element type: "string", "float32", ...
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file, from its header."""

    name: str
    shape: tuple       # PyTorch order: GGUF's ne reversed ([in, out] -> (out, in))
    ggml_type: str     # "F32", "F16", "Q8_0", "Q4_K", ...
    nbytes: int        # exact bytes of its data in the file (padding excluded)
    offset: int = 0    # absolute offset of its data in its file
    shard: int = 0     # index into GGUFHeader.paths

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFHeader:
    """What a GGUF header says about a model."""

    path: str
    architecture: str
    name: str
    file_type: Any                     # "Q4_K_M", "F16", ... (the raw value when unknown, None when absent)
    metadata: dict = field(repr=False)
    config: dict = field(repr=False)
    tensors: list = field(repr=False)
    version: int = 3
    alignment: int = _DEFAULT_ALIGNMENT
    data_offset: int = 0               # start of the tensor data in the (first) file
    data_size: int = 0                 # tensor data bytes up to the last tensor's end (padding between
                                       # tensors included; summed over shards)
    paths: tuple = ()                  # every shard of a split model, in order

    @property
    def tensor_bytes(self) -> int:
        """Sum of the tensors' bytes (padding excluded)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors)


class _HeaderReader:
    """Sequential reads of a file's header through a growing window; never reads past need."""

    _CHUNK = 1 << 20

    def __init__(self, f, path: str):
        self.f = f
        self.path = path
        self.buf = b""
        self.base = 0      # file offset of buf[0]
        self.pos = 0       # position in buf
        self.order = "<"

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def _need(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            return
        rest = self.buf[self.pos:]
        self.base += self.pos
        self.pos = 0
        want = max(n - len(rest), self._CHUNK)
        more = self.f.read(want)
        self.buf = rest + more
        if len(self.buf) < n:
            raise ValueError(f"{self.path}: GGUF header truncated at byte {self.base + len(self.buf)}")

    def read(self, n: int) -> bytes:
        self._need(n)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            self.pos += n
            return
        target = self.offset + n
        self.f.seek(target)
        self.buf, self.base, self.pos = b"", target, 0

    def unpack(self, code: str, count: int = 1):
        fmt = self.order + (code * count if count > 1 else code)
        size = struct.calcsize(fmt)
        self._need(size)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out if count > 1 else out[0]

    def string(self) -> str:
        n = self.unpack("Q")
        return self.read(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.skip(self.unpack("Q"))

    def float32(self) -> float:
        """A float32 as the shortest decimal that rounds back to it (1e-05, not 9.99...e-06)."""
        raw = self.read(4)
        x = struct.unpack(self.order + "f", raw)[0]
        for digits in range(6, 10):
            y = float(f"{x:.{digits}g}")
            if struct.pack(self.order + "f", y) == raw:
                return y
        return x

    def value(self, vtype: int, key: str) -> Any:
        if vtype not in _VALUE_TYPES:
            raise ValueError(f"{self.path}: metadata key {key!r} has unknown value type {vtype}")
        tname, code = _VALUE_TYPES[vtype]
        if tname == "float32":
            return self.float32()
        if code is not None:
            return self.unpack(code)
        if tname == "string":
            return self.string()
        itype = self.unpack("I")
        n = self.unpack("Q")
        if itype not in _VALUE_TYPES:
            raise ValueError(f"{self.path}: metadata key {key!r} has arrays of unknown type {itype}")
        iname, icode = _VALUE_TYPES[itype]
        if icode is not None:
            size = struct.calcsize(icode)
            if n > _MAX_NUMERIC_ARRAY:
                self.skip(n * size)
                return GGUFArray(iname, n)
            return list(self.unpack(icode, n)) if n > 1 else ([self.unpack(icode)] if n else [])
        if iname == "string":
            for _ in range(n):
                self.skip_string()
            return GGUFArray("string", n)
        # nested arrays: keep their length only, skipping their contents
        for _ in range(n):
            self.value(itype, key)
        return GGUFArray("array", n)


def _read_one(path: str) -> tuple[dict, list, int, int, int]:
    """metadata, raw tensor infos [(name, ne, type_id, rel_offset)], version, alignment,
    data_offset."""
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file not found: {path}")
    with open(path, "rb", buffering=0) as f:
        r = _HeaderReader(f, path)
        try:
            magic = r.read(4)
        except ValueError:
            magic = b""
        if magic != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
        version = r.unpack("I")
        if version & 0xFFFF == 0:        # written in the other byte order
            r.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in _SUPPORTED_VERSIONS:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = r.unpack("Q", 2)
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.unpack("I")
            if key in metadata:
                raise ValueError(f"{path}: metadata key {key!r} appears twice")
            metadata[key] = r.value(vtype, key)
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("I")
            ne = r.unpack("Q", n_dims) if n_dims > 1 else ((r.unpack("Q"),) if n_dims else ())
            type_id = r.unpack("I")
            rel = r.unpack("Q")
            infos.append((name, tuple(ne), type_id, rel))
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{path}: general.alignment must be a power of two, got {alignment!r}")
        data_offset = -(-r.offset // alignment) * alignment
    return metadata, infos, version, alignment, data_offset


_SHARD = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _shard_paths(path: str, metadata: dict) -> list[str]:
    count = metadata.get("split.count", 1)
    if not isinstance(count, int) or count <= 1:
        return [path]
    m = _SHARD.match(os.path.basename(path))
    if m is None or int(m["count"]) != count:
        raise ValueError(f"{path}: split.count is {count}, but the name does not follow "
                         f"'<name>-NNNNN-of-{count:05d}.gguf', so the other shards cannot be found")
    folder = os.path.dirname(path)
    return [os.path.join(folder, f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read_gguf(path: str | os.PathLike) -> GGUFHeader:
    """Read a GGUF file's header (and its sibling shards' for a split model).

    Raises ValueError naming the path when the file is missing or not GGUF, and naming
    the key when a required one (``{arch}.block_count``, ``embedding_length``,
    ``attention.head_count``) is missing.
    """
    path = os.fspath(path)
    metadata, infos, version, alignment, data_offset = _read_one(path)
    paths = _shard_paths(path, metadata)
    shard_infos: list[tuple[int, list, int]] = []
    for i, p in enumerate(paths):
        if os.path.abspath(p) == os.path.abspath(path):
            meta_i, infos_i, off_i, align_i, version_i = metadata, infos, data_offset, alignment, version
        else:
            if not os.path.isfile(p):
                raise ValueError(f"{path}: shard {i + 1} of {len(paths)} is missing: {p}")
            meta_i, infos_i, version_i, align_i, off_i = _read_one(p)
        if i == 0:   # the first shard holds the model's metadata
            first = (meta_i, version_i, align_i, off_i)
        shard_infos.append((i, infos_i, off_i))
    metadata, version, alignment, data_offset = first

    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"{path}: missing metadata key 'general.architecture'")

    table = _ggml_types()
    tensors: list[GGUFTensorInfo] = []
    seen: set[str] = set()
    data_size = 0
    for shard, infos_i, off_i in shard_infos:
        end = 0
        for name, ne, type_id, rel in infos_i:
            if name in seen:
                raise ValueError(f"{path}: tensor {name!r} appears twice")
            seen.add(name)
            if type_id not in table:
                raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {type_id}")
            tname, block, bsize = table[type_id]
            numel = math.prod(ne)
            if ne and ne[0] % block:
                raise ValueError(f"{path}: tensor {name!r} has rows of {ne[0]} weights, "
                                 f"not a multiple of {tname}'s block of {block}")
            nbytes = numel // block * bsize
            tensors.append(GGUFTensorInfo(name=name, shape=tuple(reversed(ne)), ggml_type=tname,
                                          nbytes=nbytes, offset=off_i + rel, shard=shard))
            end = max(end, rel + nbytes)
        data_size += end

    header = GGUFHeader(
        path=path, architecture=arch,
        name=metadata.get("general.name") or os.path.splitext(os.path.basename(path))[0],
        file_type=_file_type_name(metadata.get("general.file_type")),
        metadata=metadata, config={}, tensors=tensors, version=version,
        alignment=alignment, data_offset=data_offset, data_size=data_size, paths=tuple(paths))
    header.config = _config(header)
    return header


def _config(h: GGUFHeader) -> dict:
    """A Hugging Face–style config from the ``{arch}.*`` keys."""
    arch, md = h.architecture, h.metadata

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{key}", default)

    for key in ("block_count", "embedding_length", "attention.head_count"):
        if f"{arch}.{key}" not in md:
            raise ValueError(f"{h.path}: missing metadata key '{arch}.{key}'")

    by_name = {t.name: t for t in h.tensors}
    names = set(by_name)
    n_experts = get("expert_count")
    model_type = HF_MODEL_TYPES.get(arch, arch)
    if arch == "llama" and isinstance(n_experts, int) and n_experts > 0:
        model_type = "mixtral"          # llama.cpp stores Mixtral as llama with experts
    if arch == "deepseek2":
        # V3 (and Kimi K2) route with sigmoid scores and a selection bias; V2 with softmax
        v3 = get("expert_gating_func") == 2 or any(n.endswith("exp_probs_b.bias") or
                                                   n.endswith("exp_probs_b") for n in names)
        model_type = "deepseek_v3" if v3 else "deepseek_v2"

    def scalar_or_list(v: Any) -> Any:
        if isinstance(v, list):
            return v[0] if v and all(x == v[0] for x in v) else v
        return v

    cfg: dict[str, Any] = {"model_type": model_type, "gguf_architecture": arch}
    cfg["hidden_size"] = get("embedding_length")
    cfg["num_hidden_layers"] = get("block_count")
    cfg["num_attention_heads"] = scalar_or_list(get("attention.head_count"))
    kv = get("attention.head_count_kv")
    cfg["num_key_value_heads"] = scalar_or_list(kv) if kv is not None else cfg["num_attention_heads"]

    head_dim = get("attention.key_length_mla", get("attention.key_length"))
    v_head_dim = get("attention.value_length_mla", get("attention.value_length"))
    heads = cfg["num_attention_heads"]
    if head_dim is None and isinstance(heads, int) and heads > 0:
        head_dim = cfg["hidden_size"] // heads      # llama.cpp's and transformers' default
    cfg["head_dim"] = head_dim
    if v_head_dim is not None:
        cfg["v_head_dim"] = v_head_dim

    ff = get("feed_forward_length")
    if ff is not None:
        cfg["intermediate_size"] = scalar_or_list(ff)

    vocab = get("vocab_size")
    if vocab is None and "token_embd.weight" in by_name:
        vocab = by_name["token_embd.weight"].shape[0]
    if vocab is None and "tokenizer.ggml.tokens" in md:
        vocab = len(md["tokenizer.ggml.tokens"])
    cfg["vocab_size"] = vocab

    optional = {
        "max_position_embeddings": "context_length",
        "sliding_window": "attention.sliding_window",
        "sliding_window_pattern": "attention.sliding_window_pattern",
        "num_experts": "expert_count",
        "num_experts_per_tok": "expert_used_count",
        "moe_intermediate_size": "expert_feed_forward_length",
        "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
        "num_shared_experts": "expert_shared_count",
        "first_k_dense_replace": "leading_dense_block_count",
        "kv_lora_rank": "attention.kv_lora_rank",
        "q_lora_rank": "attention.q_lora_rank",
        "rope_dimension_count": "rope.dimension_count",
        "rope_theta": "rope.freq_base",
        "rms_norm_eps": "attention.layer_norm_rms_epsilon",
        "layer_norm_eps": "attention.layer_norm_epsilon",
        "attn_logit_softcapping": "attn_logit_softcapping",
        "final_logit_softcapping": "final_logit_softcapping",
        "n_group": "expert_group_count",
        "topk_group": "expert_group_used_count",
        "routed_scaling_factor": "expert_weights_scale",
        "num_nextn_predict_layers": "nextn_predict_layers",
    }
    for hf_key, gguf_key in optional.items():
        v = get(gguf_key)
        if v is not None and not isinstance(v, GGUFArray):
            cfg[hf_key] = v
    if cfg.get("num_experts") is not None and model_type in ("mixtral", "gpt_oss", "phimoe"):
        cfg["num_local_experts"] = cfg["num_experts"]
    if arch == "deepseek2" and "rope_dimension_count" in cfg:
        cfg["qk_rope_head_dim"] = cfg["rope_dimension_count"]
        if isinstance(head_dim, int):
            cfg["qk_nope_head_dim"] = head_dim - cfg["rope_dimension_count"]
    cfg["tie_word_embeddings"] = "output.weight" not in names
    return cfg


# ---------------------------------------------------------------------------- parts

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_HEAD = ("output.", "output_norm.")
_FFN_PREFIXES = ("ffn_", "exp_probs_b", "post_ffw_norm", "pre_ffw_norm", "channel_mix_",
                 "layer_output_norm", "layer_out_norm")
_ROUTERS = ("ffn_gate_inp",)


def _base(rest: str) -> str:
    """'ffn_up_exps.weight' -> 'ffn_up_exps'."""
    return rest.rsplit(".", 1)[0] if rest.endswith((".weight", ".bias", ".scale")) else rest


def _is_ffn(rest: str) -> bool:
    return rest.startswith(_FFN_PREFIXES)


def _is_quantizable(rest: str, shape: tuple) -> bool:
    return len(shape) >= 2 and not _base(rest).startswith(_ROUTERS)


def gguf_parts(header: GGUFHeader) -> list[Part]:
    """The model's placeable parts, every tensor carrying its exact bytes in the file."""
    n_experts = header.config.get("num_experts") or 0
    embed: list[GGUFTensorInfo] = []
    head: list[GGUFTensorInfo] = []
    layers: dict[int, list[tuple[str, GGUFTensorInfo]]] = {}
    for t in header.tensors:
        m = _BLK.match(t.name)
        if m:
            layers.setdefault(int(m[1]), []).append((m[2], t))
        elif t.name.startswith(_HEAD) or t.name in ("output", "output_norm"):
            head.append(t)
        else:
            embed.append(t)

    def plain(t: GGUFTensorInfo, quantizable: bool = False) -> Tensor:
        return Tensor(name=t.name, shape=tuple(t.shape), quantizable=quantizable, stored_bytes=t.nbytes)

    def make(name: str, kind: str, layer: int, tensors: tuple, modules: tuple, expert: int = -1) -> Part:
        p = Part(name=name, kind=kind, layer=layer, expert=expert, modules=modules, tensors=tensors)
        p.price("bfloat16", 2)      # stored_bytes fix every tensor's bytes whatever the format
        return p

    parts = [make("embed", "embed", -1, tuple(plain(t) for t in embed), tuple(t.name for t in embed))]
    n_layers = max([header.config["num_hidden_layers"]] + [i + 1 for i in layers])
    for i in range(n_layers):
        items = layers.get(i, [])
        attn = [(rest, t) for rest, t in items if not _is_ffn(rest)]
        ffn = [(rest, t) for rest, t in items if _is_ffn(rest)]
        if attn:
            parts.append(make(f"layers.{i}.attn", "attn", i,
                              tuple(plain(t, _is_quantizable(rest, t.shape)) for rest, t in attn),
                              tuple(t.name for _, t in attn)))
        fused = [(rest, t) for rest, t in ffn if _base(rest).endswith("_exps")
                 and len(t.shape) >= 2 and (t.shape[0] == n_experts or not n_experts)]
        if not fused:
            if ffn:
                parts.append(make(f"layers.{i}.mlp", "mlp", i,
                                  tuple(plain(t, _is_quantizable(rest, t.shape)) for rest, t in ffn),
                                  tuple(t.name for _, t in ffn)))
            continue
        n_e = fused[0][1].shape[0]
        for rest, t in fused:
            if t.shape[0] != n_e or t.nbytes % n_e:
                raise ValueError(f"{header.path}: expert tensor {t.name!r} of shape {t.shape} "
                                 f"does not split into {n_e} experts")
        fused_names = {t.name for _, t in fused}
        shared = [(rest, t) for rest, t in ffn if t.name not in fused_names]
        parts.append(make(f"layers.{i}.moe", "moe", i,
                          tuple(plain(t, _is_quantizable(rest, t.shape)) for rest, t in shared),
                          tuple(t.name for _, t in shared)))
        modules = tuple(t.name for _, t in fused)
        for e in range(n_e):
            tensors = tuple(
                Tensor(name=f"{t.name}[{e}]", shape=tuple(t.shape[1:]),
                       quantizable=len(t.shape) >= 3, stored_bytes=t.nbytes // n_e)
                for _, t in fused)
            parts.append(make(f"layers.{i}.experts.{e}", "expert", i, tensors, modules, expert=e))
    head.sort(key=lambda t: (not t.name.startswith("output_norm"), t.name))
    parts.append(make("head", "head", n_layers, tuple(plain(t) for t in head), tuple(t.name for t in head)))
    return parts
