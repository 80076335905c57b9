"""memwarden.kv.ops.paged_attention against a brute-force float64 reference
(kv_reference.paged_attention: dequantized context, softmax per sequence)."""
import itertools

import pytest
import torch
from torch.library import opcheck

import kv_reference as R
from memwarden.kv import ops

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KV_DTYPES = ["auto", "int8", "int8_per_token_head"]
# Output rounding of each dtype (the reference is float64, the kernel accumulates in float32).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_paged(num_seqs, seq_lens, num_kv_heads, head_size, block_size, dtype, kv_cache_dtype="auto",
               layout="NHD", device="cpu", seed=0, spare_blocks=3):
    """Random caches with the sequences' pages in shuffled blocks; returns a dict of the
    op's cache arguments (caches, block_tables, seq_lens, scales)."""
    g = torch.Generator().manual_seed(seed)
    pages = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(pages) + spare_blocks
    max_blocks = max(pages + [1])
    order = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(num_seqs, max_blocks, dtype=torch.int32)
    used = 0
    for s, n in enumerate(pages):
        table[s, :n] = order[used:used + n].int()
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_size)

    def cache():
        if kv_cache_dtype == "auto":
            t = torch.randn(shape, generator=g).to(dtype)
        else:
            t = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        if layout == "HND":
            t = t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        return t.to(device)

    args = dict(key_cache=cache(), value_cache=cache(), block_tables=table.to(device),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device))
    if kv_cache_dtype == "int8":
        args["k_scale"] = (torch.rand(num_kv_heads, generator=g) * 0.02 + 0.005).to(device)
        args["v_scale"] = (torch.rand(num_kv_heads, generator=g) * 0.02 + 0.005).to(device)
    elif kv_cache_dtype == "int8_per_token_head":
        args["k_scale_cache"] = (torch.rand(shape[:3], generator=g) * 0.02 + 0.001).to(device)
        args["v_scale_cache"] = (torch.rand(shape[:3], generator=g) * 0.02 + 0.001).to(device)
    return args


def check(query, paged, kv_cache_dtype="auto", **options):
    out, lse = ops.paged_attention(query, kv_cache_dtype=kv_cache_dtype, return_lse=True, **paged, **options)
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in {**paged, **options}.items()}
    want, want_lse = R.paged_attention(query.cpu(), kv_cache_dtype=kv_cache_dtype, **cpu)
    tol = TOLERANCE[query.dtype]
    assert out.shape == query.shape and out.dtype == query.dtype
    torch.testing.assert_close(out.cpu().float(), want.float(), atol=tol, rtol=tol)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu()[finite], want_lse[finite], atol=1e-4, rtol=1e-4)
    return out, lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,kv_cache_dtype,layout,head_size",
                         list(itertools.product(DTYPES, KV_DTYPES, ["NHD", "HND"], [64, 80, 96, 128, 256])))
def test_decode_matches_reference(device, dtype, kv_cache_dtype, layout, head_size):
    lens = [1, 37, 16, 70]
    paged = make_paged(4, lens, 2, head_size, 16, dtype, kv_cache_dtype, layout, device)
    query = torch.randn(4, 8, head_size).to(dtype).to(device)  # 8 heads on 2 kv heads
    check(query, paged, kv_cache_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (7, 1), (32, 8), (40, 2)])
@pytest.mark.parametrize("block_size", [1, 5, 16, 32])
def test_grouped_query_heads_and_block_sizes(device, heads, kv_heads, block_size):
    lens = [3, 50, 17]
    paged = make_paged(3, lens, kv_heads, 32, block_size, torch.float32, device=device, seed=block_size)
    check(torch.randn(3, heads, 32, device=device), paged)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
@pytest.mark.parametrize("threads", [1, 4])
def test_long_context_split_into_partitions(device, kv_cache_dtype, threads):
    # One sequence, one kv head: too few work items, so the CPU splits the context into
    # partitions merged by log-sum-exp; the result must not depend on the split.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        paged = make_paged(1, [5000], 1, 64, 16, torch.float16, kv_cache_dtype, device=device)
        query = torch.randn(1, 4, 64).half().to(device)
        check(query, paged, kv_cache_dtype)
        check(query, paged, kv_cache_dtype, sliding_window=700)
        check(query, paged, kv_cache_dtype, sinks=torch.randn(4, device=device))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
