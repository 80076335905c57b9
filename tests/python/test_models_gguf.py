"""memwarden.models._gguf: GGUF headers into config facts, exact tensor bytes and parts."""
from __future__ import annotations

import ast
import math
import os

import pytest

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

import gguf_files  # noqa: E402  (tests/python, on sys.path via conftest)
from memwarden.models import _gguf  # noqa: E402
from memwarden.models._gguf import GGUFArray, gguf_parts, read_gguf  # noqa: E402

# ggml block sizes, by hand: (weights per block, bytes per block)
HAND_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 2 + 32), "Q4_0": (32, 2 + 16),
               "Q4_K": (256, 144)}


def hand_bytes(shape, qtype: str) -> int:
    n = math.prod(shape)
    block, size = HAND_BLOCKS[qtype]
    assert n % block == 0
    return n // block * size


def padded(n: int, align: int = 32) -> int:
    return -(-n // align) * align


@pytest.fixture
def llama(tmp_path):
    return gguf_files.write_llama(str(tmp_path / "llama.gguf"))


@pytest.fixture
def moe(tmp_path):
    return gguf_files.write_moe(str(tmp_path / "moe.gguf"))


@pytest.fixture
def moe_shared(tmp_path):
    return gguf_files.write_moe(str(tmp_path / "moe2.gguf"), shared_expert=True)


@pytest.fixture
def tied(tmp_path):
    return gguf_files.write_tied(str(tmp_path / "tied-small.gguf"))


ALL = ["llama", "moe", "moe_shared", "tied"]


# ------------------------------------------------------------------ header and config

@pytest.mark.parametrize("which", ALL)
def test_config_facts_equal_what_was_written(which, request):
    spec = request.getfixturevalue(which)
    h = read_gguf(spec.path)
    assert h.architecture == spec.arch
    assert h.config["gguf_architecture"] == spec.arch
    for key, want in spec.facts.items():
        if key in ("name", "file_type", "n_tokens", "n_merges"):
            continue
        assert h.config.get(key) == want, key


def test_llama_header_fields(llama):
    h = read_gguf(llama.path)
    assert h.name == "Tiny Llama Test"
    assert h.file_type == "Q8_0"
    assert h.version == 3 and h.alignment == 32
    assert h.config["rms_norm_eps"] == 1e-5          # float32 shown as the decimal written
    assert h.config["rope_dimension_count"] == 16
    md = h.metadata
    # string arrays keep their length only
    assert md["tokenizer.ggml.tokens"] == GGUFArray("string", 256)
    assert len(md["tokenizer.ggml.merges"]) == 512
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.ggml.bos_token_id"] == 1
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert md["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert md["llama.attention.head_count_kv"] == 2


def test_tied_file_falls_back_to_stem_and_token_embd_rows(tied):
    h = read_gguf(tied.path)
    assert h.name == "tied-small"                      # no general.name
    assert "qwen3.vocab_size" not in h.metadata
    assert h.config["vocab_size"] == 160               # token_embd rows
    assert h.config["tie_word_embeddings"] is True
    assert h.config["num_key_value_heads"] == [2, 1]   # a per-layer array stays a list


def test_mixtral_and_deepseek_model_types(tmp_path):
    Q = gguf.GGMLQuantizationType
    base = {"block_count": 1, "embedding_length": 64, "attention.head_count": 4}
    p = str(tmp_path / "mixtral.gguf")
    gguf_files.write_gguf(p, "llama", {f"llama.{k}": v for k, v in {**base, "expert_count": 8}.items()},
                          [("token_embd.weight", (32, 64), Q.F16)])
    h = read_gguf(p)
    assert h.config["model_type"] == "mixtral" and h.config["num_local_experts"] == 8
    # deepseek2 with MLA: *_mla lengths are the real head dims; sigmoid gating = V3
    kv = {**base, "expert_count": 4, "expert_gating_func": 2, "attention.kv_lora_rank": 32,
          "attention.q_lora_rank": 48, "attention.key_length": 48, "attention.value_length": 32,
          "attention.key_length_mla": 24, "attention.value_length_mla": 16, "rope.dimension_count": 8,
          "leading_dense_block_count": 1}
    p = str(tmp_path / "ds.gguf")
    gguf_files.write_gguf(p, "deepseek2", {f"deepseek2.{k}": v for k, v in kv.items()},
                          [("token_embd.weight", (32, 64), Q.F16)])
    c = read_gguf(p).config
    assert c["model_type"] == "deepseek_v3"
    assert (c["head_dim"], c["v_head_dim"], c["qk_rope_head_dim"], c["qk_nope_head_dim"]) == (24, 16, 8, 16)
    assert (c["kv_lora_rank"], c["q_lora_rank"], c["first_k_dense_replace"]) == (32, 48, 1)


# ------------------------------------------------------------------ tensors and bytes

@pytest.mark.parametrize("which", ALL)
def test_tensor_shapes_types_and_bytes_by_hand(which, request):
    spec = request.getfixturevalue(which)
    h = read_gguf(spec.path)
    assert [t.name for t in h.tensors] == [n for n, _, _ in spec.tensors]
    for t, (name, shape, qtype) in zip(h.tensors, spec.tensors):
        assert t.shape == shape, name              # PyTorch order
        assert t.ggml_type == qtype, name
        assert t.nbytes == hand_bytes(shape, qtype), name


def test_a_few_sizes_spelled_out(llama, moe):
    by = {t.name: t for t in read_gguf(llama.path).tensors}
    assert by["blk.0.attn_q.weight"].nbytes == 64 * 64 // 32 * 34          # Q8_0
    assert by["blk.0.ffn_gate.weight"].nbytes == 128 * 64 // 32 * 18       # Q4_0
    assert by["token_embd.weight"].nbytes == 256 * 64 * 2                  # F16
    assert by["blk.0.attn_norm.weight"].nbytes == 64 * 4                   # F32
    by = {t.name: t for t in read_gguf(moe.path).tensors}
    t = by["blk.1.ffn_down_exps.weight"]
    assert t.shape == (4, 64, 32)                                          # ne = [32, 64, 4]
    assert t.nbytes == 4 * 64 * 32 // 32 * 34


@pytest.mark.parametrize("which", ALL)
def test_agrees_with_gguf_reader(which, request):
    spec = request.getfixturevalue(which)
    h = read_gguf(spec.path)
    r = gguf.GGUFReader(spec.path)
    assert h.data_offset == r.data_offset
    assert len(h.tensors) == len(r.tensors)
    for mine, theirs in zip(h.tensors, r.tensors):
        assert mine.name == theirs.name
        assert mine.shape == tuple(reversed([int(d) for d in theirs.shape]))
        assert mine.ggml_type == theirs.tensor_type.name
        assert mine.nbytes == theirs.n_bytes
        assert mine.offset == theirs.data_offset
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        mine = h.metadata[key]
        if isinstance(mine, GGUFArray):
            assert len(f.data) == mine.length
        elif isinstance(mine, float):
            assert mine == pytest.approx(f.contents(), rel=1e-6)
        else:
            assert mine == f.contents(), key


@pytest.mark.parametrize("which", ALL)
def test_total_bytes_equal_the_files_tensor_data(which, request):
    spec = request.getfixturevalue(which)
    h = read_gguf(spec.path)
    parts = gguf_parts(h)
    expected = sum(hand_bytes(s, q) for _, s, q in spec.tensors)
    assert sum(p.bytes for p in parts) == expected == h.tensor_bytes
    assert sum(p.params for p in parts) == sum(math.prod(s) for _, s, _ in spec.tensors) == h.num_params
    # the data section is the tensors back to back, each padded to the alignment
    assert os.path.getsize(spec.path) == h.data_offset + sum(padded(hand_bytes(s, q)) for _, s, q in spec.tensors)
    # every tensor lands in exactly one part
    covered = [t.name.split("[")[0] for p in parts for t in p.tensors]
    assert sorted(set(covered)) == sorted(n for n, _, _ in spec.tensors)


# ------------------------------------------------------------------ parts

def test_llama_parts_order_kinds_layers(llama):
    parts = gguf_parts(read_gguf(llama.path))
    assert [p.name for p in parts] == ["embed", "layers.0.attn", "layers.0.mlp", "layers.1.attn",
                                       "layers.1.mlp", "layers.2.attn", "layers.2.mlp", "head"]
    assert [p.kind for p in parts] == ["embed"] + ["attn", "mlp"] * 3 + ["head"]
    assert [p.layer for p in parts] == [-1, 0, 0, 1, 1, 2, 2, 3]
    assert all(p.expert == -1 for p in parts)
    by = {p.name: p for p in parts}
    assert by["embed"].modules == ("token_embd.weight", "rope_freqs.weight")
    assert by["head"].modules == ("output_norm.weight", "output.weight")
    assert by["layers.1.attn"].modules == tuple(f"blk.1.{n}.weight" for n in
                                                ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"))
    assert by["layers.1.mlp"].modules == tuple(f"blk.1.{n}.weight" for n in
                                               ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down"))
    # bytes by hand: layer 0 attention Q8_0 q/k/v, Q4_0 output, F32 norm
    assert by["layers.0.attn"].bytes == (64 * 4 + hand_bytes((64, 64), "Q8_0") + 2 * hand_bytes((32, 64), "Q8_0")
                                         + hand_bytes((64, 64), "Q4_0"))
    assert by["layers.2.attn"].bytes == 64 * 4 + 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64)   # F16
    # the stored bytes win whatever weight format the part is priced in
    p = by["layers.0.mlp"]
    before = p.bytes
    p.price("float32", 4)
    assert p.bytes == before
    # quantizable: 2-D weights inside blocks; norms, embeddings, head not
    q = {t.name: t.quantizable for part in parts for t in part.tensors}
    assert q["blk.0.attn_q.weight"] and q["blk.0.ffn_down.weight"]
    assert not q["blk.0.attn_norm.weight"] and not q["blk.0.ffn_norm.weight"]
    assert not q["token_embd.weight"] and not q["output.weight"]


def test_moe_parts_and_expert_slices(moe):
    h = read_gguf(moe.path)
    parts = gguf_parts(h)
    names = ["embed"]
    for i in range(2):
        names += [f"layers.{i}.attn", f"layers.{i}.moe"] + [f"layers.{i}.experts.{e}" for e in range(4)]
    names.append("head")
    assert [p.name for p in parts] == names
    assert [p.kind for p in parts] == ["embed"] + (["attn", "moe"] + ["expert"] * 4) * 2 + ["head"]
    assert [p.expert for p in parts if p.kind == "expert"] == [0, 1, 2, 3] * 2
    assert [p.layer for p in parts] == [-1] + [0] * 6 + [1] * 6 + [2]
    by = {p.name: p for p in parts}
    assert "blk.0.attn_q_norm.weight" in by["layers.0.attn"].modules
    assert by["layers.0.moe"].modules == ("blk.0.ffn_norm.weight", "blk.0.ffn_gate_inp.weight")
    router = {t.name: t for t in by["layers.0.moe"].tensors}["blk.0.ffn_gate_inp.weight"]
    assert router.shape == (4, 64) and not router.quantizable
    fused = ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight")
    experts = [by[f"layers.0.experts.{e}"] for e in range(4)]
    for e, p in enumerate(experts):
        assert p.modules == fused
        assert [t.name for t in p.tensors] == [f"{n}[{e}]" for n in fused]
        assert [t.shape for t in p.tensors] == [(32, 64), (32, 64), (64, 32)]
        assert all(t.quantizable for t in p.tensors)
        assert p.bytes == 3 * hand_bytes((32, 64), "Q8_0")
    # the slices add up to the fused tensors
    sizes = {t.name: t for t in h.tensors}
    for k, name in enumerate(fused):
        assert sum(p.tensors[k].stored_bytes for p in experts) == sizes[name].nbytes == hand_bytes(sizes[name].shape, "Q8_0")
        assert sum(p.tensors[k].numel for p in experts) == sizes[name].numel


def test_shared_expert_goes_with_the_router(moe_shared):
    by = {p.name: p for p in gguf_parts(read_gguf(moe_shared.path))}
    assert by["layers.1.moe"].modules == tuple(f"blk.1.{n}.weight" for n in (
        "ffn_norm", "ffn_gate_inp", "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"))
    q = {t.name: t.quantizable for t in by["layers.1.moe"].tensors}
    assert q["blk.1.ffn_up_shexp.weight"] and not q["blk.1.ffn_gate_inp_shexp.weight"]
    assert by["layers.1.moe"].bytes == 64 * 4 + 4 * 64 * 4 + 64 * 4 + 3 * hand_bytes((64, 64), "Q8_0")


def test_tied_has_a_head_of_just_the_norm(tied):
    parts = gguf_parts(read_gguf(tied.path))
    assert parts[-1].name == "head" and parts[-1].layer == 2
    assert parts[-1].modules == ("output_norm.weight",)
    assert parts[-1].bytes == 64 * 4


def test_expert_biases_are_sliced_too(tmp_path):
    """gpt-oss stores per-expert biases as 2-D *_exps.bias tensors (ne = [ff, n_expert])."""
    Q = gguf.GGMLQuantizationType
    p = str(tmp_path / "gptoss.gguf")
    kv = {"gpt-oss.block_count": 1, "gpt-oss.embedding_length": 64, "gpt-oss.attention.head_count": 4,
          "gpt-oss.expert_count": 2, "gpt-oss.expert_used_count": 1}
    gguf_files.write_gguf(p, "gpt-oss", kv, [
        ("token_embd.weight", (32, 64), Q.F16),
        ("blk.0.attn_sinks.weight", (4,), Q.F32),
        ("blk.0.post_attention_norm.weight", (64,), Q.F32),
        ("blk.0.ffn_gate_inp.weight", (2, 64), Q.F32),
        ("blk.0.ffn_gate_inp.bias", (2,), Q.F32),
        ("blk.0.ffn_up_exps.weight", (2, 64, 64), Q.Q8_0),
        ("blk.0.ffn_up_exps.bias", (2, 64), Q.F32),
        ("output_norm.weight", (64,), Q.F32),
    ])
    h = read_gguf(p)
    assert h.config["model_type"] == "gpt_oss"
    by = {q.name: q for q in gguf_parts(h)}
    assert set(by) == {"embed", "layers.0.attn", "layers.0.moe", "layers.0.experts.0", "layers.0.experts.1", "head"}
    assert "blk.0.post_attention_norm.weight" in by["layers.0.attn"].modules
    e1 = {t.name: t for t in by["layers.0.experts.1"].tensors}
    assert e1["blk.0.ffn_up_exps.bias[1]"].shape == (64,) and e1["blk.0.ffn_up_exps.bias[1]"].stored_bytes == 256
    assert not e1["blk.0.ffn_up_exps.bias[1]"].quantizable
    assert e1["blk.0.ffn_up_exps.weight[1]"].stored_bytes == hand_bytes((64, 64), "Q8_0")


# ------------------------------------------------------------------ no tensor data is read

def test_header_only_and_truncated_files_still_read(llama, tmp_path):
    full = read_gguf(llama.path)
    data = open(llama.path, "rb").read()
    for cut in (full.data_offset, full.data_offset + 1000):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        h = read_gguf(str(p))
        assert h.tensors == full.tensors
        assert h.config == full.config
        assert sum(q.bytes for q in gguf_parts(h)) == sum(q.bytes for q in gguf_parts(full))
        # the check is real: gguf.GGUFReader builds views of the data and fails here
        with pytest.raises(ValueError):
            gguf.GGUFReader(str(p))


def test_header_claiming_gigabytes_reads_from_kilobytes(tmp_path):
    """Tensor infos without data: an 8B-model-sized embedding and a Q4_K projection."""
    p = str(tmp_path / "big.gguf")
    w = gguf.GGUFWriter(p, "llama")
    w.add_block_count(1)
    w.add_embedding_length(4096)
    w.add_head_count(32)
    w.add_tensor_info("token_embd.weight", (128256, 4096), np.dtype(np.float16), 128256 * 4096 * 2)
    w.add_tensor_info("blk.0.attn_q.weight", (4096, 4096 // 256 * 144), np.dtype(np.uint8),
                      4096 * 4096 // 256 * 144, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    assert os.path.getsize(p) < 4096
    h = read_gguf(p)
    by = {t.name: t for t in h.tensors}
    assert by["token_embd.weight"].nbytes == 128256 * 4096 * 2
    assert by["blk.0.attn_q.weight"].shape == (4096, 4096)
    assert by["blk.0.attn_q.weight"].nbytes == hand_bytes((4096, 4096), "Q4_K")
    assert h.config["vocab_size"] == 128256 and h.config["head_dim"] == 128


def test_truncated_header_is_a_value_error(llama, tmp_path):
    full = read_gguf(llama.path)
    p = tmp_path / "cut.gguf"
    p.write_bytes(open(llama.path, "rb").read()[:full.data_offset // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf(str(p))


# ------------------------------------------------------------------ split models

def test_split_model_reads_every_shard(tmp_path, llama):
    spec = gguf_files.write_split_llama(str(tmp_path / "split"))
    assert len(spec.paths) == 3 and all(os.path.isfile(p) for p in spec.paths)
    whole = read_gguf(llama.path)
    for entry in (spec.paths[0], spec.paths[1]):
        h = read_gguf(entry)
        assert h.paths == tuple(spec.paths)
        assert [(t.name, t.shape, t.ggml_type, t.nbytes) for t in h.tensors] == \
               [(t.name, t.shape, t.ggml_type, t.nbytes) for t in whole.tensors]
        assert h.config == whole.config
        assert [t.shard for t in h.tensors] == [0] * 12 + [1] * 12 + [2] * 7
        assert [(q.name, q.bytes) for q in gguf_parts(h)] == [(q.name, q.bytes) for q in gguf_parts(whole)]
    os.remove(spec.paths[2])
    with pytest.raises(ValueError, match="shard 3 of 3"):
        read_gguf(spec.paths[0])


# ------------------------------------------------------------------ errors

def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ValueError, match="nothere.gguf"):
        read_gguf(str(tmp_path / "nothere.gguf"))
    with pytest.raises(ValueError, match=str(tmp_path)):
        read_gguf(str(tmp_path))


@pytest.mark.parametrize("content", [b"", b"GG", b'{"model_type": "llama"}\n', b"\x00" * 64])
def test_not_gguf(tmp_path, content):
    p = tmp_path / "config.json"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=r"config\.json is not a GGUF file"):
        read_gguf(str(p))


def test_unsupported_version(llama, tmp_path):
    data = bytearray(open(llama.path, "rb").read())
    data[4:8] = (1).to_bytes(4, "little")
    p = tmp_path / "v1.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="version 1"):
        read_gguf(str(p))


@pytest.mark.parametrize("missing", ["block_count", "embedding_length", "attention.head_count"])
def test_missing_required_key(tmp_path, missing):
    kv = {"block_count": 1, "embedding_length": 64, "attention.head_count": 4}
    del kv[missing]
    p = str(tmp_path / "m.gguf")
    gguf_files.write_gguf(p, "llama", {f"llama.{k}": v for k, v in kv.items()},
                          [("token_embd.weight", (32, 64), gguf.GGMLQuantizationType.F16)])
    with pytest.raises(ValueError, match=f"llama.{missing}"):
        read_gguf(p)


def test_big_endian_file(tmp_path):
    p = str(tmp_path / "be.gguf")
    w = gguf.GGUFWriter(p, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv([4, 2])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tensor("token_embd.weight", np.zeros((32, 64), np.float16))
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(np.zeros((64, 64), np.float32),
                 gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = read_gguf(p)
    assert h.config["num_key_value_heads"] == [4, 2] and h.config["rms_norm_eps"] == 1e-6
    assert [(t.shape, t.nbytes) for t in h.tensors] == [((32, 64), 32 * 64 * 2), ((64, 64), hand_bytes((64, 64), "Q8_0"))]


def test_reads_without_the_gguf_package(llama, monkeypatch):
    """gguf is optional: the built-in block table and file-type names stand in."""
    import sys
    with_gguf = read_gguf(llama.path)
    for mod in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    h = read_gguf(llama.path)
    assert h.tensors == with_gguf.tensors and h.file_type == "Q8_0" and h.config == with_gguf.config


# ------------------------------------------------------------------ module hygiene

def test_builtin_block_table_matches_gguf():
    sizes = gguf.GGML_QUANT_SIZES
    for type_id, (name, block, size) in _gguf._GGML_TYPES.items():
        qtype = gguf.GGMLQuantizationType(type_id)
        assert qtype.name == name
        assert sizes[qtype] == (block, size), name
    assert _gguf.ggml_type_size("q8_0") == (32, 34)


def test_module_imports_only_the_standard_library():
    tree = ast.parse(open(_gguf.__file__).read())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module)
    assert top <= {"__future__", "math", "os", "re", "struct", "dataclasses", "typing",
                   "memwarden.models._parts"}, top
