"""Paged KV cache ops against plain-PyTorch references (kv_reference.py)."""
import itertools

import pytest
import torch
from torch.library import opcheck

import kv_reference as R
from memwarden.kv import ops

HEAD_SIZES = [64, 80, 120, 128, 256]
BLOCK_SIZES = [8, 16, 32]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["NHD", "HND"]
KV_DTYPES = ["auto", "int8", "int8_per_token_head"]
NUM_HEADS = 3
NUM_BLOCKS = 7

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def make_cache(num_blocks, block_size, num_heads, head_size, dtype, layout, device="cpu", fill=0):
    """Flash-layout cache [nb, bs, H, D]; HND is a permuted view of [nb, H, bs, D]."""
    if layout == "NHD":
        return torch.full((num_blocks, block_size, num_heads, head_size), fill, dtype=dtype, device=device)
    return torch.full((num_blocks, num_heads, block_size, head_size), fill, dtype=dtype, device=device).permute(0, 2, 1, 3)


def make_slots(num_tokens, num_blocks, block_size, num_skipped=2, generator=None):
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens].clone()
    for i in range(min(num_skipped, num_tokens)):
        slots[(i * 5 + 1) % num_tokens] = -1
    return slots


def make_kv(num_tokens, num_heads, head_size, dtype, padding=3, fused=True):
    """key/value views into a fused QKV tensor (only the row stride is regular), padded."""
    if fused:
        qkv = torch.randn(num_tokens + padding, 3 * num_heads, head_size, dtype=torch.float32).to(dtype)
        return qkv[:, num_heads:2 * num_heads], qkv[:, 2 * num_heads:]
    return (torch.randn(num_tokens + padding, num_heads, head_size).to(dtype),
            torch.randn(num_tokens + padding, num_heads, head_size).to(dtype))


def scales_for(kv_dtype, per_head, num_heads):
    if kv_dtype != "int8":
        return torch.ones(1), torch.ones(1)
    n = num_heads if per_head else 1
    return torch.rand(n) * 0.03 + 0.01, torch.rand(n) * 0.03 + 0.01


def flash_grid():
    # Every head size x dtype x layout x cache dtype; block sizes rotate through the grid.
    for i, (h, dt, lay, kvd) in enumerate(itertools.product(HEAD_SIZES, DTYPES, LAYOUTS, KV_DTYPES)):
        yield pytest.param(h, BLOCK_SIZES[i % 3], dt, lay, kvd, id=f"h{h}-b{BLOCK_SIZES[i % 3]}-{dt}-{lay}-{kvd}")


def write_both(key, value, slots, block_size, dtype, layout, kv_dtype, k_scale, v_scale, device="cpu"):
    """Runs the op and the reference; returns ((kc, vc, ksc, vsc) op, same ref)."""
    cache_dtype = dtype if kv_dtype == "auto" else torch.int8
    h, d = key.shape[1:]
    results = []
    for run in ("op", "ref"):
        kc = make_cache(NUM_BLOCKS, block_size, h, d, cache_dtype, layout, device, fill=7)
        vc = make_cache(NUM_BLOCKS, block_size, h, d, cache_dtype, layout, device, fill=7)
        ksc = vsc = None
        if kv_dtype == "int8_per_token_head":
            ksc = make_cache(NUM_BLOCKS, block_size, h, 1, torch.float32, layout, device, fill=-1)[..., 0]
            vsc = make_cache(NUM_BLOCKS, block_size, h, 1, torch.float32, layout, device, fill=-1)[..., 0]
        if run == "op":
            ops.reshape_and_cache_flash(key.to(device), value.to(device), kc, vc, slots.to(device), kv_dtype,
                                        k_scale.to(device), v_scale.to(device), ksc, vsc)
        else:
            R.write_flash(key, value, kc, vc, slots, kv_dtype, k_scale, v_scale, ksc, vsc)
        results.append((kc, vc, ksc, vsc))
    return results


@pytest.mark.parametrize("head_size,block_size,dtype,layout,kv_dtype", list(flash_grid()))
def test_reshape_and_cache_flash_matches_reference(head_size, block_size, dtype, layout, kv_dtype):
    g = torch.Generator().manual_seed(head_size * 31 + block_size)
    num_tokens = 2 * block_size + 3
    key, value = make_kv(num_tokens, NUM_HEADS, head_size, dtype)
    slots = make_slots(num_tokens, NUM_BLOCKS, block_size, generator=g)
    k_scale, v_scale = scales_for(kv_dtype, per_head=head_size % 2 == 0, num_heads=NUM_HEADS)
    (kc, vc, ksc, vsc), (rk, rv, rks, rvs) = write_both(key, value, slots, block_size, dtype, layout, kv_dtype,
                                                        k_scale, v_scale)
    # Exact: "auto" copies, INT8 uses the same fp32 arithmetic as the reference. Slots
    # not written (negative slots, unused) keep the fill value.
    assert torch.equal(kc, rk) and torch.equal(vc, rv)
    if ksc is not None:
        assert torch.equal(ksc, rks) and torch.equal(vsc, rvs)
    if kv_dtype != "auto":
        # Dequantized values are within half a quantization step of the input.
        bs = block_size
        for t in range(num_tokens):
            s = int(slots[t])
            if s < 0:
                continue
            b, o = divmod(s, bs)
            step = ksc[b, o].view(-1, 1) if ksc is not None else k_scale.view(-1, 1)
            x = key[t].float()
            err = (kc[b, o].float() * step - x).abs()
            inside = x.abs() <= 127 * step  # static scales may be too small: those saturate
            assert bool((err <= step / 2 + 1e-6 + x.abs() * 1e-6)[inside].all())
            assert bool((kc[b, o][~inside].int().abs() >= 127).all())


