"""Case construction and the oracle of the paged-KV fuzz suite (test_fuzz_kv.py).

A case is a plain dict, one value per key of a CHOICES table (op, dtypes, sizes, layouts
of every tensor, index-tensor kinds, scale kinds, value regime, seed, ...). The same table
feeds hypothesis (``st.sampled_from`` per key) and ``random.Random`` (the crash sample
that runs in a subprocess), so both draw the same space and a failure prints readably.

Tensors are built as views of a flat *base* buffer, so the oracle can rebuild the same
view on a copy of the base, apply the plain-PyTorch reference (kv_reference.py) there and
compare whole buffers: whatever the op wrote outside the addressed slots (or outside the
view) shows up. Every case is classified by ``check``: a *correct result* (bitwise equal
to the reference for ``"auto"``, within one INT8 step for the INT8 cache dtypes) or a
*clear error* (``fuzz_runner.classify_error``: TypeError/ValueError, or IndexError for an
index value out of range as the ops raise today, naming the argument, only for invalid
arguments). Anything else raises AssertionError.

Two C++ bugs of issue 11 are *regions* (``known_bug_regions``): a zero, negative, NaN or
Inf static scale with kv_cache_dtype "int8" ("accepted a bad scale") and overlapping or
aliased outputs ("accepted overlapping outputs"). The oracle treats both as invalid
arguments (fixed: the ops now raise); the main properties leave them to the region tests,
and assume away the defects this suite found (``FOUND``) while they stand.
"""
from __future__ import annotations

import math
import random

import torch

import fuzz_runner as fr
import kv_reference as R
from memwarden.kv import ops

FLOAT = fr.FLOAT_DTYPES
KV_DTYPES = ops.KV_CACHE_DTYPES
INDEX_ERROR_OK = "index value out of range"  # reasons that may raise IndexError (what the ops raise today)

BAD_SCALE = "accepted a bad scale"
OVERLAP = "accepted overlapping outputs"
# ----------------------------------------------------------------------------- the case space

def mostly(valid: tuple, rare: tuple, p: float = 0.9) -> tuple:
    """Choices where a valid value comes up with probability about ``p`` (the invalid
    knobs of a case multiply: most cases must still reach the op's kernel)."""
    n = max(1, math.ceil(p / (1 - p) * len(rare) / len(valid)))
    return tuple(valid) * n + tuple(rare)


_layouts = mostly(("contiguous", "contiguous", "fused", "heads_major", "expanded", "overlapping"), ("last_strided",))
_slots = mostly(("valid", "valid", "valid", "dups", "all_negative", "very_negative", "strided"),
                ("out_of_range", "huge", "int32", "float", "meta", "2d", "too_many", "not_tensor"), 0.85)
_index = mostly(("valid", "valid", "valid", "garbage_unused", "int32", "strided"),
                ("out_of_range", "negative", "float", "meta", "1d", "not_tensor"), 0.85)
# "fit": k_scale_cache/v_scale_cache when the cache dtype is "int8_per_token_head", else None
_scale_caches = mostly(("fit", "fit", "fit", "transposed"),
                       ("none", "good", "wrong_shape", "float16", "meta", "not_tensor", "view_of_cache", "shared",
                        "expanded"), 0.8)
_block_maps = mostly(("valid", "valid", "fanout", "empty", "strided"),
                     ("dup_dst", "chain", "out_of_range", "negative", "int32", "float", "meta", "n_by_3", "1d",
                      "not_tensor"), 0.8)
_common = dict(
    seed=tuple(range(64)),
    regime=("normal",) * 4 + ("zeros", "constant", "huge", "tiny_ok", "all_tiny"),
    num_blocks=(0, 1, 2, 3, 3, 5, 5), block_size=(1, 2, 3, 4, 8), num_heads=(0, 1, 2, 2, 3, 3),
    head_size=(0, 1, 4, 8, 8, 16, 16, 32),
)
_flash_layouts = ("NHD", "NHD", "HND", "HND", "block_slice", "padded_heads")
CHOICES = {
    "write": dict(
        _common,
        op=("flash", "flash", "legacy"),
        kv_dtype=mostly(("auto", "int8", "int8_per_token_head"), ("fp8", "INT8", 3)),
        dtype=mostly(FLOAT, (torch.float64, torch.int8, torch.int32)),
        block_size=mostly((1, 2, 3, 4, 8), (0,)), num_tokens=(0, 1, 2, 3, 5, 8, 8), padding=(0, 0, 2),
        key_layout=_layouts, value_layout=_layouts,
        value_bad=mostly((None,), ("dtype", "heads", "rows", "ndim", "not_tensor")),
        cache_layout=mostly(_flash_layouts, ("last_strided", "ndim3", "wrong_dtype", "value_shape", "not_tensor",
                                             "expand_blocks", "overlap_slots", "alias"), 0.8),
        slots=_slots,
        k_scale=mostly(("one", "per_head", "none"), ("wrong_numel", "float64", "strided", "meta", "not_tensor",
                                                      "zero", "negative", "nan", "inf", "one_head_zero"), 0.8),
        v_scale_same=(True,) * 9 + (False,), scale_cache=_scale_caches,
    ),
    "gather": dict(
        _common,
        op=("gather_cache", "gather_cache", "gather_kv"),
        kv_dtype=mostly(("auto", "int8", "int8_per_token_head"), ("fp8", 3)),
        dtype=mostly(FLOAT, (torch.float64, torch.int32)),
        out_dtype=mostly((None, None, None) + FLOAT, (torch.int8, "float16")),
        num_seqs=(0, 1, 2, 2, 3), max_blocks=(0, 1, 2, 2, 3),
        cache_layout=mostly(_flash_layouts + ("expand_blocks",),
                            ("last_strided", "ndim3", "wrong_dtype", "value_shape", "not_tensor"), 0.85),
        seq_lens=mostly(("valid", "valid", "valid", "int32", "strided"),
                        ("too_long", "negative", "float", "meta", "2d", "count", "not_tensor"), 0.85),
        block_table=_index,
        out=mostly(("good", "good", "row_slice"),
                   ("rows", "dtype", "last_strided", "heads", "not_tensor", "expand_rows", "alias"), 0.85),
        k_scale=mostly(("one", "per_head"), ("none", "wrong_numel", "float64", "strided", "meta", "not_tensor",
                                             "zero", "negative", "nan", "inf", "one_head_zero"), 0.8),
        v_scale_same=(True,) * 9 + (False,), scale_cache=_scale_caches,
    ),
    "copy": dict(
        _common,
        num_layers=(0, 1, 1, 2, 2, 3), dtype=FLOAT + (torch.int8, torch.float64),
        mixed_layers=(False, False, True),
        cache_layout=mostly(_flash_layouts, ("expand_blocks", "not_dense", "value_blocks", "value_missing",
                                             "not_list", "meta_layer"), 0.85),
        block_mapping=_block_maps, num_pairs=(0, 1, 2, 3, 3),
    ),
    "swap": dict(
        _common,
        dtype=FLOAT + (torch.int8, torch.float64), dst_dtype=(None,) * 3 + FLOAT + (torch.int8,),
        dst_blocks=(0, 1, 2, 4, 4), same_tensor=(False,) * 3 + (True,),
        cache_layout=mostly(_flash_layouts, ("expand_blocks", "not_dense", "meta_dst", "not_tensor"), 0.85),
        nbytes=mostly(("full", "full", "part", "zero"), ("negative", "too_many", "huge", "float", "str", "bool"),
                      0.85),
        block_mapping=_block_maps, num_pairs=(0, 1, 2, 3, 3),
    ),
}
SPECIAL_VALUES = fr.SPECIALS


