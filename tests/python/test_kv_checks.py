"""Issue 11 (paged KV): static INT8 scales that would wipe the cache, and outputs that
overlap themselves, each other or an input, are ValueErrors naming the arguments; legal
views of one buffer still give the reference's result (kv_reference.py)."""
import math
import re

import pytest
import torch

import kv_reference as R
from memwarden.kv import ops

NB, BS, H, D = 4, 8, 2, 16
CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def kv(num_tokens=6, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, H, D, generator=g).to(dtype), torch.randn(num_tokens, H, D, generator=g).to(dtype))


def flash_cache(dtype=torch.float16, fill=7, num_blocks=NB):
    return torch.full((num_blocks, BS, H, D), fill, dtype=dtype)


def legacy_caches(dtype, fill=7):
    x = 16 // torch.empty(0, dtype=dtype).element_size()
    return torch.full((NB, H, D // x, BS, x), fill, dtype=dtype), torch.full((NB, H, D, BS), fill, dtype=dtype)


SLOTS = torch.tensor([0, 9, -1, 17, 30, 5])
TABLE, SEQ_LENS = torch.tensor([[2, 0], [1, 3]]), torch.tensor([11, 4])


# ---- static INT8 scales ----------------------------------------------------------------

# value -> how std::to_string shows it in the message
BAD_SCALES = {0.0: "0.000000", -0.5: "-0.500000", math.nan: "-?nan", math.inf: "inf", -math.inf: "-inf"}


def scale_pair(arg, bad, per_head):
    """(k_scale, v_scale), valid except `arg`, whose last element is `bad`."""
    good = torch.full((H if per_head else 1,), 0.02)
    broken = good.clone()
    broken[-1] = bad
    return (broken, good) if arg == "k_scale" else (good, broken)


def int8_call(op, k_scale, v_scale):
    """Runs `op` with kv_cache_dtype "int8" on fresh caches."""
    key, value = kv()
    if op == "reshape_and_cache_flash":
        kc, vc = flash_cache(torch.int8), flash_cache(torch.int8)
        ops.reshape_and_cache_flash(key, value, kc, vc, SLOTS, "int8", k_scale, v_scale)
    elif op == "reshape_and_cache":
        kc, vc = legacy_caches(torch.int8)
        ops.reshape_and_cache(key, value, kc, vc, SLOTS, "int8", k_scale, v_scale)
    elif op == "gather_cache":
        kc, vc = flash_cache(torch.int8), flash_cache(torch.int8)
        out = torch.zeros(15, H, D, dtype=torch.float16), torch.zeros(15, H, D, dtype=torch.float16)
        ops.gather_cache(kc, vc, TABLE, SEQ_LENS, *out, "int8", k_scale, v_scale)
    else:
        kc, vc = flash_cache(torch.int8), flash_cache(torch.int8)
        ops.gather_kv(kc, vc, TABLE, SEQ_LENS, "int8", k_scale=k_scale, v_scale=v_scale)


SCALE_OPS = ["reshape_and_cache_flash", "reshape_and_cache", "gather_cache", "gather_kv"]


@pytest.mark.parametrize("per_head", [False, True], ids=["scalar", "per_head"])
@pytest.mark.parametrize("bad", list(BAD_SCALES), ids=["zero", "negative", "nan", "inf", "-inf"])
@pytest.mark.parametrize("arg", ["k_scale", "v_scale"])
@pytest.mark.parametrize("op", SCALE_OPS)
def test_bad_static_scale_is_an_error_naming_it(op, arg, bad, per_head):
    # They quantized every value to 0 (the cache was wiped) or dequantized to 0/NaN.
    k_scale, v_scale = scale_pair(arg, bad, per_head)
    index = H - 1 if per_head else 0
    op_name = "gather_cache" if op == "gather_kv" else op  # gather_kv checks through gather_cache
    pattern = rf"^{op_name}: {arg} must be positive and finite, got {arg}\[{index}\] = {BAD_SCALES[bad]}"
    with pytest.raises(ValueError, match=pattern):
        int8_call(op, k_scale, v_scale)


def test_bad_scale_leaves_the_cache_untouched():
    key, value = kv()
    kc, vc = flash_cache(torch.int8), flash_cache(torch.int8)
    with pytest.raises(ValueError, match="v_scale"):
        ops.reshape_and_cache_flash(key, value, kc, vc, SLOTS, "int8", torch.full((1,), 0.02), torch.zeros(1))
    assert bool((kc == 7).all()) and bool((vc == 7).all())


@pytest.mark.parametrize("scale", [0.02, 1e-30, 3e38], ids=["usual", "tiny", "huge"])
def test_positive_finite_scales_still_match_the_reference(scale):
    key, value = kv(dtype=torch.float32)
    s = torch.tensor([scale, 0.05])  # per head
    kc, vc = flash_cache(torch.int8), flash_cache(torch.int8)
    ops.reshape_and_cache_flash(key, value, kc, vc, SLOTS, "int8", s, s)
    rk, rv = flash_cache(torch.int8), flash_cache(torch.int8)
    R.write_flash(key, value, rk, rv, SLOTS, "int8", s, s)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)
    lk, lv = legacy_caches(torch.int8)
    ops.reshape_and_cache(key, value, lk, lv, SLOTS, "int8", s, s)
    assert all(torch.equal(a, b) for a, b in zip((lk, lv), R.flash_to_legacy(rk, rv)))
    got = ops.gather_kv(kc, vc, TABLE, SEQ_LENS, "int8", out_dtype=torch.float32, k_scale=s, v_scale=s)
    want = R.gather(kc, vc, TABLE, SEQ_LENS, "int8", torch.float32, s, s)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_meta_kernels_have_no_scale_values_to_check():
    # The Meta kernels (torch.compile, opcheck) see shapes only; they still check those.
    key, value = (t.to("meta") for t in kv())
    kc = torch.empty(NB, BS, H, D, dtype=torch.int8, device="meta")
    vc = torch.empty_like(kc)
    slots, zero = SLOTS.to("meta"), torch.zeros(1, device="meta")
    torch.ops.memwarden.reshape_and_cache_flash(key, value, kc, vc, slots, "int8", zero, zero)
    with pytest.raises(ValueError, match="k_scale must have 1 or num_heads"):
        torch.ops.memwarden.reshape_and_cache_flash(key, value, kc, vc, slots, "int8", torch.zeros(3, device="meta"),
                                                    zero)


# ---- overlapping outputs ---------------------------------------------------------------

def expanded(dtype=torch.float16, shape=(NB, BS, H, D)):
    """A cache whose block dimension has stride 0: every block is the same memory."""
    return torch.zeros((1,) + shape[1:], dtype=dtype).expand(shape)


def overlapping_pair(dtype=torch.float16):
    """Two [NB, BS, H, D] views of one buffer, one block apart."""
    buf = torch.zeros(NB + 1, BS, H, D, dtype=dtype)
    return buf[:NB], buf[1:]


def flash_rejections():
    key, value = kv()
    kc, vc = flash_cache(), flash_cache()
    a, b = overlapping_pair()
    q = torch.zeros(NB, BS, H, D, dtype=torch.int8)
    ksc, vsc = torch.zeros(NB, BS, H), torch.zeros(NB, BS, H)
    raw = torch.zeros(NB * BS * H * D, dtype=torch.int8)  # an int8 cache and its fp32 scale cache in one buffer
    raw_cache, raw_scales = raw.view(NB, BS, H, D), raw[: NB * BS * H * 4].view(torch.float32).view(NB, BS, H)
    per_token = "int8_per_token_head"
    flash = ops.reshape_and_cache_flash
    return [
        ("key_cache and value_cache overlap", lambda: flash(key, value, kc, kc, SLOTS)),
        ("key_cache and value_cache overlap", lambda: flash(key, value, a, b, SLOTS)),
        ("key_cache has elements that share memory", lambda: flash(key, value, expanded(), vc, SLOTS)),
        ("value_cache has elements that share memory",
         lambda: flash(key, value, kc, flash_cache().as_strided((NB, BS, H, D), (BS * H * D, 0, D, 1)), SLOTS)),
        ("k_scale_cache and v_scale_cache overlap",
         lambda: flash(key, value, q, q.clone(), SLOTS, per_token, k_scale_cache=ksc, v_scale_cache=ksc)),
        ("key_cache and k_scale_cache overlap",
         lambda: flash(key, value, raw_cache, q, SLOTS, per_token, k_scale_cache=raw_scales, v_scale_cache=vsc)),
        ("value_cache and v_scale_cache overlap",
         lambda: flash(key, value, q, raw_cache, SLOTS, per_token, k_scale_cache=ksc, v_scale_cache=raw_scales)),
        ("v_scale_cache has elements that share memory",
         lambda: flash(key, value, q, q.clone(), SLOTS, per_token, k_scale_cache=ksc,
                       v_scale_cache=torch.zeros(1, BS, H).expand(NB, BS, H))),
        ("key_cache and key overlap", lambda: flash(kc[0], value[:BS], kc, vc, SLOTS[:1])),
        ("value_cache and value overlap", lambda: flash(key, vc[3], kc, vc, SLOTS)),
        ("key_cache and slot_mapping overlap", lambda: flash(key, value, kc, vc, kc.view(-1)[:24].view(torch.int64))),
        ("value_cache and v_scale overlap", lambda: flash(key, value, q.clone(), q, SLOTS, "int8", torch.ones(1),
                                                          q.view(-1)[:4].view(torch.float32).fill_(0.02))),
    ]


def legacy_rejections():
    key, value = kv()
    kc, vc = legacy_caches(torch.float16)
    n = kc.numel()
    buf = torch.zeros(n + D * BS, dtype=torch.float16)
    shifted = buf[D * BS:].view(vc.shape)  # one head of one block after buf[:n]
    return [
        ("key_cache and value_cache overlap", lambda: ops.reshape_and_cache(key, value, kc, kc.view(vc.shape), SLOTS)),
        ("key_cache and value_cache overlap",
         lambda: ops.reshape_and_cache(key, value, buf[:n].view(kc.shape), shifted, SLOTS)),
        ("value_cache and key overlap", lambda: ops.reshape_and_cache(vc.view(-1, H, D)[:6], value, kc, vc, SLOTS)),
    ]


def gather_rejections():
    kc, vc = flash_cache(), flash_cache()
    out = torch.zeros(16, H, D, dtype=torch.float16)
    halves = torch.zeros(17, H, D, dtype=torch.float16)
    lens = torch.tensor([11, 5])
    gather = ops.gather_cache
    return [
        ("key_out and value_out overlap", lambda: gather(kc, vc, TABLE, lens, out, out)),
        ("key_out and value_out overlap", lambda: gather(kc, vc, TABLE, lens, halves[:16], halves[1:])),
        ("key_out has elements that share memory",
         lambda: gather(kc, vc, TABLE, lens, torch.zeros(1, H, D, dtype=torch.float16).expand(16, H, D), out)),
        ("key_out and key_cache overlap", lambda: gather(kc, vc, TABLE, lens, kc.view(-1, H, D)[:16], out)),
        ("value_out and value_cache overlap", lambda: gather(kc, vc, TABLE, lens, out, vc.view(-1, H, D)[8:24])),
        ("value_out and key_cache overlap", lambda: gather(kc, vc, TABLE, lens, out, kc.view(-1, H, D)[16:])),
        ("key_out and block_table overlap",
         lambda: gather(kc, vc, out.view(-1)[:16].view(torch.int64).view(2, 2), lens, out, out.clone())),
    ]


def block_op_rejections():
    kc, vc = flash_cache(), flash_cache()
    a, b = overlapping_pair()
    mapping = torch.tensor([[0, 1]])
    buf = torch.zeros(6, 8, 16)
    return [
        ("copy_blocks: key_caches\\[0\\] and value_caches\\[0\\] overlap",
         lambda: ops.copy_blocks([kc], [kc], mapping)),
        ("copy_blocks: key_caches\\[0\\] and key_caches\\[1\\] overlap",
         lambda: ops.copy_blocks([kc, kc], [vc, vc.clone()], mapping)),
        ("copy_blocks: key_caches\\[1\\] and value_caches\\[0\\] overlap",
         lambda: ops.copy_blocks([kc, a], [b, vc], mapping)),
        ("copy_blocks: key_caches\\[0\\] and block_mapping overlap",
         lambda: ops.copy_blocks([kc], [vc], kc.view(-1)[:8].view(torch.int64).view(1, 2))),
        ("swap_blocks: src and dst overlap", lambda: ops.swap_blocks(buf[:4], buf[2:], 512, mapping)),
        ("swap_blocks: dst and block_mapping overlap",
         lambda: ops.swap_blocks(buf[:2], buf[2:], 512, buf[2:].view(-1)[:4].view(torch.int64).view(1, 2))),
    ]


REJECTIONS = [("reshape_and_cache_flash", c) for c in flash_rejections()] + \
             [("reshape_and_cache", c) for c in legacy_rejections()] + \
             [("gather_cache", c) for c in gather_rejections()] + [(None, c) for c in block_op_rejections()]


@pytest.mark.parametrize("index", range(len(REJECTIONS)), ids=[m.replace("\\", "") for _, (m, _) in REJECTIONS])
def test_overlapping_outputs_are_errors_naming_the_arguments(index):
    # They were accepted: a write through one alias clobbered the other, or an expanded
    # cache gave every block the last token's values.
    op, (message, call) = REJECTIONS[index]
    with pytest.raises(ValueError, match=(f"^{op}: " if op else "^") + message):
        call()


def test_overlap_is_checked_on_meta_too():
    key, value = (t.to("meta") for t in kv())
    kc = torch.empty(NB + 1, BS, H, D, dtype=torch.float16, device="meta")
    one, slots = torch.ones(1, device="meta"), SLOTS.to("meta")
    for k_cache, v_cache in ((kc, kc), (kc[:NB], kc[1:])):
        with pytest.raises(ValueError, match="^reshape_and_cache_flash: key_cache and value_cache overlap"):
            torch.ops.memwarden.reshape_and_cache_flash(key, value, k_cache, v_cache, slots, "auto", one, one)


# ---- legal views of one buffer ---------------------------------------------------------

@pytest.mark.parametrize("layout", ["halves", "interleaved", "slices"])
def test_non_overlapping_views_of_one_buffer_are_accepted(layout):
    key, value = kv()
    if layout == "halves":  # [2, NB, ...]: dense, disjoint ranges of one storage
        buf = torch.full((2, NB, BS, H, D), 7, dtype=torch.float16)
        kc, vc = buf[0], buf[1]
    elif layout == "interleaved":  # [NB, 2, ...] (flashinfer's): views that are not dense
        buf = torch.full((NB, 2, BS, H, D), 7, dtype=torch.float16)
        kc, vc = buf[:, 0], buf[:, 1]
    else:  # slices of larger caches
        kc, vc = flash_cache(num_blocks=NB + 2)[1:NB + 1], flash_cache(num_blocks=NB + 2)[:NB]
    ops.reshape_and_cache_flash(key, value, kc, vc, SLOTS)
    rk, rv = flash_cache(), flash_cache()
    R.write_flash(key, value, rk, rv, SLOTS)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)

    out = torch.zeros(2, 15, H, D, dtype=torch.float16)
    ops.gather_cache(kc, vc, TABLE, SEQ_LENS, out[0], out[1])
    want = R.gather(kc, vc, TABLE, SEQ_LENS)
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    # The same cache read as key and value is fine: only written tensors must not overlap.
    ops.gather_cache(kc, kc, TABLE, SEQ_LENS, out[0], out[1])
    assert torch.equal(out[1], want[0])