def test_causal_varlen_queries(device, kv_cache_dtype):
    # Chunked prefill over a cached prefix, speculative verification (q_len 4), a plain
    # decode, a sequence without queries and a whole prompt at once.
    lens = [40, 23, 9, 12, 30]
    q_lens = [17, 4, 1, 0, 30]
    paged = make_paged(5, lens, 2, 64, 8, torch.bfloat16, kv_cache_dtype, "HND", device)
    loc = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32, device=device)
    query = torch.randn(sum(q_lens), 4, 64).bfloat16().to(device)
    check(query, paged, kv_cache_dtype, query_start_loc=loc)
    check(query, paged, kv_cache_dtype, query_start_loc=loc, sliding_window=6)
    check(query, paged, kv_cache_dtype, query_start_loc=loc.long(), causal=False)


@pytest.mark.parametrize("device", DEVICES)
def test_options_softcap_sinks_window_kv_start_scale(device):
    lens = [64, 33, 100]
    paged = make_paged(3, lens, 2, 80, 16, torch.float32, device=device)
    query = torch.randn(3, 4, 80, device=device) * 4  # large logits, so the soft cap matters
    kv_start = torch.tensor([0, 10, 99], dtype=torch.int64, device=device)
    sinks = torch.randn(4, device=device)
    out_capped, _ = check(query, paged, softcap=5.0, scale=0.3)
    out_plain, _ = check(query, paged, scale=0.3)
    assert (out_capped - out_plain).abs().max() > 1e-3  # the cap changed something
    check(query, paged, sinks=sinks)
    check(query, paged, sliding_window=1)
    check(query, paged, sliding_window=20, kv_start=kv_start, sinks=sinks, softcap=30.0)
    check(query, paged, kv_start=kv_start)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_see_no_key(device):
    # kv_start == seq_len hides every key: output 0 and lse -inf, or lse = the sink's logit.
    paged = make_paged(2, [5, 0], 1, 64, 4, torch.float32, device=device)
    query = torch.randn(2, 2, 64, device=device)
    kv_start = torch.tensor([5, 0], device=device)
    out, lse = ops.paged_attention(query, **paged, kv_start=kv_start, return_lse=True)
    assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))
    assert torch.isneginf(lse).all()
    sinks = torch.tensor([0.5, -1.0], device=device)
    out, lse = ops.paged_attention(query, **paged, kv_start=kv_start, sinks=sinks, return_lse=True)
    assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))
    torch.testing.assert_close(lse.cpu(), sinks.cpu().expand(2, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_lse_merges_two_caches_exactly(device):
    # Attention over a prefix cache and a suffix cache, merged by their lse, equals attention
    # over both: what the transformers backend does across page runs.
    full = make_paged(1, [90], 2, 64, 16, torch.float32, device=device, spare_blocks=0)
    table = full["block_tables"]
    prefix = dict(full, block_tables=table[:, :3].contiguous(), seq_lens=torch.tensor([48], device=device))
    suffix = dict(full, block_tables=table[:, 3:].contiguous(), seq_lens=torch.tensor([42], device=device))
    query = torch.randn(1, 4, 64, device=device)
    want = ops.paged_attention(query, **full)
    o1, l1 = ops.paged_attention(query, **prefix, causal=False, return_lse=True)
    o2, l2 = ops.paged_attention(query, **suffix, return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - lse).unsqueeze(-1) + o2 * torch.exp(l2 - lse).unsqueeze(-1)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-5)


def test_index_tensors_int32_and_int64_agree():
    paged = make_paged(2, [20, 7], 2, 64, 8, torch.float32)
    query = torch.randn(2, 2, 64)
    a = ops.paged_attention(query, **paged)
    b = ops.paged_attention(query, **dict(paged, block_tables=paged["block_tables"].long(),
                                          seq_lens=paged["seq_lens"].long()))
    assert torch.equal(a, b)


def test_strided_query_view():
    # A query sliced out of a fused QKV projection: only the last dimension is contiguous.
    paged = make_paged(3, [9, 30, 2], 2, 64, 16, torch.float16)
    qkv = torch.randn(3, 12, 64).half()
    check(qkv[:, :4], paged)


@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
def test_opcheck(kv_cache_dtype):
    paged = make_paged(2, [9, 20], 2, 32, 8, torch.float16, kv_cache_dtype, "HND")
    query = torch.randn(5, 4, 32).half()
    loc = torch.tensor([0, 2, 5], dtype=torch.int32)
    opcheck(torch.ops.memwarden.paged_attention.default,
            (query, paged["key_cache"], paged["value_cache"], paged["block_tables"], paged["seq_lens"], 0.2, loc,
             kv_cache_dtype, paged.get("k_scale"), paged.get("v_scale"), paged.get("k_scale_cache"),
             paged.get("v_scale_cache"), -1, 0.0, torch.zeros(4), None, True))


def test_meta_shapes():
    paged = make_paged(2, [9, 20], 2, 32, 8, torch.float16, device="meta")
    out, lse = ops.paged_attention(torch.empty(2, 4, 32, dtype=torch.float16, device="meta"), **paged,
                                   return_lse=True)
    assert out.shape == (2, 4, 32) and out.dtype == torch.float16 and out.device.type == "meta"
    assert lse.shape == (2, 4) and lse.dtype == torch.float32


@pytest.mark.parametrize("change,error,message", [
    (dict(query=torch.randn(2, 3, 32)), ValueError, "query's 3 heads must be a multiple of the cache's 2 kv heads"),
    (dict(query=torch.randn(2, 4, 16)), ValueError, "query has heads of size 16"),
    (dict(query=torch.randn(3, 4, 32)), ValueError, "without query_start_loc each sequence has one query token"),
    (dict(query=torch.randn(2, 4, 32).half()), TypeError, "key_cache must have the dtype of query"),
    (dict(query=[1.0]), TypeError, "query must be a torch.Tensor"),
    (dict(seq_lens=torch.tensor([9, 17], dtype=torch.int32)), ValueError, "seq_lens"),
    (dict(seq_lens=torch.tensor([9.0, 1.0])), TypeError, "seq_lens must be"),
    (dict(block_tables=torch.tensor([[0, 1], [2, 99]], dtype=torch.int32)), IndexError, "block_tables"),
    (dict(scale=0.0), ValueError, "scale must be a finite non-zero number"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite non-zero number"),
    (dict(scale=True), TypeError, "scale must be a number"),
    (dict(softcap=-1.0), ValueError, "softcap must be 0"),
    (dict(sliding_window=0), ValueError, "sliding_window must be"),
    (dict(sinks=torch.zeros(3)), ValueError, "sinks must have num_heads = 4"),
    (dict(kv_start=torch.tensor([0, 17])), ValueError, r"kv_start\[1\] = 17"),
    (dict(kv_start=torch.tensor([0])), ValueError, "kv_start must have 2 elements"),
    (dict(query_start_loc=torch.tensor([0, 1, 3])), ValueError, r"query_start_loc\[-1\] = 3"),
    (dict(query_start_loc=torch.tensor([1, 1, 2])), ValueError, r"query_start_loc\[0\] must be 0"),
    (dict(kv_cache_dtype="fp8"), ValueError, "kv_cache_dtype must be one of"),
    (dict(causal=1), TypeError, "causal must be a bool"),
])
def test_bad_arguments_name_the_argument(change, error, message):
    paged = make_paged(2, [9, 16], 2, 32, 8, torch.float32)
    args = dict(query=torch.randn(2, 4, 32), **paged)
    args.update(change)
    with pytest.raises(error, match=message):
        ops.paged_attention(**args)


def test_causal_queries_must_fit_their_context():
    paged = make_paged(1, [3], 1, 32, 8, torch.float32)
    with pytest.raises(ValueError, match="has 4 query tokens but seq_lens"):
        ops.paged_attention(torch.randn(4, 1, 32), **paged, query_start_loc=torch.tensor([0, 4]))
    # Without causal masking the queries are not part of the context: allowed.
    out = ops.paged_attention(torch.randn(4, 1, 32), **paged, query_start_loc=torch.tensor([0, 4]), causal=False)
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_capture_and_replay():
    # Decode must not synchronise with the host: capturable in a CUDA graph (the host-side
    # index checks are skipped while capturing), and a replay sees new query values.
    paged = make_paged(2, [300, 41], 2, 128, 16, torch.float16, "int8_per_token_head", "HND", "cuda")
    query = torch.randn(2, 8, 128, device="cuda").half()
    ops.paged_attention(query, kv_cache_dtype="int8_per_token_head", **paged)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_attention(query, kv_cache_dtype="int8_per_token_head", **paged)
    query.copy_(torch.randn(2, 8, 128, device="cuda").half())
    graph.replay()
    torch.cuda.synchronize()
    want, _ = R.paged_attention(query.cpu(), kv_cache_dtype="int8_per_token_head",
                                **{k: v.cpu() for k, v in paged.items()})
    torch.testing.assert_close(out.cpu().float(), want.float(), atol=2e-3, rtol=2e-3)