def random_case(rng: random.Random, kind: str) -> dict:
    """A case drawn from CHOICES with ``rng`` (what the hypothesis strategies draw)."""
    case = {key: rng.choice(values) for key, values in CHOICES[kind].items()}
    case["kind"] = kind
    case["specials"] = tuple((rng.randrange(400), rng.choice(SPECIAL_VALUES)) for _ in range(rng.randint(0, 3)))
    return case


# ----------------------------------------------------------------------------- tensors as views of a base

def _bits(t: torch.Tensor) -> torch.Tensor:
    """A 1-D buffer as integers of its element size (bitwise comparison, NaN payloads included)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class Buf:
    """A tensor and the flat base buffer it views (``like(copy)`` rebuilds the view on a copy)."""

    def __init__(self, base: torch.Tensor, view: torch.Tensor):
        self.base, self.view = base, view

    def like(self, base: torch.Tensor) -> torch.Tensor:
        return base.as_strided(self.view.shape, self.view.stride(), self.view.storage_offset())


def values(shape, dtype, case, salt=0) -> torch.Tensor:
    """Contents of a tensor: random INT8 codes, or the case's value regime and special
    values (fuzz_runner.make_values) for a float dtype (salts >= 10: no specials)."""
    if dtype == torch.int8:
        g = torch.Generator().manual_seed(case["seed"] * 7 + salt)
        return torch.randint(-128, 128, shape, generator=g, dtype=torch.int64).to(dtype)
    if not dtype.is_floating_point:
        return torch.arange(math.prod(shape)).reshape(shape).to(dtype)
    specials = case["specials"] if salt < 10 else ()
    return fr.make_values(shape, case["regime"], case["seed"] * 7 + salt, specials).to(dtype)


def from_base(base: torch.Tensor, shape, strides, offset=0) -> Buf:
    return Buf(base, base.as_strided(shape, strides, offset))


def dense(shape, dtype, case, salt) -> Buf:
    base = values((math.prod(shape),), dtype, case, salt)
    return from_base(base, shape, _contiguous_strides(shape))


def _contiguous_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return list(reversed(strides))


def token_tensor(rows, h, d, dtype, layout, case, salt) -> Buf:
    """key/value [rows, H, D] in a layout (views of a flat base)."""
    n = rows * h * d
    if layout == "fused":  # a slice of a [rows, 3H, D] qkv tensor
        base = values((rows * 3 * h * d,), dtype, case, salt)
        return from_base(base, (rows, h, d), (3 * h * d, d, 1), h * d)
    if layout == "heads_major":  # [H, rows, D] transposed: the head stride is rows * D
        base = values((n,), dtype, case, salt)
        return from_base(base, (rows, h, d), (d, rows * d, 1))
    if layout == "expanded":  # stride 0 over tokens: every token reads one row
        base = values((h * d,), dtype, case, salt)
        return from_base(base, (rows, h, d), (0, d, 1))
    if layout == "overlapping":  # token rows overlap by half (reading overlapping input is fine)
        step = max(1, h * d // 2)
        base = values(((rows + 1) * h * d + 1,), dtype, case, salt)
        return from_base(base, (rows, h, d), (step, d, 1))
    if layout == "last_strided":  # last dimension not contiguous (invalid when d > 1)
        base = values((2 * n + 1,), dtype, case, salt)
        return from_base(base, (rows, h, d), (2 * h * d, 2 * d, 2))
    base = values((n,), dtype, case, salt)
    return from_base(base, (rows, h, d), _contiguous_strides((rows, h, d)))


def flash_cache(nb, bs, h, d, dtype, layout, case, salt) -> Buf:
    """A flash-layout cache [nb, bs, H, D] (views of a flat base)."""
    n = nb * bs * h * d
    if layout == "HND":
        base = values((n,), dtype, case, salt)
        return from_base(base, (nb, bs, h, d), (bs * h * d, d, bs * d, 1))
    if layout == "block_slice":  # every other block of a twice as large cache
        base = values((2 * n,), dtype, case, salt)
        return from_base(base, (nb, bs, h, d), (2 * bs * h * d, h * d, d, 1))
    if layout == "padded_heads":  # D of a head of 2D + 1 elements
        base = values((nb * bs * h * (2 * d + 1),), dtype, case, salt)
        return from_base(base, (nb, bs, h, d), (bs * h * (2 * d + 1), h * (2 * d + 1), 2 * d + 1, 1))
    if layout == "last_strided":
        base = values((2 * n,), dtype, case, salt)
        return from_base(base, (nb, bs, h, d), (2 * bs * h * d, 2 * h * d, 2 * d, 2))
    if layout == "expand_blocks":  # every block is the same memory (stride 0)
        base = values((bs * h * d,), dtype, case, salt)
        return from_base(base, (nb, bs, h, d), (0, h * d, d, 1))
    if layout == "overlap_slots":  # slots overlap: slot stride D, a slot holds H x D
        base = values((nb * (bs + h) * d + 1,), dtype, case, salt)
        return from_base(base, (nb, bs, h, d), ((bs + h) * d, d, d, 1))
    if layout == "not_dense":  # half of each head: a block is not dense
        base = values((2 * n,), dtype, case, salt)
        return from_base(base, (nb, bs, h, d), (2 * bs * h * d, 2 * h * d, 2 * d, 1))
    base = values((n,), dtype, case, salt)
    return from_base(base, (nb, bs, h, d), _contiguous_strides((nb, bs, h, d)))


def overlaps(view: torch.Tensor) -> bool:
    """Two index tuples of ``view`` address the same element (brute force, small tensors)."""
    if view.numel() <= 1:
        return False
    idx = torch.zeros(view.shape, dtype=torch.int64)
    for dim, stride in enumerate(view.stride()):
        shape = [1] * view.dim()
        shape[dim] = view.shape[dim]
        idx = idx + (torch.arange(view.shape[dim]) * stride).reshape(shape)
    flat = idx.reshape(-1)
    return flat.unique().numel() != flat.numel()


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` share at least one element (both non-empty, same storage)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        lo = t.storage_offset() * t.element_size()
        hi = lo + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
        return lo, hi

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


# ----------------------------------------------------------------------------- index tensors and scales

def index_tensor(kind, valid: torch.Tensor, bad_value: int, reasons, name, allow_int32=False):
    """``valid`` (int64) turned into the ``kind`` of index argument; appends the reasons it
    makes the call invalid."""
    if kind == "not_tensor":
        reasons.append(("not a tensor", name))
        return valid.tolist()
    t = valid.clone()
    if kind in ("out_of_range", "negative", "huge") and t.numel():
        t.view(-1)[t.numel() // 2] = bad_value
        reasons.append((INDEX_ERROR_OK, name))
    elif kind == "int32":
        t = t.int()
        if not allow_int32:
            reasons.append(("int32", name))
    elif kind == "float":
        t = t.float()
        reasons.append(("float", name))
    elif kind == "meta":
        t = t.to("meta")
        reasons.append(("on the meta device", name))
    elif kind == "strided":
        big = torch.stack([t, torch.full_like(t, -(2**40))], -1)
        t = big[..., 0]
    return t


def static_scale(kind, h, reasons, name, kv_dtype):
    """k_scale/v_scale of ``kind``; appends reasons (only "int8" reads them)."""
    read = kv_dtype == "int8"
    n = h if kind in ("per_head", "strided", "one_head_zero") else 1
    if kind == "none":
        return None
    if kind == "not_tensor":
        reasons.append(("not a tensor", name))
        return [0.02]
    s = torch.full((n,), 0.02) + torch.arange(n) * 0.005
    if kind == "wrong_numel":
        s = torch.full((h + 2,), 0.02)
        if read and h + 2 != 1:
            reasons.append(("numel", name))
    elif kind == "float64":
        s = s.double()
        if read:
            reasons.append(("dtype", name))
    elif kind == "strided":
        s = torch.stack([s, s], -1)[..., 0]
        if read and not s.is_contiguous():
            reasons.append(("not contiguous", name))
    elif kind == "meta":
        s = s.to("meta")
        if read:  # an unread one is replaced by the wrappers' default (ops._static_scale)
            reasons.append(("on the meta device", name))
    elif kind in ("zero", "negative", "nan", "inf"):
        s = torch.full((n,), {"zero": 0.0, "negative": -0.5, "nan": math.nan, "inf": math.inf}[kind])
    elif kind == "one_head_zero" and n:
        s[-1] = 0.0
    return s


def _fit(kind, kv_dtype):
    """The scale-cache kind: "fit" is a good one for "int8_per_token_head", else none."""
    if kind in ("fit", "transposed") and kv_dtype != "int8_per_token_head":
        return "none"
    return "good" if kind == "fit" else kind


def bad_scale_values(s) -> bool:
    return isinstance(s, torch.Tensor) and s.dtype == torch.float32 and not s.is_meta and bool(
        (~(torch.isfinite(s) & (s > 0))).any())


# ----------------------------------------------------------------------------- the oracle

# Either a correct result or a clear error: the known bugs' arguments when nothing is
# written (a fix may or may not look at them then).
BAD_SCALE_IDLE = "bad scale, nothing written"
OVERLAP_IDLE = "overlapping outputs, nothing written"
LENIENT = {BAD_SCALE_IDLE, OVERLAP_IDLE}


def region(regions, reasons, written, name, *args):
    """A known bug's region when something is written, else a lenient reason."""
    if written:
        regions.setdefault(name, []).extend(args)
    else:
        reasons.extend(((BAD_SCALE_IDLE if name == BAD_SCALE else OVERLAP_IDLE), a) for a in args)