def test_scale_caches_in_one_buffer_and_block_ops_on_views_are_accepted():
    key, value = kv(dtype=torch.float32)
    q = torch.zeros(2, NB, BS, H, D, dtype=torch.int8)
    scales = torch.zeros(2, NB, BS, H)
    ops.reshape_and_cache_flash(key, value, q[0], q[1], SLOTS, "int8_per_token_head", k_scale_cache=scales[0],
                                v_scale_cache=scales[1])
    rk, rv = flash_cache(torch.int8, fill=0), flash_cache(torch.int8, fill=0)
    rks, rvs = torch.zeros(NB, BS, H), torch.zeros(NB, BS, H)
    R.write_flash(key, value, rk, rv, SLOTS, "int8_per_token_head", k_scale_cache=rks, v_scale_cache=rvs)
    assert torch.equal(q[0], rk) and torch.equal(q[1], rv)
    assert torch.equal(scales[0], rks) and torch.equal(scales[1], rvs)

    layers = torch.randn(3, 2, NB, BS, H, D)  # [layer, k/v, ...] in one buffer
    expected = layers.clone()
    expected[:, :, 3] = expected[:, :, 0]
    ops.copy_blocks([layers[i, 0] for i in range(3)], [layers[i, 1] for i in range(3)], torch.tensor([[0, 3]]))
    assert torch.equal(layers, expected)

    buf = torch.randn(8, 8, 16)
    expected = buf.clone()
    expected[5] = expected[2]
    ops.swap_blocks(buf[:4], buf[4:], 512, torch.tensor([[2, 1]]))  # disjoint halves: block 1 of buf[4:] is buf[5]
    ops.swap_blocks(buf, buf, 512, torch.tensor([[7, 6]]))  # the same tensor (block pairs checked)
    expected[6] = expected[7]
    assert torch.equal(buf, expected)


