"""Hypothesis fuzz of memwarden.kv.ops.paged_attention against the float64 brute-force
reference (kv_reference.paged_attention): random shapes (head sizes off the vector width,
block size 1, groups above a work item's 16 rows), ragged and empty sequences, several
causal queries per sequence, every option and cache dtype, NHD/HND, threads 1 and 3 (so
contexts split into partitions). Every drawn call is valid and must give the reference's
result; ``--fuzz-long`` runs 20x the examples. (Invalid calls: test_paged_attention.py.)"""
import itertools

import torch
from hypothesis import given, strategies as st

import fuzz_runner as fr
import kv_reference as R
import test_paged_attention as P
from memwarden.kv import ops


@st.composite
def calls(draw):
    num_seqs = draw(st.integers(1, 4))
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 5, 17]))
    head_size = draw(st.sampled_from([1, 3, 8, 17, 40, 64]))
    block_size = draw(st.sampled_from([1, 3, 16]))
    causal = draw(st.booleans())
    lens, q_lens = [], []
    for _ in range(num_seqs):
        n = draw(st.integers(0, 1200 if draw(st.integers(0, 9)) == 0 else 40))
        lens.append(n)
        q_lens.append(draw(st.integers(0, min(n, 4) if causal else 4)))
    return dict(
        num_seqs=num_seqs, kv_heads=kv_heads, heads=kv_heads * group, head_size=head_size, block_size=block_size,
        lens=lens, q_lens=q_lens, causal=causal, dtype=draw(st.sampled_from(P.DTYPES)),
        kv_cache_dtype=draw(st.sampled_from(P.KV_DTYPES)), layout=draw(st.sampled_from(["NHD", "HND"])),
        window=draw(st.one_of(st.none(), st.integers(1, 50))), softcap=draw(st.sampled_from([None, 0.0, 2.5, 30.0])),
        sinks=draw(st.booleans()), kv_start=draw(st.booleans()), varlen=draw(st.booleans()) or set(q_lens) != {1},
        threads=draw(st.sampled_from([1, 3])), seed=draw(st.integers(0, 2**16)))


@fr.fuzz_settings(60)
@given(calls())
def test_paged_attention_matches_the_reference(c):
    g = torch.Generator().manual_seed(c["seed"])
    paged = P.make_paged(c["num_seqs"], c["lens"], c["kv_heads"], c["head_size"], c["block_size"], c["dtype"],
                         c["kv_cache_dtype"], c["layout"], seed=c["seed"])
    q_lens = c["q_lens"] if c["varlen"] else [1] * c["num_seqs"]
    options = dict(softcap=c["softcap"], sliding_window=c["window"], causal=c["causal"])
    if c["varlen"]:
        options["query_start_loc"] = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32)
    if c["sinks"]:
        options["sinks"] = torch.randn(c["heads"], generator=g)
    if c["kv_start"]:
        options["kv_start"] = torch.tensor([int(torch.randint(0, n + 1, (1,), generator=g)) for n in c["lens"]])
    query = (torch.randn(sum(q_lens), c["heads"], c["head_size"], generator=g) * 2).to(c["dtype"])
    previous = torch.get_num_threads()
    torch.set_num_threads(c["threads"])
    try:  # every call here is valid (a query of an empty context sees nothing: 0, lse -inf)
        out, lse = ops.paged_attention(query, kv_cache_dtype=c["kv_cache_dtype"], return_lse=True, **paged, **options)
    finally:
        torch.set_num_threads(previous)
    want, want_lse = R.paged_attention(query, kv_cache_dtype=c["kv_cache_dtype"], **paged, **options)
    tol = P.TOLERANCE[c["dtype"]]
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=1e-4, rtol=1e-4)