def _run(op, fn, reasons, regions):
    """Call ``fn``: False when it raised a clear error, True when it returned (and
    should have). Regions (known bugs) count as invalid arguments named by the region."""
    strict = [r for r in reasons if r[0] not in LENIENT]
    expect = reasons + [(region, name) for region, names in regions.items() for name in names]
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - classified
        if isinstance(exc, IndexError) and any(r[0] == INDEX_ERROR_OK for r in expect):
            # IndexError is how the ops report an index value out of range
            fr.classify_error(op, ValueError(str(exc)), [r for r in expect if r[0] == INDEX_ERROR_OK])
            return False
        fr.classify_error(op, exc, expect)
        return False
    if regions:
        raise AssertionError("; ".join(f"{op}: {r} ({', '.join(sorted(set(names)))})" for r, names in sorted(regions.items())))
    if strict:
        raise AssertionError(f"{op}: invalid arguments {strict} were accepted")
    return True


def compare(what, got: torch.Tensor, want: torch.Tensor, mask=None, int8=False, atol=None):
    """``got`` == ``want`` bitwise; under ``mask`` INT8 codes may differ by one step
    (``int8``) or floats by ``atol`` (NaN matching NaN)."""
    same = _bits(got) == _bits(want)
    where = "outside the addressed elements " if mask is not None else "(bitwise) "
    if mask is None:
        mask = torch.zeros_like(same)
    outside = ~mask & ~same
    if outside.any():
        at = outside.nonzero().reshape(-1)[:5]
        raise AssertionError(f"{what} differs from the reference {where}at flat {at.tolist()}: "
                             f"{got[at].tolist()} vs {want[at].tolist()}")
    if int8:
        bad = mask & ((got.int() - want.int()).abs() > 1)
        what_bad = "INT8 codes differ from the reference by more than one step"
    elif atol is not None:
        g, w = got.double(), want.double()
        bad = mask & ~(same | (torch.isnan(g) & torch.isnan(w)) | (g == w) | ((g - w).abs() <= atol.double()))
        what_bad = "differs from the reference by more than the tolerance"
    else:
        bad = mask & ~same
        what_bad = "differs from the reference"
    if bad.any():
        at = bad.nonzero().reshape(-1)[:5]
        raise AssertionError(f"{what}: {what_bad} at flat {at.tolist()}: {got[at].tolist()} vs {want[at].tolist()}")


def block_is_dense(view: torch.Tensor) -> bool:
    """swap/copy_blocks' rule: the dimensions after the first, sorted by stride, tile a
    range without gaps."""
    if view.size(0) == 0 or math.prod(view.shape[1:]) == 0:
        return True
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(view.stride()[1:], view.shape[1:]) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def blocks_overlap(view: torch.Tensor) -> bool:
    per = math.prod(view.shape[1:])
    return view.size(0) > 1 and per > 0 and view.stride(0) < per


# ----------------------------------------------------------------------------- writes