# ---- CUDA: the scale values are checked with the index checks --------------------------

@cuda_only
@pytest.mark.parametrize("op", SCALE_OPS)
def test_cuda_checks_scales_on_the_host_with_the_index_checks(op):
    key, value = (t.cuda() for t in kv())
    kc = torch.full((NB, BS, H, D), 7, dtype=torch.int8, device="cuda")
    vc = kc.clone()
    good, bad = torch.full((H,), 0.02, device="cuda"), torch.tensor([0.02, math.nan], device="cuda")
    table, lens = TABLE.cuda(), SEQ_LENS.cuda()
    out = torch.zeros(2, 15, H, D, dtype=torch.float16, device="cuda")

    def call(k_scale, v_scale):
        if op == "reshape_and_cache_flash":
            ops.reshape_and_cache_flash(key, value, kc, vc, SLOTS.cuda(), "int8", k_scale, v_scale)
        elif op == "reshape_and_cache":
            lk, lv = (t.cuda() for t in legacy_caches(torch.int8))
            ops.reshape_and_cache(key, value, lk, lv, SLOTS.cuda(), "int8", k_scale, v_scale)
        elif op == "gather_cache":
            ops.gather_cache(kc, vc, table, lens, out[0], out[1], "int8", k_scale, v_scale)
        else:
            ops.gather_kv(kc, vc, table, lens, "int8", k_scale=k_scale, v_scale=v_scale)

    name = "gather_cache" if op == "gather_kv" else op
    with pytest.raises(ValueError, match=re.escape(f"{name}: v_scale must be positive and finite")):
        call(good, bad)
    assert bool((kc == 7).all())
    with ops.cuda_index_checks(False):  # no host copy, no sync: the scale is used as given
        call(bad, good)
    torch.cuda.synchronize()


@cuda_only
def test_cuda_overlap_checks():
    key, value = (t.cuda() for t in kv())
    kc = torch.zeros(NB, BS, H, D, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="^reshape_and_cache_flash: key_cache and value_cache overlap"):
        ops.reshape_and_cache_flash(key, value, kc, kc, SLOTS.cuda())
    with pytest.raises(ValueError, match="^gather_cache: key_out and value_out overlap"):
        out = torch.zeros(15, H, D, dtype=torch.float16, device="cuda")
        ops.gather_cache(kc, kc, TABLE.cuda(), SEQ_LENS.cuda(), out, out)