def test_flash_negative_slots_and_padding_leave_cache_untouched():
    key, value = make_kv(6, 2, 64, torch.float16, padding=10)
    kc = make_cache(2, 8, 2, 64, torch.float16, "NHD", fill=5)
    vc = kc.clone()
    slots = torch.tensor([-1, 3, -1, -1, 9, -5])
    ops.reshape_and_cache_flash(key, value, kc, vc, slots)
    written = {3, 9}
    flat, flat_v = kc.view(16, 2, 64), vc.view(16, 2, 64)
    for s in range(16):
        if s in written:
            continue
        assert bool((flat[s] == 5).all()) and bool((flat_v[s] == 5).all())
    assert torch.equal(flat[3], key[1]) and torch.equal(flat[9], key[4])
    assert torch.equal(flat_v[3], value[1]) and torch.equal(flat_v[9], value[4])


def legacy_grid():
    for i, (h, dt, kvd) in enumerate(itertools.product(HEAD_SIZES, DTYPES, ["auto", "int8"])):
        yield pytest.param(h, BLOCK_SIZES[i % 3], dt, kvd, id=f"h{h}-b{BLOCK_SIZES[i % 3]}-{dt}-{kvd}")


@pytest.mark.parametrize("head_size,block_size,dtype,kv_dtype", list(legacy_grid()))
def test_reshape_and_cache_legacy_matches_reference(head_size, block_size, dtype, kv_dtype):
    num_tokens = block_size + 5
    key, value = make_kv(num_tokens, NUM_HEADS, head_size, dtype)
    slots = make_slots(num_tokens, NUM_BLOCKS, block_size, generator=torch.Generator().manual_seed(head_size))
    k_scale, v_scale = scales_for(kv_dtype, per_head=True, num_heads=NUM_HEADS)
    cache_dtype = dtype if kv_dtype == "auto" else torch.int8
    x = 16 // torch.empty(0, dtype=cache_dtype).element_size()
    if head_size % x:
        kc = torch.zeros(NUM_BLOCKS, NUM_HEADS, head_size // x, block_size, x, dtype=cache_dtype)
        vc = torch.zeros(NUM_BLOCKS, NUM_HEADS, head_size, block_size, dtype=cache_dtype)
        with pytest.raises(ValueError, match="not a multiple of x"):
            ops.reshape_and_cache(key, value, kc, vc, slots, kv_dtype, k_scale, v_scale)
        return
    rk = make_cache(NUM_BLOCKS, block_size, NUM_HEADS, head_size, cache_dtype, "NHD", fill=3)
    rv = rk.clone()
    R.write_flash(key, value, rk, rv, slots, kv_dtype, k_scale, v_scale)
    rk, rv = R.flash_to_legacy(rk, rv)
    kc = torch.full_like(rk, 3)
    vc = torch.full_like(rv, 3)
    ops.reshape_and_cache(key, value, kc, vc, slots, kv_dtype, k_scale, v_scale)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_cache_matches_reference(kv_dtype, layout, dtype, device):
    bs, h, d = 8, 2, 80
    cache_dtype = dtype if kv_dtype == "auto" else torch.int8
    gen = torch.Generator().manual_seed(1)
    kc = make_cache(NUM_BLOCKS, bs, h, d, cache_dtype, layout)
    vc = make_cache(NUM_BLOCKS, bs, h, d, cache_dtype, layout)
    if kv_dtype == "auto":
        kc.copy_(torch.randn(kc.shape, generator=gen).to(dtype))
        vc.copy_(torch.randn(vc.shape, generator=gen).to(dtype))
    else:
        kc.copy_(torch.randint(-128, 128, kc.shape, generator=gen, dtype=torch.int8))
        vc.copy_(torch.randint(-128, 128, vc.shape, generator=gen, dtype=torch.int8))
    ksc = vsc = k_scale = v_scale = None
    if kv_dtype == "int8":
        k_scale, v_scale = torch.rand(h) + 0.01, torch.rand(h) + 0.01
    if kv_dtype == "int8_per_token_head":
        ksc = torch.rand(NUM_BLOCKS, bs, h, generator=gen)
        vsc = torch.rand(NUM_BLOCKS, bs, h, generator=gen)
    block_table = torch.tensor([[3, 0, 6], [1, 5, 2], [4, 4, 4]], dtype=torch.int32)
    seq_lens = torch.tensor([17, 0, 8], dtype=torch.int64)
    out_dtype = dtype
    def to(t):
        return None if t is None else t.to(device)

    key, value = ops.gather_kv(to(kc), to(vc), to(block_table), to(seq_lens), kv_dtype, out_dtype=out_dtype,
                               k_scale=to(k_scale), v_scale=to(v_scale), k_scale_cache=to(ksc),
                               v_scale_cache=to(vsc))
    rk, rv = R.gather(kc, vc, block_table, seq_lens, kv_dtype, out_dtype, k_scale, v_scale, ksc, vsc)
    assert key.shape == (25, h, d)
    torch.testing.assert_close(key.cpu(), rk, rtol=0, atol=0)
    torch.testing.assert_close(value.cpu(), rv, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_write_then_gather_round_trip(kv_dtype, layout):
    bs, h, d, dtype = 16, 4, 128, torch.float16
    seq_lens = [20, 5, 33]
    manager_tables = [[0, 1], [2], [3, 4, 5]]
    total = sum(seq_lens)
    key, value = make_kv(total, h, d, dtype, padding=0, fused=False)
    slots = torch.tensor([b * bs + t % bs for table, n in zip(manager_tables, seq_lens) for t, b in
                          ((t, table[t // bs]) for t in range(n))])
    cache_dtype = dtype if kv_dtype == "auto" else torch.int8
    kc = make_cache(6, bs, h, d, cache_dtype, layout)
    vc = make_cache(6, bs, h, d, cache_dtype, layout)
    k_scale, v_scale = (key.float().abs().amax() / 127).view(1), (value.float().abs().amax() / 127).view(1)
    ksc = vsc = None
    if kv_dtype == "int8_per_token_head":
        ksc, vsc = torch.zeros(6, bs, h), torch.zeros(6, bs, h)
    ops.reshape_and_cache_flash(key, value, kc, vc, slots, kv_dtype, k_scale, v_scale, ksc, vsc)
    table = torch.tensor([t + [0] * (3 - len(t)) for t in manager_tables])
    out_k, out_v = ops.gather_kv(kc, vc, table, torch.tensor(seq_lens), kv_dtype, out_dtype=dtype,
                                 k_scale=k_scale if kv_dtype == "int8" else None,
                                 v_scale=v_scale if kv_dtype == "int8" else None, k_scale_cache=ksc, v_scale_cache=vsc)
    if kv_dtype == "auto":
        assert torch.equal(out_k, key) and torch.equal(out_v, value)
    else:
        step_k = k_scale if kv_dtype == "int8" else ksc.view(-1, h).max()
        # within one quantization step (half a step plus fp16 rounding of the output)
        assert float((out_k.float() - key.float()).abs().max()) <= float(step_k)
        assert float((out_v.float() - value.float()).abs().max()) <= float(v_scale if kv_dtype == "int8" else
                                                                              vsc.max())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_copy_blocks_fan_out(layout):
    layers = 3
    kcs = [make_cache(8, 16, 2, 64, torch.bfloat16, layout) for _ in range(layers)]
    vcs = [make_cache(8, 16, 2, 64, torch.bfloat16, layout) for _ in range(layers)]
    for c in kcs + vcs:
        c.copy_(torch.randn(c.shape).to(c.dtype))
    expected_k = [c.clone() for c in kcs]
    expected_v = [c.clone() for c in vcs]
    mapping = torch.tensor([[1, 4], [1, 5], [2, 7], [1, 0]])  # block 1 fans out to 3 blocks
    for exp in expected_k + expected_v:
        for s, d in mapping.tolist():
            exp[d] = exp[s]
    ops.copy_blocks(kcs, vcs, mapping)
    for got, exp in zip(kcs + vcs, expected_k + expected_v):
        assert torch.equal(got, exp)


def test_copy_blocks_rejects_conflicts_and_bad_ids():
    kc = [torch.zeros(4, 8, 1, 16)]
    vc = [torch.zeros(4, 8, 1, 16)]
    with pytest.raises(IndexError, match=r"block_mapping\[1, 1\] = 4 is out of range for 4"):
        ops.copy_blocks(kc, vc, torch.tensor([[0, 1], [0, 4]]))
    with pytest.raises(ValueError, match="destination more than once"):
        ops.copy_blocks(kc, vc, torch.tensor([[0, 1], [2, 1]]))
    with pytest.raises(ValueError, match="both a source and a destination"):
        ops.copy_blocks(kc, vc, torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="same length"):
        ops.copy_blocks(kc, [], torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="blocks like key_caches"):
        ops.copy_blocks(kc, [torch.zeros(5, 8, 1, 16)], torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match=r"copy_blocks: block_mapping must be torch\.int64, got torch\.int32"):
        ops.copy_blocks(kc, vc, torch.tensor([[0, 1]], dtype=torch.int32))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_swap_blocks_round_trip(layout):
    src = make_cache(6, 16, 2, 64, torch.float16, layout)
    src.copy_(torch.randn(src.shape).half())
    host = make_cache(4, 16, 2, 64, torch.float16, layout, fill=0)
    nbytes = 16 * 2 * 64 * 2
    ops.swap_blocks(src, host, nbytes, torch.tensor([[5, 0], [2, 3]]))
    assert torch.equal(host[0], src[5]) and torch.equal(host[3], src[2])
    assert bool((host[1] == 0).all())
    back = torch.zeros_like(src)
    ops.swap_blocks(host, back, nbytes, torch.tensor([[0, 1], [3, 4]]))
    assert torch.equal(back[1], src[5]) and torch.equal(back[4], src[2])
    assert bool((back[0] == 0).all())


def test_swap_blocks_errors():
    src, dst = torch.zeros(4, 8, 16), torch.zeros(2, 8, 16)
    with pytest.raises(IndexError, match=r"block_mapping\[0, 1\] = 2 is out of range for 2 destination blocks"):
        ops.swap_blocks(src, dst, 512, torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="block_size_in_bytes = 1024"):
        ops.swap_blocks(src, dst, 1024, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="densely"):
        ops.swap_blocks(src[:, :, :8], dst, 64, torch.tensor([[0, 1]]))
    # Pairs run in parallel: one destination twice, or a chain within one tensor, would
    # leave a result that depends on thread timing.
    with pytest.raises(ValueError, match=r"block_mapping\[1, 1\] = 1 is a destination more than once"):
        ops.swap_blocks(src, dst, 512, torch.tensor([[0, 1], [2, 1]]))
    with pytest.raises(ValueError, match=r"block_mapping\[1, 0\] = 1 is both a source and a destination"):
        ops.swap_blocks(src, src, 512, torch.tensor([[0, 1], [1, 2]]))
    assert bool((dst == 0).all()) and bool((src == 0).all())
    src = torch.randn(4, 8, 16)
    ops.swap_blocks(src, dst, 512, torch.tensor([[1, 0], [1, 1]]))  # fan-out from one source is fine
    assert torch.equal(dst[0], src[1]) and torch.equal(dst[1], src[1])


def test_swap_blocks_with_a_meta_block_mapping_is_an_error_not_a_no_op():
    """A meta argument sends the call to the Meta kernel, which checked shapes and copied
    nothing: the caches were left as they were without a word."""
    src, dst = torch.randn(4, 8, 16), torch.zeros(2, 8, 16)
    mapping = torch.tensor([[1, 0]], device="meta")
    with pytest.raises(ValueError, match="swap_blocks: block_mapping is on the meta device but src and dst hold data"):
        torch.ops.memwarden.swap_blocks(src, dst, 512, mapping)
    assert bool((dst == 0).all())
    meta_src, meta_dst = src.to("meta"), dst.to("meta")
    torch.ops.memwarden.swap_blocks(meta_src, meta_dst, 512, mapping)  # all on meta: shape checks only
    with pytest.raises(ValueError, match="block_size_in_bytes = 1024"):  # which still run
        torch.ops.memwarden.swap_blocks(meta_src, meta_dst, 1024, mapping)


def test_legacy_value_rows_and_heads_checked():
    kc, vc = torch.zeros(2, 2, 2, 4, 4), torch.zeros(2, 2, 8, 4)
    key, slots = torch.randn(4, 2, 8), torch.arange(4)
    with pytest.raises(ValueError, match="need at least slot_mapping.size\\(0\\) = 4 tokens, got 4 and 1"):
        ops.reshape_and_cache(key, torch.randn(1, 2, 8), kc, vc, slots)
    with pytest.raises(ValueError, match="value has 3 heads of size 8"):
        ops.reshape_and_cache(key, torch.randn(4, 3, 8), kc, vc, slots)
    value = torch.randn(6, 2, 8)
    ops.reshape_and_cache(key, value, kc, vc, slots)  # longer (padded) value is fine
    # Slots 0..3 are block 0: value_cache[block, head, d, offset] = value[token, head, d].
    assert torch.equal(vc[0], value[:4].permute(1, 2, 0)) and bool((vc[1] == 0).all())


def test_flash_errors_name_the_argument():
    key, value = make_kv(5, 2, 64, torch.float16, padding=0, fused=False)
    kc = make_cache(4, 16, 2, 64, torch.float16, "NHD")
    vc = kc.clone()
    slots = torch.arange(5)
    one = torch.ones(1)
    with pytest.raises(IndexError, match=r"slot_mapping\[2\] = 9999 is out of range for 4 blocks x 16 slots"):
        ops.reshape_and_cache_flash(key, value, kc, vc, torch.tensor([0, 1, 9999, 3, 4]))
    assert bool((kc == 0).all())  # nothing written before the error
    with pytest.raises(TypeError, match="key_cache must have the dtype of key/value"):
        ops.reshape_and_cache_flash(key, value, kc.float(), vc, slots)
    with pytest.raises(TypeError, match="key_cache must be torch.int8"):
        ops.reshape_and_cache_flash(key, value, kc, vc, slots, "int8", one, one)
    with pytest.raises(ValueError, match="key has 2 heads of size 64 but the cache holds 2 heads of size 32"):
        ops.reshape_and_cache_flash(key, value, kc[..., :32], vc[..., :32], slots)
    with pytest.raises(ValueError, match="need at least slot_mapping.size\\(0\\) = 6 tokens"):
        ops.reshape_and_cache_flash(key, value, kc, vc, torch.arange(6))
    with pytest.raises(TypeError, match=r"reshape_and_cache_flash: slot_mapping must be torch\.int64, got torch\.int32"):
        ops.reshape_and_cache_flash(key, value, kc, vc, slots.int())
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        ops.reshape_and_cache_flash(key, value, kc, vc, slots, "fp8")
    with pytest.raises(ValueError, match="k_scale_cache is required"):
        ops.reshape_and_cache_flash(key, value, kc.to(torch.int8), vc.to(torch.int8), slots, "int8_per_token_head")
    with pytest.raises(ValueError, match="k_scale must have 1 or num_heads = 2 elements"):
        ops.reshape_and_cache_flash(key, value, kc.to(torch.int8), vc.to(torch.int8), slots, "int8",
                                    torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="positive block size"):
        ops.reshape_and_cache_flash(key, value, kc[:, :0], vc[:, :0], slots)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        ops.reshape_and_cache_flash(key, value, kc.transpose(2, 3), vc.transpose(2, 3), slots)
    with pytest.raises(ValueError, match="k_scale_cache is only used"):
        ops.reshape_and_cache_flash(key, value, kc, vc, slots, "auto", one, one, torch.zeros(4, 16, 2), None)


def test_gather_errors():
    kc = make_cache(4, 8, 2, 64, torch.float32, "NHD")
    out = torch.zeros(10, 2, 64)
    table = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"sum\(seq_lens\) = 12 but key_out/value_out have 10 rows"):
        ops.gather_cache(kc, kc, table, torch.tensor([6, 6]), out, out.clone())
    with pytest.raises(IndexError, match=r"block_table\[1, 1\] = 9 is out of range for 4 blocks"):
        ops.gather_cache(kc, kc, torch.tensor([[0, 1], [2, 9]]), torch.tensor([1, 9]), out, out.clone())
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 17 must be within 0 and"):
        ops.gather_cache(kc, kc, table, torch.tensor([17, -7]), out, out.clone())
    with pytest.raises(TypeError, match="key_out must have the cache's dtype"):
        ops.gather_cache(kc, kc, table, torch.tensor([5, 5]), out.half(), out.half())
    with pytest.raises(ValueError, match="k_scale and v_scale are required"):
        ops.gather_cache(kc.to(torch.int8), kc.to(torch.int8), table, torch.tensor([5, 5]), out, out.clone(), "int8")


def _opcheck_cases():
    h, d, bs = 2, 32, 8
    key, value = make_kv(10, h, d, torch.float16, padding=2)
    slots = make_slots(10, 4, bs)
    cases = []
    for kv_dtype in KV_DTYPES:
        cache_dtype = torch.float16 if kv_dtype == "auto" else torch.int8
        kc = make_cache(4, bs, h, d, cache_dtype, "HND")
        vc = make_cache(4, bs, h, d, cache_dtype, "NHD")
        ksc = vsc = None
        if kv_dtype == "int8_per_token_head":
            ksc, vsc = torch.zeros(4, bs, h), torch.zeros(4, bs, h)
        cases.append((torch.ops.memwarden.reshape_and_cache_flash.default,
                       (key, value, kc, vc, slots, kv_dtype, torch.full((h,), 0.02), torch.full((h,), 0.02), ksc,
                        vsc)))
        table = torch.tensor([[0, 1], [3, 2]], dtype=torch.int32)
        seq_lens = torch.tensor([9, 16])
        ko, vo = torch.zeros(25, h, d, dtype=torch.float16), torch.zeros(25, h, d, dtype=torch.float16)
        scale = torch.full((1,), 0.05) if kv_dtype == "int8" else None
        cases.append((torch.ops.memwarden.gather_cache.default,
                      (kc, vc, table, seq_lens, ko, vo, kv_dtype, scale, scale, ksc, vsc)))
    for kv_dtype in ("auto", "int8"):
        cache_dtype = torch.float16 if kv_dtype == "auto" else torch.int8
        x = 16 // torch.empty(0, dtype=cache_dtype).element_size()
        kc = torch.zeros(4, h, d // x, bs, x, dtype=cache_dtype)
        vc = torch.zeros(4, h, d, bs, dtype=cache_dtype)
        cases.append((torch.ops.memwarden.reshape_and_cache.default,
                      (key, value, kc, vc, slots, kv_dtype, torch.full((1,), 0.02), torch.full((1,), 0.02))))
    caches = [torch.randn(4, bs, h, d) for _ in range(4)]
    cases.append((torch.ops.memwarden.copy_blocks.default, (caches[:2], caches[2:], torch.tensor([[0, 1], [0, 2]]))))
    cases.append((torch.ops.memwarden.swap_blocks.default,
                  (caches[0], torch.zeros(3, bs, h, d), bs * h * d * 4, torch.tensor([[3, 0], [1, 2]]))))
    return cases


@pytest.mark.parametrize("index", range(len(_opcheck_cases())))
def test_opcheck(index):
    op, args = _opcheck_cases()[index]
    opcheck(op, args)


def test_cuda_index_check_switch():
    assert ops.cuda_index_checks_enabled()
    with ops.cuda_index_checks(False):
        assert not ops.cuda_index_checks_enabled()
        with ops.cuda_index_checks(True):
            assert ops.cuda_index_checks_enabled()
        assert not ops.cuda_index_checks_enabled()
    assert ops.cuda_index_checks_enabled()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        ops.set_cuda_index_checks(1)


# ---- CUDA: the same ops against the CPU op (guarded: CI has no GPU) ---------------------

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_cuda_flash_write_and_gather_match_cpu(head_size, dtype, kv_dtype, layout):
    bs = 16
    key, value = make_kv(40, NUM_HEADS, head_size, dtype)
    slots = make_slots(40, NUM_BLOCKS, bs, generator=torch.Generator().manual_seed(head_size))
    k_scale, v_scale = scales_for(kv_dtype, per_head=True, num_heads=NUM_HEADS)
    (kc, vc, ksc, vsc), _ = write_both(key, value, slots, bs, dtype, layout, kv_dtype, k_scale, v_scale, "cpu")
    (gk, gv, gks, gvs), _ = write_both(key, value, slots, bs, dtype, layout, kv_dtype, k_scale, v_scale, "cuda")
    if kv_dtype == "int8_per_token_head":
        # Reductions may differ in the last bit of the scale: allow one step on q.
        assert int((gk.cpu().int() - kc.int()).abs().max()) <= 1
        assert int((gv.cpu().int() - vc.int()).abs().max()) <= 1
        torch.testing.assert_close(gks.cpu(), ksc)
        torch.testing.assert_close(gvs.cpu(), vsc)
    else:
        assert torch.equal(gk.cpu(), kc) and torch.equal(gv.cpu(), vc)
    table = torch.tensor([[0, 3, 5], [6, 1, 2]])
    seq_lens = torch.tensor([40, 33])
    scales = (k_scale if kv_dtype == "int8" else None, v_scale if kv_dtype == "int8" else None)
    ck, cv = ops.gather_kv(kc, vc, table, seq_lens, kv_dtype, out_dtype=dtype, k_scale=scales[0], v_scale=scales[1],
                           k_scale_cache=ksc, v_scale_cache=vsc)
    cuda_scales = [a.cuda() if a is not None else None for a in scales]
    dk, dv = ops.gather_kv(gk, gv, table.cuda(), seq_lens.cuda(), kv_dtype, out_dtype=dtype, k_scale=cuda_scales[0],
                           v_scale=cuda_scales[1], k_scale_cache=gks, v_scale_cache=gvs)
    if kv_dtype != "int8_per_token_head":
        assert torch.equal(dk.cpu(), ck) and torch.equal(dv.cpu(), cv)
    else:
        # One step of q (the largest scale), plus the output dtype's rounding of either side.
        step = float(max(ksc.max(), vsc.max()))
        torch.testing.assert_close(dk.cpu(), ck, atol=2.0 * step, rtol=0)
        torch.testing.assert_close(dv.cpu(), cv, atol=2.0 * step, rtol=0)


@cuda_only
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_cuda_legacy_matches_cpu(kv_dtype):
    h, d, bs, dtype = 2, 128, 16, torch.float16
    key, value = make_kv(30, h, d, dtype)
    slots = make_slots(30, 4, bs)
    cache_dtype = dtype if kv_dtype == "auto" else torch.int8
    x = 16 // torch.empty(0, dtype=cache_dtype).element_size()
    kc, vc = torch.zeros(4, h, d // x, bs, x, dtype=cache_dtype), torch.zeros(4, h, d, bs, dtype=cache_dtype)
    gk, gv = kc.cuda(), vc.cuda()
    s = torch.full((1,), 0.02)
    ops.reshape_and_cache(key, value, kc, vc, slots, kv_dtype, s, s)
    ops.reshape_and_cache(key.cuda(), value.cuda(), gk, gv, slots.cuda(), kv_dtype, s.cuda(), s.cuda())
    assert torch.equal(gk.cpu(), kc) and torch.equal(gv.cpu(), vc)


@cuda_only
def test_cuda_copy_and_swap_blocks():
    kcs = [torch.randn(8, 16, 2, 64, device="cuda").half() for _ in range(2)]
    vcs = [torch.randn(8, 16, 2, 64, device="cuda").half() for _ in range(2)]
    expected = [c.cpu() for c in kcs + vcs]
    mapping = torch.tensor([[1, 4], [1, 5], [2, 7]])
    for e in expected:
        for s, d in mapping.tolist():
            e[d] = e[s]
    ops.copy_blocks(kcs, vcs, mapping.cuda())
    for got, e in zip(kcs + vcs, expected):
        assert torch.equal(got.cpu(), e)
    host = torch.zeros(4, 16, 2, 64, dtype=torch.half).pin_memory()
    nbytes = 16 * 2 * 64 * 2
    ops.swap_blocks(kcs[0], host, nbytes, torch.tensor([[5, 0], [2, 3]]))
    torch.cuda.synchronize()
    assert torch.equal(host[0], kcs[0][5].cpu()) and torch.equal(host[3], kcs[0][2].cpu())
    back = torch.zeros_like(kcs[0])
    ops.swap_blocks(host, back, nbytes, torch.tensor([[0, 1], [3, 6]]))
    ops.swap_blocks(kcs[0], back, nbytes, torch.tensor([[7, 0]]))  # device -> device
    assert torch.equal(back[1], kcs[0][5]) and torch.equal(back[6], kcs[0][2]) and torch.equal(back[0], kcs[0][7])


@cuda_only
def test_cuda_bad_slot_raises_and_writes_nothing():
    key, value = make_kv(5, 2, 64, torch.float16, padding=0, fused=False)
    kc = torch.zeros(4, 16, 2, 64, dtype=torch.float16, device="cuda")
    vc = kc.clone()
    with pytest.raises(IndexError, match="out of range for 4 blocks x 16 slots"):
        ops.reshape_and_cache_flash(key.cuda(), value.cuda(), kc, vc, torch.tensor([0, 1, 9999, 3, 4], device="cuda"))
    assert bool((kc == 0).all())


@cuda_only
def test_cuda_unchecked_indices_are_skipped_not_written():
    key, value = make_kv(5, 2, 64, torch.float16, padding=0, fused=False)
    slots = torch.tensor([0, 1, 9999, 3, -7])
    kc = torch.zeros(4, 16, 2, 64, dtype=torch.float16, device="cuda")
    vc = kc.clone()
    with ops.cuda_index_checks(False):
        ops.reshape_and_cache_flash(key.cuda(), value.cuda(), kc, vc, slots.cuda())
    expected_k, expected_v = torch.zeros(4, 16, 2, 64, dtype=torch.float16), torch.zeros(4, 16, 2, 64, dtype=torch.float16)
    valid = torch.tensor([0, 1, 3])
    ops.reshape_and_cache_flash(key[valid], value[valid], expected_k, expected_v, slots[valid])
    assert torch.equal(kc.cpu(), expected_k) and torch.equal(vc.cpu(), expected_v)
    # A bad block id in the table: its rows are left alone, the other page is gathered.
    table, seq_lens = torch.tensor([[0, 77]], device="cuda"), torch.tensor([20], device="cuda")
    out_k = torch.full((20, 2, 64), 5.0, dtype=torch.float16, device="cuda")
    out_v = out_k.clone()
    with ops.cuda_index_checks(False):
        ops.gather_cache(kc, vc, table, seq_lens, out_k, out_v)
    assert torch.equal(out_k[:16].cpu(), expected_k[0]) and bool((out_k[16:] == 5).all())
    with pytest.raises(IndexError, match="block_table"):
        ops.gather_cache(kc, vc, table, seq_lens, out_k, out_v)


@cuda_only
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_cuda_gather_into_unaligned_outputs(kv_dtype):
    # Outputs one element off 16-byte alignment take the kernel's element-wise path.
    gen = torch.Generator().manual_seed(3)
    shape = (4, 16, 2, 64)
    if kv_dtype == "auto":
        kc, vc = (torch.randn(shape, generator=gen).half() for _ in range(2))
    else:
        kc, vc = (torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8) for _ in range(2))
    scale = torch.full((1,), 0.05) if kv_dtype == "int8" else None
    table, seq_lens = torch.tensor([[2, 0]]), torch.tensor([20])
    expected_k, expected_v = ops.gather_kv(kc, vc, table, seq_lens, kv_dtype, out_dtype=torch.float16,
                                             k_scale=scale, v_scale=scale)
    outs = [torch.zeros(20 * 2 * 64 + 1, dtype=torch.float16, device="cuda")[1:].view(20, 2, 64) for _ in range(2)]
    cuda_scale = None if scale is None else scale.cuda()
    ops.gather_cache(kc.cuda(), vc.cuda(), table.cuda(), seq_lens.cuda(), *outs, kv_dtype, cuda_scale, cuda_scale)
    assert torch.equal(outs[0].cpu(), expected_k) and torch.equal(outs[1].cpu(), expected_v)


@cuda_only
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_cuda_write_from_unaligned_inputs(kv_dtype):
    # key/value one element off 16-byte alignment take the kernel's element-wise path.
    key, value = make_kv(24, 2, 64, torch.float16, padding=0, fused=False)
    slots = make_slots(24, 4, 16, generator=torch.Generator().manual_seed(5))
    scale = torch.full((2,), 0.03)
    cache_dtype = torch.float16 if kv_dtype == "auto" else torch.int8
    expected = [torch.zeros(4, 16, 2, 64, dtype=cache_dtype) for _ in range(2)]
    ops.reshape_and_cache_flash(key, value, *expected, slots, kv_dtype, scale, scale)

    def unaligned(t):
        buffer = torch.zeros(t.numel() + 1, dtype=t.dtype, device="cuda")
        buffer[1:].copy_(t.reshape(-1))
        return buffer[1:].view(t.shape)

    got = [torch.zeros(4, 16, 2, 64, dtype=cache_dtype, device="cuda") for _ in range(2)]
    ops.reshape_and_cache_flash(unaligned(key), unaligned(value), *got, slots.cuda(), kv_dtype, scale.cuda(),
                                scale.cuda())
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


def test_gather_kv_checks_seq_lens_before_allocating():
    # Issue 11: a negative length reached torch.empty ("negative dimension").
    kc = make_cache(4, 8, 2, 16, torch.float32, "NHD")
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"gather_kv: seq_lens\[1\] = -5 must be >= 0"):
        ops.gather_kv(kc, kc, table, torch.tensor([3, -5], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"gather_kv: seq_lens must be torch\.int32 or torch\.int64, got torch\.float32"):
        ops.gather_kv(kc, kc, table, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="gather_kv: seq_lens must be on cpu like key_cache, got meta"):
        ops.gather_kv(kc, kc, table, torch.tensor([1, 2], device="meta"))
    with pytest.raises(ValueError, match=r"gather_kv: seq_lens must be 1-D \[num_seqs\], got shape \[2, 1\]"):
        ops.gather_kv(kc, kc, table, torch.tensor([[1], [2]]))
    with pytest.raises(TypeError, match=r"gather_kv: block_table must be torch\.int32 or torch\.int64, got torch\.float32"):
        ops.gather_kv(kc, kc, table.float(), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"gather_cache: seq_lens must be torch\.int32 or torch\.int64, got torch\.int16"):
        ops.gather_cache(kc, kc, table, torch.tensor([1, 2], dtype=torch.int16), torch.empty(3, 2, 16),
                         torch.empty(3, 2, 16))


def test_gather_kv_out_dtype_and_scales_are_keyword_only():
    gen = torch.Generator().manual_seed(5)
    kc, vc = (torch.randint(-128, 128, (4, 8, 2, 16), generator=gen, dtype=torch.int8) for _ in range(2))
    table, seq_lens, scale = torch.tensor([[2, 0], [1, 3]]), torch.tensor([11, 4]), torch.full((1,), 0.05)
    key, _ = ops.gather_kv(kc, vc, table, seq_lens, "int8", out_dtype=torch.bfloat16, k_scale=scale, v_scale=scale)
    assert key.dtype == torch.bfloat16 and key.shape == (15, 2, 16)
    # The positional order of gather_cache: k_scale right after kv_cache_dtype, out_dtype by keyword.
    default_k, _ = ops.gather_kv(kc, vc, table, seq_lens, "int8", k_scale=scale, v_scale=scale)
    assert default_k.dtype == torch.float16
    with pytest.raises(TypeError, match="positional argument"):
        ops.gather_kv(kc, vc, table, seq_lens, "int8", torch.bfloat16, scale, scale)
    with pytest.raises(TypeError, match="gather_kv: out_dtype must be a torch.dtype or None, got Tensor"):
        ops.gather_kv(kc, vc, table, seq_lens, "int8", out_dtype=scale)


def _non_tensor_calls():
    kc = make_cache(4, 16, 2, 8, torch.float32, "NHD")
    key = torch.randn(2, 2, 8)
    slots, table, lens = torch.tensor([0, 1]), torch.tensor([[0]]), torch.tensor([2])
    out = torch.empty(2, 2, 8)
    legacy = torch.zeros(4, 2, 1, 16, 8)  # [nb, H, D/x, bs, x] with x = 4 for float32
    return [
        ("gather_kv", "key_cache", "list", lambda: ops.gather_kv([kc], kc, table, lens)),
        ("gather_kv", "seq_lens", "list", lambda: ops.gather_kv(kc, kc, table, [2])),
        ("gather_cache", "value_cache", "list", lambda: ops.gather_cache(kc, [kc], table, lens, out, out)),
        ("gather_cache", "key_out", "NoneType", lambda: ops.gather_cache(kc, kc, table, lens, None, out)),
        ("reshape_and_cache_flash", "key_cache", "list",
         lambda: ops.reshape_and_cache_flash(key, key, [kc], kc, slots)),
        ("reshape_and_cache_flash", "slot_mapping", "list",
         lambda: ops.reshape_and_cache_flash(key, key, kc, kc, [0, 1])),
        ("reshape_and_cache", "value_cache", "list",
         lambda: ops.reshape_and_cache(key, key, legacy, [legacy], slots)),
        ("copy_blocks", "key_caches", "Tensor", lambda: ops.copy_blocks(kc, [kc], torch.tensor([[0, 1]]))),
        ("copy_blocks", r"value_caches\[0\]", "list", lambda: ops.copy_blocks([kc], [[kc]], torch.tensor([[0, 1]]))),
        ("copy_blocks", "block_mapping", "list", lambda: ops.copy_blocks([kc], [kc], [[0, 1]])),
        ("swap_blocks", "dst", "list", lambda: ops.swap_blocks(kc, [kc], 64, torch.tensor([[0, 1]]))),
    ]


@pytest.mark.parametrize("index", range(len(_non_tensor_calls())))
def test_ops_reject_non_tensors_naming_the_argument(index):
    # Issue 11: a list passed as a cache raised AttributeError ("'list' object has no attribute 'device'").
    op, name, got, call = _non_tensor_calls()[index]
    with pytest.raises(TypeError, match=rf"^{op}: {name} must be a (torch.Tensor|list of torch.Tensor .*), got {got}$"):
        call()