def build_write(case):
    """Arguments of a write (flash or legacy) and the reasons they are invalid."""
    reasons, regions = [], {}
    op = "reshape_and_cache_flash" if case["op"] == "flash" else "reshape_and_cache"
    kvd, dtype = case["kv_dtype"], case["dtype"]
    nb, bs, h, d, nt = case["num_blocks"], case["block_size"], case["num_heads"], case["head_size"], case["num_tokens"]
    if not isinstance(kvd, str):
        reasons.append(("not a string", "kv_cache_dtype"))
    elif kvd not in KV_DTYPES or (op == "reshape_and_cache" and kvd == "int8_per_token_head"):
        reasons.append(("unknown", "kv_cache_dtype"))
    int8 = isinstance(kvd, str) and kvd.startswith("int8")
    if dtype not in FLOAT:
        reasons.append(("dtype", "key"))
    rows = nt + case["padding"]
    key = token_tensor(rows, h, d, dtype, case["key_layout"], case, 1)
    value = token_tensor(rows, h, d, dtype, case["value_layout"], case, 2)
    for name, t in (("key", key), ("value", value)):
        if case[name + "_layout"] == "last_strided" and d > 1:
            reasons.append(("last dim not contiguous", name))
    vb = case["value_bad"]
    value_arg = value.view
    if vb == "dtype":
        value_arg = value.view.to(torch.float64 if dtype != torch.float64 else torch.float32)
        reasons.append(("dtype", "value"))
    elif vb == "heads":
        value_arg = torch.zeros(rows, h + 1, d, dtype=dtype)
        reasons.append(("heads", "value"))
    elif vb == "rows" and nt > 0:
        value_arg = value.view[: nt - 1]
        reasons.append(("rows", "value"))
    elif vb == "ndim":
        value_arg = value.view.reshape(rows, h * d)
        reasons.append(("ndim", "value"))
    elif vb == "not_tensor":
        value_arg = "value"
        reasons.append(("not a tensor", "value"))
    cache_dtype = torch.int8 if int8 else (dtype if dtype in FLOAT else torch.float32)
    layout = case["cache_layout"]
    if layout == "wrong_dtype":
        cache_dtype = torch.float16 if int8 else (torch.int8 if cache_dtype != torch.int8 else torch.float32)
        reasons.append(("cache dtype", "key_cache"))
    if op == "reshape_and_cache_flash":
        kc = flash_cache(nb, bs, h, d, cache_dtype, layout, case, 3)
        vc = flash_cache(nb, bs, h, d, cache_dtype, "NHD" if layout == "value_shape" else layout, case, 4)
        if layout == "value_shape":
            vc = flash_cache(nb, bs, h, d + 1, cache_dtype, "NHD", case, 4)
            reasons.append(("shape", "value_cache"))
        if layout == "last_strided" and d > 1:
            reasons.append(("last dim not contiguous", "key_cache"))
        if bs == 0:
            reasons.append(("block size 0", "key_cache"))
    else:
        x = 16 // torch.empty(0, dtype=cache_dtype).element_size()
        kshape = (nb, h, d // x, bs, x)
        kc = dense(kshape, cache_dtype, case, 3)
        vc = dense((nb, h, d, bs), cache_dtype, case, 4)
        if layout in ("block_slice", "last_strided", "expand_blocks", "overlap_slots") and nb * h * max(d // x, 1) * bs > 1:
            base = values((2 * kc.base.numel() + 2,), cache_dtype, case, 3)
            kc = from_base(base, kshape, [2 * s for s in _contiguous_strides(kshape)])
            if not kc.view.is_contiguous():
                reasons.append(("not contiguous", "key_cache"))
        if layout == "value_shape":
            vc = dense((nb, h, d, bs + 1), cache_dtype, case, 4)
            reasons.append(("shape", "value_cache"))
        if d % x:
            reasons.append(("head_size not a multiple of x", "head_size"))  # key's last dimension
        if bs == 0:
            reasons.append(("block size 0", "key_cache"))
    key_cache_arg = kc.view
    if layout == "ndim3":
        key_cache_arg = torch.zeros(nb * bs, h, d, dtype=cache_dtype)
        reasons.append(("ndim", "key_cache"))
    if layout == "not_tensor":
        key_cache_arg = "key_cache"
        reasons.append(("not a tensor", "key_cache"))
    # slot_mapping
    limit = nb * max(bs, 0)
    g = torch.Generator().manual_seed(case["seed"])
    kind = case["slots"]
    if limit:
        perm = torch.randperm(limit, generator=g)
        if kind == "dups":  # two tokens to one slot: the reference keeps the last
            valid = perm[torch.arange(nt) % max(1, min(limit, (nt + 1) // 2))]
        else:
            valid = torch.cat([perm, torch.full((nt,), -1)])[:nt]
            if nt > 1:
                valid[(case["seed"] % nt)] = -1
    else:
        valid = torch.full((nt,), -1, dtype=torch.int64)
    if kind == "all_negative":
        valid = torch.full((nt,), -1, dtype=torch.int64)
    elif kind == "very_negative" and nt:
        valid[0] = -(2**62)
    elif kind == "too_many":
        valid = torch.cat([valid, torch.full((case["padding"] + 1,), -1, dtype=torch.int64)])
        reasons.append(("more slots than key rows", "slot_mapping"))
    elif kind == "2d":
        valid = valid.reshape(-1, 1)
        reasons.append(("2-D", "slot_mapping"))
    bad = {"out_of_range": limit, "huge": 2**62}.get(kind, limit)
    slots = index_tensor(kind, valid, bad, reasons, "slot_mapping")
    written = bool(((valid >= 0) & (valid < limit)).any()) and h * d > 0 and kind != "too_many"
    if op == "reshape_and_cache_flash":
        if layout == "expand_blocks" and nb > 1 and bs * h * d > 0:
            region(regions, reasons, written, OVERLAP, "key_cache", "value_cache")
        if layout == "overlap_slots" and overlaps(kc.view):
            region(regions, reasons, written, OVERLAP, "key_cache", "value_cache")
    if layout == "alias":
        if op == "reshape_and_cache_flash":
            vc = kc
        elif kc.base.numel() >= nb * h * d * bs:  # the value cache viewing the key cache's memory
            vc = from_base(kc.base, (nb, h, d, bs), _contiguous_strides((nb, h, d, bs)))
        if vc.base is kc.base and kc.view.numel():
            region(regions, reasons, written, OVERLAP, "key_cache", "value_cache")
    # scales
    k_scale = static_scale(case["k_scale"], h, reasons, "k_scale", kvd)
    v_kind = case["k_scale"] if case["v_scale_same"] else ("per_head" if case["k_scale"] == "one" else "one")
    v_scale = static_scale(v_kind, h, reasons, "v_scale", kvd)
    if kvd == "int8":
        nk = k_scale.numel() if isinstance(k_scale, torch.Tensor) else 1
        nv = v_scale.numel() if isinstance(v_scale, torch.Tensor) else 1
        if h != 1 and (nk == h) != (nv == h) and nk in (1, h) and nv in (1, h):
            reasons.append(("k_scale and v_scale differ", "v_scale"))
        for s, name in ((k_scale, "k_scale"), (v_scale, "v_scale")):
            if bad_scale_values(s) and (s.numel() in (1, h)):
                region(regions, reasons, written, BAD_SCALE, name)
    ksc = vsc = None
    sc_kind = _fit(case["scale_cache"], kvd) if op == "reshape_and_cache_flash" else "none"
    if sc_kind != "none":
        ksc, vsc = scale_caches(sc_kind, nb, bs, h, kc, case, reasons, regions,
                                written if kvd == "int8_per_token_head" else None)
    if kvd == "int8_per_token_head":
        if sc_kind == "none":
            reasons.append(("required", "k_scale_cache"))
    elif sc_kind != "none":
        reasons.append(("only with int8_per_token_head", "k_scale_cache"))
    args = [key.view, value_arg, key_cache_arg, vc.view, slots, kvd, k_scale, v_scale]
    if op == "reshape_and_cache_flash":
        args += [None if ksc is None else ksc.view if isinstance(ksc, Buf) else ksc,
                 None if vsc is None else vsc.view if isinstance(vsc, Buf) else vsc]
    return dict(op=op, args=args, reasons=reasons, regions=regions, key=key, value=value, kc=kc, vc=vc, ksc=ksc,
                vsc=vsc, slots=slots, k_scale=k_scale, v_scale=v_scale)


def scale_caches(kind, nb, bs, h, kc, case, reasons, regions, written):
    shape = (nb, bs, h)
    if kind == "not_tensor":
        reasons.append(("not a tensor", "k_scale_cache"))
        return [1.0], None
    k = dense(shape, torch.float32, case, 5)
    v = dense(shape, torch.float32, case, 6)
    if kind == "wrong_shape":
        k = dense((nb, bs, h + 1), torch.float32, case, 5)
        reasons.append(("shape", "k_scale_cache"))
    elif kind == "float16":
        k = Buf(k.base.half(), k.view.half())
        reasons.append(("dtype", "k_scale_cache"))
    elif kind == "transposed":
        base = values((nb * bs * h,), torch.float32, case, 5)
        k = from_base(base, shape, (bs * h, 1, bs))
    elif kind == "meta":
        k = Buf(k.base.to("meta"), k.view.to("meta"))
        reasons.append(("on the meta device", "k_scale_cache"))
    elif kind == "expanded" and nb > 1 and bs * h:
        base = values((bs * h,), torch.float32, case, 5)
        k = from_base(base, shape, (0, h, 1))
        if written is not None:
            region(regions, reasons, written, OVERLAP, "k_scale_cache")
    elif kind == "shared":
        v = k
        if written is not None and k.view.numel():
            region(regions, reasons, written, OVERLAP, "k_scale_cache", "v_scale_cache")
    elif kind == "view_of_cache" and kc.base.dtype == torch.int8:
        n = nb * bs * h
        if kc.base.numel() >= 4 * n and n and kc.base.numel() % 4 == 0:
            k = from_base(kc.base.view(torch.float32), shape, _contiguous_strides(shape))
            if written is not None and same_memory(k.view, kc.view):
                region(regions, reasons, written, OVERLAP, "k_scale_cache", "key_cache")
    return k, v


def check_write(case) -> None:
    w = build_write(case)
    op, args, reasons, regions = w["op"], w["args"], w["reasons"], w["regions"]
    fn = ops.reshape_and_cache_flash if op == "reshape_and_cache_flash" else ops.reshape_and_cache
    # the reference (on copies, before the op runs)
    if not (reasons and any(r[0] not in LENIENT for r in reasons)) and not regions:
        expected = reference_write(w, case)
    else:
        expected = None
    ok = _run(op, lambda: fn(*args), reasons, regions)
    if not ok:
        return
    assert expected is not None
    kvd = case["kv_dtype"]
    for name, buf in (("key_cache", w["kc"]), ("value_cache", w["vc"]), ("k_scale_cache", w["ksc"]),
                      ("v_scale_cache", w["vsc"])):
        if buf is None:
            continue
        want, mask = expected[name]
        got = buf.base.reshape(-1)
        if "scale" in name:  # absmax / 127 in fp32 on both sides
            compare(f"{op}: {name}", got, want.reshape(-1), mask.reshape(-1), atol=want.reshape(-1).double().abs() * 2e-6)
        else:
            compare(f"{op}: {name}", got, want.reshape(-1), mask.reshape(-1), int8=kvd != "auto")
    if kvd == "int8_per_token_head":
        round_trip(w, case)


def reference_write(w, case):
    """Expected bases (and addressed-element masks) of every written buffer."""
    kvd = case["kv_dtype"]
    key, value = w["key"].view, w["value"].view
    one = torch.ones(1)  # the wrappers' default scales
    w = dict(w, k_scale=one if w["k_scale"] is None else w["k_scale"], v_scale=one if w["v_scale"] is None else w["v_scale"])
    out = {}
    if w["op"] == "reshape_and_cache_flash":
        bufs = [w["kc"], w["vc"], w["ksc"], w["vsc"]]
        copies = [None if b is None else b.base.clone() for b in bufs]
        marks = [None if b is None else torch.zeros(b.base.shape, dtype=torch.float32) for b in bufs]
        views = [None if b is None else b.like(c) for b, c in zip(bufs, copies)]
        if key.size(1) * key.size(2):  # (the op returns early without heads or head elements)
            R.write_flash(key, value, views[0], views[1], w["slots"], kvd, w["k_scale"], w["v_scale"], views[2],
                          views[3])
        mviews = [None if b is None else b.like(m) for b, m in zip(bufs, marks)]
        for t in range(w["slots"].size(0)):
            s = int(w["slots"][t])
            if s >= 0:
                b, o = divmod(s, w["kc"].view.size(1))
                for mv in mviews:
                    if mv is not None:
                        mv[b, o] = 1
        for name, c, m in zip(("key_cache", "value_cache", "k_scale_cache", "v_scale_cache"), copies, marks):
            if c is not None:
                out[name] = (c, m != 0)
        return out
    kc, vc = w["kc"].view, w["vc"].view
    fk, fv = R.legacy_to_flash(kc, vc)
    fk, fv = fk.clone(), fv.clone()
    mk, mv = torch.zeros_like(fk), torch.zeros_like(fv)  # the cache dtype: flash_to_legacy uses its x
    if key.size(1) * key.size(2):
        R.write_flash(key, value, fk, fv, w["slots"], kvd, w["k_scale"], w["v_scale"])
    for t in range(w["slots"].size(0)):
        s = int(w["slots"][t])
        if s >= 0:
            b, o = divmod(s, kc.size(3))
            mk[b, o] = 1
            mv[b, o] = 1
    for name, buf, flash, marks in (("key_cache", w["kc"], fk, mk), ("value_cache", w["vc"], fv, mv)):
        legacy = R.flash_to_legacy(flash, flash)[0 if name == "key_cache" else 1]
        mark = R.flash_to_legacy(marks, marks)[0 if name == "key_cache" else 1]
        want, mask = buf.base.clone(), torch.zeros(buf.base.shape, dtype=torch.bool)
        buf.like(want).copy_(legacy)
        buf.like(mask).copy_(mark != 0)
        out[name] = (want, mask)
    return out


def round_trip(w, case):
    """int8_per_token_head: each written, finite element dequantizes within one step."""
    key, value = w["key"].view, w["value"].view
    bs = w["kc"].view.size(1)
    last = {int(s): t for t, s in enumerate(w["slots"].tolist()) if s >= 0}  # a slot keeps its last token
    for src, cache, scales in ((key, w["kc"].view, w["ksc"].view), (value, w["vc"].view, w["vsc"].view)):
        for s, t in last.items():
            b, o = divmod(s, bs)
            x = src[t].double()
            step = scales[b, o].double().view(-1, 1)
            err = (cache[b, o].double() * step - x).abs()
            ok = ~torch.isfinite(x) | (err <= step * 1.001 + 1e-45)
            assert bool(ok.all()), (f"int8_per_token_head: token {t} dequantizes off by "
                                    f"{(err / step.clamp(min=1e-300)).max().item():.3g} steps (scale {scales[b, o].tolist()})")


# ----------------------------------------------------------------------------- gather

def build_gather(case):
    reasons, regions = [], {}
    op = case["op"]
    kvd, dtype = case["kv_dtype"], case["dtype"]
    nb, bs, h, d = case["num_blocks"], case["block_size"], case["num_heads"], case["head_size"]
    ns, mb = case["num_seqs"], case["max_blocks"]
    if not isinstance(kvd, str):
        reasons.append(("not a string", "kv_cache_dtype"))
    elif kvd not in KV_DTYPES:
        reasons.append(("unknown", "kv_cache_dtype"))
    int8 = isinstance(kvd, str) and kvd.startswith("int8")
    cache_dtype = torch.int8 if int8 else dtype
    if not int8 and dtype not in FLOAT:
        reasons.append(("dtype", "key_cache"))
    layout = case["cache_layout"]
    if layout == "wrong_dtype":
        cache_dtype = torch.float16 if int8 else torch.int8
        reasons.append(("cache dtype", "key_cache"))
    kc = flash_cache(nb, bs, h, d, cache_dtype, layout, case, 3)
    vc = flash_cache(nb, bs, h, d, cache_dtype, "NHD" if layout == "value_shape" else layout, case, 4)
    if layout == "value_shape":
        vc = flash_cache(nb, bs + 1, h, d, cache_dtype, "NHD", case, 4)
        reasons.append(("shape", "value_cache"))
    if layout == "last_strided" and d > 1:
        reasons.append(("last dim not contiguous", "key_cache"))
    key_cache_arg = kc.view
    if layout == "ndim3":
        key_cache_arg = kc.base[: nb * bs * h * d].reshape(nb * bs, h, d)
        reasons.append(("ndim", "key_cache"))
    elif layout == "not_tensor":
        key_cache_arg = "key_cache"
        reasons.append(("not a tensor", "key_cache"))
    # block table and seq lens
    g = torch.Generator().manual_seed(case["seed"] + 1)
    lens = torch.randint(0, mb * bs + 1, (ns,), generator=g) if ns else torch.zeros(0, dtype=torch.int64)
    table = torch.randint(0, max(nb, 1), (ns, mb), generator=g) if nb else torch.full((ns, mb), -1)
    used = [(s, b) for s in range(ns) for b in range(-(-int(lens[s]) // bs))] if bs else []
    if nb == 0 and used:
        reasons.append((INDEX_ERROR_OK, "block_table"))
    tkind = case["block_table"]
    if tkind in ("out_of_range", "negative"):
        if used:
            s, b = used[len(used) // 2]
            table[s, b] = nb if tkind == "out_of_range" else -3
            reasons.append((INDEX_ERROR_OK, "block_table"))
        tkind = "valid"
    elif tkind == "garbage_unused":
        unused = [(s, b) for s in range(ns) for b in range(mb) if (s, b) not in set(used)]
        for s, b in unused:
            table[s, b] = 2**40 if (s + b) % 2 else -1
        tkind = "valid"
    elif tkind == "1d":
        table = table.reshape(-1)
        reasons.append(("1-D", "block_table"))
        tkind = "valid"
    table = index_tensor(tkind, table, 0, reasons, "block_table", allow_int32=True)
    lkind = case["seq_lens"]
    rows = int(lens.sum())
    if lkind == "too_long" and ns:
        lens[0] = mb * bs + 1
        rows = int(lens.sum())
        reasons.append(("too long", "seq_lens"))
    elif lkind == "negative" and ns:
        lens[-1] = -2
        rows = max(0, int(lens.sum()))
        reasons.append(("negative", "seq_lens"))
    elif lkind == "2d":
        lens = lens.reshape(-1, 1)
        reasons.append(("2-D", "seq_lens"))
    elif lkind == "count":
        lens = torch.cat([lens, torch.zeros(1, dtype=torch.int64)])
        reasons.append(("count", "seq_lens"))
    lkind = "valid" if lkind in ("too_long", "negative", "2d", "count") else lkind
    seq_lens = index_tensor(lkind, lens, 0, reasons, "seq_lens", allow_int32=True)
    # outputs
    out_dtype = case["out_dtype"] if op == "gather_kv" else None
    odt = out_dtype if isinstance(out_dtype, torch.dtype) else (cache_dtype if kvd == "auto" else torch.float16)
    if op == "gather_kv":
        if out_dtype == "float16":
            reasons.append(("not a dtype", "out_dtype"))
        elif isinstance(out_dtype, torch.dtype) and (out_dtype not in FLOAT or (kvd == "auto" and out_dtype != cache_dtype)):
            reasons.append(("out dtype", "out_dtype"))
        ko = vo = None
    else:
        okind = case["out"]
        odt = cache_dtype if kvd == "auto" and cache_dtype in FLOAT else (dtype if dtype in FLOAT else torch.float32)
        if okind == "dtype":
            odt = torch.int8 if odt != torch.int8 else torch.float32
            reasons.append(("dtype", "key_out"))
        orows = rows + (1 if okind == "rows" else 0)
        if okind == "rows":
            reasons.append(("rows", "key_out"))
        ko = token_tensor(orows, h + (1 if okind == "heads" else 0), d, odt,
                          {"last_strided": "last_strided", "row_slice": "fused"}.get(okind, "contiguous"), case, 11)
        vo = token_tensor(orows, h, d, odt, "contiguous", case, 12)
        if okind == "heads":
            reasons.append(("heads", "key_out"))
        if okind == "last_strided" and d > 1:
            reasons.append(("last dim not contiguous", "key_out"))
        if okind == "expand_rows":
            ko = token_tensor(orows, h, d, odt, "expanded", case, 11)
            if orows > 1 and h * d:
                region(regions, reasons, True, OVERLAP, "key_out")
        if okind == "alias":
            vo = ko
            if orows and h * d:
                region(regions, reasons, True, OVERLAP, "key_out", "value_out")
        if okind == "not_tensor":
            reasons.append(("not a tensor", "key_out"))
    # scales
    k_scale = static_scale(case["k_scale"], h, reasons, "k_scale", kvd)
    v_kind = case["k_scale"] if case["v_scale_same"] else ("per_head" if case["k_scale"] == "one" else "one")
    v_scale = static_scale(v_kind, h, reasons, "v_scale", kvd)
    if kvd == "int8":
        if k_scale is None or v_scale is None:
            reasons.append(("required", "k_scale"))
        else:
            nk = k_scale.numel() if isinstance(k_scale, torch.Tensor) else 1
            nv = v_scale.numel() if isinstance(v_scale, torch.Tensor) else 1
            if h != 1 and (nk == h) != (nv == h) and nk in (1, h) and nv in (1, h):
                reasons.append(("k_scale and v_scale differ", "v_scale"))
            for s, name in ((k_scale, "k_scale"), (v_scale, "v_scale")):
                if bad_scale_values(s) and s.numel() in (1, h):
                    region(regions, reasons, rows > 0 and h * d > 0, BAD_SCALE, name)
    sc_kind = _fit(case["scale_cache"], kvd)
    ksc = vsc = None
    if sc_kind != "none":
        ksc, vsc = scale_caches(sc_kind, nb, bs, h, kc, case, reasons, regions, None)  # read only: any view is fine
    if kvd == "int8_per_token_head":
        if sc_kind == "none":
            reasons.append(("required", "k_scale_cache"))
    elif sc_kind != "none":
        reasons.append(("only with int8_per_token_head", "k_scale_cache"))
    # gather_kv's own checks name its arguments: a non-tensor key_out cannot happen
    sv = lambda b: None if b is None else (b.view if isinstance(b, Buf) else b)  # noqa: E731
    if op == "gather_kv":
        args = [key_cache_arg, vc.view, table, seq_lens, kvd]
        kwargs = dict(out_dtype=out_dtype, k_scale=k_scale, v_scale=v_scale, k_scale_cache=sv(ksc),
                      v_scale_cache=sv(vsc))
    else:
        args = [key_cache_arg, vc.view, table, seq_lens, "key_out" if case["out"] == "not_tensor" else ko.view,
                vo.view, kvd, k_scale, v_scale, sv(ksc), sv(vsc)]
        kwargs = {}
    return dict(op=op, args=args, kwargs=kwargs, reasons=reasons, regions=regions, kc=kc, vc=vc, table=table,
                seq_lens=seq_lens, ko=ko, vo=vo, odt=odt, k_scale=k_scale, v_scale=v_scale, ksc=ksc, vsc=vsc)


def check_gather(case) -> None:
    w = build_gather(case)
    op, reasons, regions = w["op"], w["reasons"], w["regions"]
    fn = ops.gather_kv if op == "gather_kv" else ops.gather_cache
    result = []
    ok = _run(op, lambda: result.append(fn(*w["args"], **w["kwargs"])), reasons, regions)
    if not ok:
        return
    kvd = case["kv_dtype"]
    sv = lambda b: None if b is None else b.view  # noqa: E731
    h, d = w["kc"].view.shape[2:]
    if h * d:
        rk, rv = R.gather(w["kc"].view, w["vc"].view, w["table"], w["seq_lens"], kvd, w["odt"],
                          w["k_scale"], w["v_scale"], sv(w["ksc"]), sv(w["vsc"]))
    else:  # nothing to read (the op returns early)
        rk = rv = torch.empty(int(w["seq_lens"].sum()), h, d, dtype=w["odt"])
    steps = []
    for side, scale, sc in ((0, w["k_scale"], w["ksc"]), (1, w["v_scale"], w["vsc"])):
        if kvd != "auto" and rk.numel() == 0:
            steps.append(torch.zeros(rk.shape))
        elif kvd == "int8":
            s = scale.float().reshape(-1)
            steps.append((s.view(-1, 1) if s.numel() > 1 else s).expand(rk.shape[1:]).expand(rk.shape))
        elif kvd == "int8_per_token_head":
            rows = []
            bs = w["kc"].view.size(1)
            for si in range(w["table"].size(0)):
                for t in range(int(w["seq_lens"][si])):
                    b, o = int(w["table"][si, t // bs]), t % bs
                    rows.append(sc.view[b, o].view(-1, 1).expand(h, rk.shape[2]))
            steps.append(torch.stack(rows) if rows else torch.zeros(rk.shape))
        else:
            steps.append(None)
    if op == "gather_kv":
        got_k, got_v = result[0]
        assert got_k.dtype == w["odt"] and got_k.shape == rk.shape, (got_k.dtype, got_k.shape, rk.shape)
        pairs = ((got_k.reshape(-1), rk.reshape(-1), steps[0]), (got_v.reshape(-1), rv.reshape(-1), steps[1]))
        for (got, want, step), name in zip(pairs, ("key", "value")):
            compare(f"gather_kv: {name}", got, want, None if step is None else torch.ones_like(got, dtype=torch.bool),
                    atol=None if step is None else step.reshape(-1).double().abs() / 2)
        return
    for name, buf, ref, step in (("key_out", w["ko"], rk, steps[0]), ("value_out", w["vo"], rv, steps[1])):
        want = buf.base.clone()
        buf.like(want).copy_(ref)
        mask = torch.zeros(buf.base.shape, dtype=torch.bool)
        buf.like(mask).fill_(True)
        atol = None
        if step is not None:  # half a quantization step
            atol = torch.zeros(buf.base.shape, dtype=torch.float64)
            buf.like(atol).copy_(step.double().abs() / 2)
        compare(f"gather_cache: {name}", buf.base, want, mask if step is not None else None, atol=atol)


# ----------------------------------------------------------------------------- copy_blocks and swap_blocks

def block_mapping(kind, n_pairs, src_blocks, dst_blocks, same, seed, reasons):
    """A [n, 2] int64 mapping of ``kind`` (+ reasons). ``same``: src and dst are one tensor."""
    g = random.Random(seed)
    pairs = []
    if src_blocks and dst_blocks:
        dsts = g.sample(range(dst_blocks), min(n_pairs, dst_blocks))
        for dd in dsts:
            choices = [s for s in range(src_blocks) if not same or s not in dsts]
            if not choices:
                break
            pairs.append((g.choice(choices), dd))
    if kind == "fanout" and len(pairs) >= 1 and dst_blocks > len(pairs):
        taken = {p[1] for p in pairs} | ({p[0] for p in pairs} if same else set())
        free = [dd for dd in range(dst_blocks) if dd not in taken]
        if free:
            pairs.append((pairs[0][0], free[0]))
    if kind == "empty":
        pairs = []
    if kind == "dup_dst" and pairs:
        pairs.append((pairs[0][0], pairs[0][1]))
        reasons.append(("destination twice", "block_mapping"))
    if kind == "chain" and same and pairs and src_blocks > 1:
        other = [s for s in range(src_blocks) if s != pairs[0][1] and s not in {p[1] for p in pairs}]
        if other:
            pairs = pairs[:1] + [(pairs[0][1], other[0])] + pairs[1:]  # a destination is also a source
            reasons.append(("both source and destination", "block_mapping"))
    t = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    if kind == "out_of_range":
        t = torch.cat([t, torch.tensor([[0, dst_blocks]])]) if src_blocks else torch.tensor([[src_blocks, 0]])
        reasons.append((INDEX_ERROR_OK, "block_mapping"))
        return t
    if kind == "negative":
        t = torch.cat([t, torch.tensor([[-1, 0]])])
        reasons.append((INDEX_ERROR_OK, "block_mapping"))
        return t
    if kind == "n_by_3":
        reasons.append(("shape", "block_mapping"))
        return torch.cat([t, t[:, :1]], 1)
    if kind == "1d":
        reasons.append(("1-D", "block_mapping"))
        return t.reshape(-1)
    if kind == "strided":
        return t.t().contiguous().t()
    return index_tensor(kind if kind in ("int32", "float", "meta", "not_tensor") else "valid", t, 0, reasons,
                        "block_mapping")


def _block_cache(case, nb, layout, dtype, salt, h=None):
    bs, hh, d = case["block_size"], case["num_heads"] if h is None else h, case["head_size"]
    return flash_cache(nb, bs, hh, d, dtype, layout, case, salt)


def _block_layout_reasons(buf, layout, name, reasons):
    if not block_is_dense(buf.view):
        reasons.append(("not dense", name))
    elif blocks_overlap(buf.view):
        reasons.append(("overlapping blocks", name))


VALUE_REASONS = (INDEX_ERROR_OK, "destination twice", "both source and destination")


def _no_pairs(mapping) -> bool:
    return isinstance(mapping, torch.Tensor) and mapping.dim() == 2 and mapping.size(0) == 0


def check_copy(case) -> None:
    reasons = []
    nb, layers, layout = case["num_blocks"], case["num_layers"], case["cache_layout"]
    keys, vals = [], []
    for i in range(layers):
        dtype = case["dtype"] if not case["mixed_layers"] else FLOAT[i % 3]
        kl = layout if layout in ("HND", "block_slice", "padded_heads", "expand_blocks", "not_dense") else "NHD"
        k = _block_cache(case, nb, kl, dtype, 20 + i, h=case["num_heads"] + (i if case["mixed_layers"] else 0))
        v = _block_cache(case, nb + (1 if layout == "value_blocks" and i == 0 else 0), "NHD", dtype, 30 + i)
        _block_layout_reasons(k, kl, f"key_caches[{i}]", reasons)
        keys.append(k)
        vals.append(v)
    if layout == "value_blocks" and layers:
        reasons.append(("num blocks", "value_caches[0]"))
    mapping = block_mapping(case["block_mapping"], case["num_pairs"], nb, nb, True, case["seed"], reasons)
    key_arg, val_arg = [k.view for k in keys], [v.view for v in vals]
    if layout == "value_missing" and layers:
        val_arg = val_arg[:-1]
        reasons.append(("lengths", "value_caches"))
    elif layout == "not_list":
        key_arg = keys[0].view if layers else torch.zeros(1)
        reasons.append(("not a list", "key_caches"))
    elif layout == "meta_layer" and layers:
        val_arg[-1] = val_arg[-1].to("meta")
        reasons.append(("meta layer", f"value_caches[{layers - 1}]"))
    if not layers or _no_pairs(mapping):
        # no cache or no pair: copy_blocks returns before it reads the ids
        reasons = [r for r in reasons if r[0] not in VALUE_REASONS]
    if not layers:  # the mapping's device is checked against the first cache
        reasons = [r for r in reasons if r[0] != "on the meta device"]
    expected = None
    if not reasons:
        expected = []
        m = mapping.tolist() if layers else []
        for buf in keys + vals:
            want = buf.base.clone()
            view = buf.like(want)
            orig = buf.view.clone()
            for s, dd in m:
                view[dd] = orig[s]
            expected.append(want)
    if not _run("copy_blocks", lambda: ops.copy_blocks(key_arg, val_arg, mapping), reasons, {}):
        return
    for i, (buf, want) in enumerate(zip(keys + vals, expected)):
        compare(f"copy_blocks: cache {i}", buf.base, want)


def check_swap(case) -> None:
    reasons = []
    nb, layout = case["num_blocks"], case["cache_layout"]
    kl = layout if layout in ("HND", "block_slice", "padded_heads", "expand_blocks", "not_dense") else "NHD"
    src = _block_cache(case, nb, kl, case["dtype"], 40)
    _block_layout_reasons(src, kl, "src", reasons)
    same = case["same_tensor"]
    if same:
        dst = src
    else:
        ddt = case["dst_dtype"] or case["dtype"]
        esize = torch.empty(0, dtype=case["dtype"]).element_size()
        dsize = torch.empty(0, dtype=ddt).element_size()
        d = case["head_size"] * esize // dsize if (case["head_size"] * esize) % dsize == 0 else case["head_size"]
        dst = flash_cache(case["dst_blocks"], case["block_size"], case["num_heads"], d, ddt, "NHD", case, 41)
    per = lambda b: math.prod(b.view.shape[1:]) * b.view.element_size()  # noqa: E731
    full = min(per(src), per(dst))
    nk = case["nbytes"]
    nbytes = {"full": full, "part": full // 2, "zero": 0, "negative": -1, "too_many": max(per(src), per(dst)) + 1,
              "huge": 2**70, "float": float(full), "str": str(full), "bool": True}[nk]
    if nk in ("negative", "too_many", "huge", "float", "str", "bool"):
        reasons.append(("bad size", "block_size_in_bytes"))
    mapping = block_mapping(case["block_mapping"], case["num_pairs"], nb, dst.view.size(0), same, case["seed"], reasons)
    src_arg, dst_arg = src.view, dst.view
    if layout == "meta_dst":
        dst_arg = dst.view.to("meta")
        reasons.append(("meta", "dst"))
    elif layout == "not_tensor":
        src_arg = src.view.tolist()
        reasons.append(("not a tensor", "src"))
    if _no_pairs(mapping) or (type(nbytes) is int and nbytes == 0):
        # nothing to copy: swap_blocks returns before it reads the ids
        reasons = [r for r in reasons if r[0] not in VALUE_REASONS]
    expected = None
    if not reasons:
        src_bytes = src.base.view(torch.uint8).clone()
        want = dst.base.clone().view(torch.uint8)
        es_s, es_d = src.view.element_size(), dst.view.element_size()
        st_s = src.view.stride(0) * es_s if src.view.size(0) > 1 else per(src)
        st_d = dst.view.stride(0) * es_d if dst.view.size(0) > 1 else per(dst)
        off_s, off_d = src.view.storage_offset() * es_s, dst.view.storage_offset() * es_d
        for s, dd in mapping.tolist():
            want[off_d + dd * st_d: off_d + dd * st_d + nbytes] = src_bytes[off_s + s * st_s: off_s + s * st_s + nbytes]
        expected = want
    if not _run("swap_blocks", lambda: ops.swap_blocks(src_arg, dst_arg, nbytes, mapping), reasons, {}):
        return
    compare("swap_blocks: dst", dst.base.view(torch.uint8), expected)


CHECKS = {"write": check_write, "gather": check_gather, "copy": check_copy, "swap": check_swap}


def known_bug_regions(case) -> list[str]:
    """Which known (unfixed, C++) bugs of issue 11 the case reaches (empty: none)."""
    kind = case["kind"]
    if kind == "write":
        return sorted(build_write(case)["regions"])
    if kind == "gather":
        return sorted(build_gather(case)["regions"])
    return []


# Other defects this suite found (not the two known ones): label -> the cases that reach
# it. Each has a strict-xfail reproduction in test_fuzz_kv.py; the main properties
# assume() them away while they stand. Remove an entry when its bug is fixed. (None
# stands: the four found so far, a non-str kv_cache_dtype, swap_blocks' unchecked
# block_size_in_bytes, gather_kv's out_dtype blamed on key_out and an unread scale on the
# meta device, are fixed in the wrappers; test_fuzz_kv.FIXED_REGIONS keeps their regions.)
FOUND: dict = {}


def found_bug_regions(case) -> list[str]:
    return [label for label, reaches in FOUND.items() if reaches(case)]


def check(case) -> None:
    CHECKS[case["kind"]](case)


# ----------------------------------------------------------------------------- subprocess sample

def run_sample(seed: int, n: int) -> int:
    """``n`` random cases of each kind outside the known-bug regions, through
    ``fuzz_runner.run_checks``."""
    rng = random.Random(seed)

    def outside_bug_regions():
        for _ in range(n):
            for kind in CHECKS:
                case = random_case(rng, kind)
                try:
                    if known_bug_regions(case) or found_bug_regions(case):
                        continue
                except Exception:  # noqa: BLE001 - the check itself reports it
                    pass
                yield case, check

    return fr.run_checks(outside_bug_regions())
