"""Hypothesis fuzz suite of the paged KV ops of memwarden.kv.ops (issue 11, item 2).

Every generated call of reshape_and_cache_flash, reshape_and_cache, gather_cache,
gather_kv, copy_blocks and swap_blocks (every kv_cache_dtype, right and wrong dtypes,
zero sizes, views, transposes, expands, overlapping as_strided inputs, NaN/Inf/extreme
values, index tensors with -1, out of range, of the wrong dtype, on the meta device or
non-contiguous, good and bad scales) is either a *correct result* (the whole buffer
behind every written tensor equals the plain-PyTorch reference of kv_reference.py:
bitwise for "auto", within one INT8 step for the INT8 cache dtypes, so nothing outside
the addressed slots changed) or a *clear error* (TypeError/ValueError naming the
argument; IndexError for an index value out of range, as the ops raise today); see
kv_fuzz.py for the oracle.

Two C++ bugs of issue 11 this suite found are regions of the case space (a bad static
scale, overlapping outputs): the main properties leave them to the ``*_region_*`` tests,
which run the same oracle restricted to each region and failed before the fix (one kind,
slots overlapping inside one cache, is still a strict xfail). ``--fuzz-long`` runs 20x
the examples.
"""

import pytest
import torch
from hypothesis import Phase, assume, given, strategies as st

import fuzz_runner as fr
import kv_fuzz as kf
from memwarden.kv import ops

FUZZ_LONG = fr.FUZZ_LONG
examples, fuzz_settings = fr.examples, fr.fuzz_settings

specials = st.lists(st.tuples(st.integers(0, 400), st.sampled_from(kf.SPECIAL_VALUES)), max_size=3).map(tuple)


def cases(kind, **overrides):
    """Cases of ``kind`` drawn from kf.CHOICES; an override is a tuple of values or a strategy."""
    fields = {key: st.sampled_from(values) for key, values in kf.CHOICES[kind].items()}
    fields.update(kind=st.just(kind), specials=specials)
    for key, value in overrides.items():
        fields[key] = value if isinstance(value, st.SearchStrategy) else st.sampled_from(value)
    return st.fixed_dictionaries(fields)


def property_kv(case):
    assume(not kf.known_bug_regions(case) and not kf.found_bug_regions(case))
    kf.check(case)


# ----------------------------------------------------------------------------- main properties

@fuzz_settings(400)
@given(cases("write"))
def test_fuzz_reshape_and_cache(case):
    property_kv(case)


@fuzz_settings(300)
@given(cases("gather"))
def test_fuzz_gather(case):
    property_kv(case)


@fuzz_settings(200)
@given(cases("copy"))
def test_fuzz_copy_blocks(case):
    property_kv(case)


@fuzz_settings(200)
@given(cases("swap"))
def test_fuzz_swap_blocks(case):
    property_kv(case)


@fuzz_settings(120)
@given(cases("write", kv_dtype=("int8", "int8_per_token_head"), dtype=kf.FLOAT, slots=("valid", "dups"),
             regime=("normal", "huge", "zeros", "constant"), num_tokens=(3, 5, 8), num_heads=(1, 2, 3),
             head_size=(4, 8, 16, 32), specials=st.lists(st.tuples(st.integers(0, 400),
                                                                  st.sampled_from(kf.SPECIAL_VALUES)),
                                                        min_size=1, max_size=6).map(tuple)))
def test_fuzz_int8_writes_with_special_values(case):
    """INT8 writes with NaN/Inf/extremes in key and value (the main property draws them rarely)."""
    property_kv(case)


# ----------------------------------------------------------------------------- crashes

def test_fuzz_sample_in_subprocess():
    """Random cases of every op in a fresh interpreter: a signal (segfault, abort) is a
    failure, so is an oracle failure."""
    proc = fr.run_in_subprocess(seed=11, n=examples(40), timeout=600 if FUZZ_LONG else 120, module="kv_fuzz")
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DONE" in proc.stdout


# ----------------------------------------------------------------------------- the regions of the known bugs

BAD_SCALES = ("zero", "negative", "nan", "inf", "one_head_zero")
WRITTEN = dict(num_blocks=(1, 2, 3), block_size=(1, 2, 4), num_heads=(1, 2, 3), head_size=(4, 8, 16, 32),
               num_tokens=(1, 3, 5), slots=("valid",), key_layout=("contiguous",), value_layout=("contiguous",),
               value_bad=(None,), cache_layout=("NHD", "HND"), dtype=kf.FLOAT, scale_cache=("none",),
               kv_dtype=("auto", "int8", "int8_per_token_head"), k_scale=("one", "per_head"), regime=("normal",))
READ = dict(num_blocks=(1, 2, 3), block_size=(1, 2, 4), num_heads=(1, 2, 3), head_size=(4, 8, 16), num_seqs=(1, 2),
            max_blocks=(1, 2), seq_lens=("valid",), block_table=("valid",), cache_layout=("NHD", "HND"),
            out=("good",), dtype=kf.FLOAT, out_dtype=(None,), kv_dtype=("auto", "int8", "int8_per_token_head"),
            k_scale=("one", "per_head"), scale_cache=("none",), op=("gather_cache", "gather_kv"), regime=("normal",))


def region_passes(region, strategy, n=40):
    """Runs the oracle over ``strategy`` restricted to the cases in ``region`` (a known
    region or a FOUND label) and in no other bug's region."""
    @fuzz_settings(n, phases=(Phase.generate,))  # no shrinking: while the bug stands it fails at once
    @given(strategy)
    def run(case):
        assume(kf.known_bug_regions(case) + kf.found_bug_regions(case) == [region])
        kf.check(case)

    run()


def test_bug_regions_are_recognised():
    """The main properties assume() away exactly these cases: the classifier sees them."""
    base = {k: v[0] for k, v in kf.CHOICES["write"].items()}
    base.update(kind="write", specials=(), num_blocks=2, block_size=2, num_heads=2, head_size=8, num_tokens=3,
                dtype=torch.float32, kv_dtype="int8", k_scale="zero", op="flash", slots="valid", cache_layout="NHD")
    assert kf.known_bug_regions(base) == [kf.BAD_SCALE]
    base.update(k_scale="one", cache_layout="alias")
    assert kf.known_bug_regions(base) == [kf.OVERLAP]
    base.update(cache_layout="NHD", kv_dtype="auto", k_scale="zero")  # "auto" never reads the scales
    assert kf.known_bug_regions(base) == []


@pytest.mark.parametrize("op", ["flash", "legacy"])
def test_bad_scale_region_of_the_writes_passes_the_oracle(op):
    region_passes(kf.BAD_SCALE, cases("write", **dict(WRITTEN, op=(op,), kv_dtype=("int8",), k_scale=BAD_SCALES,
                                                           head_size=(16, 32)), v_scale_same=(True, False)))


def test_bad_scale_region_of_gather_passes_the_oracle():
    region_passes(kf.BAD_SCALE, cases("gather", **dict(READ, kv_dtype=("int8",), k_scale=BAD_SCALES)))


OVERLAP_WRITES = {
    "stride0_blocks": dict(cache_layout=("expand_blocks",), num_blocks=(2, 3)),
    "key_cache_is_value_cache": dict(cache_layout=("alias",)),
    "scale_cache_views_cache": dict(kv_dtype=("int8_per_token_head",), scale_cache=("view_of_cache",)),
    "shared_scale_cache": dict(kv_dtype=("int8_per_token_head",), scale_cache=("shared",)),
    "stride0_scale_cache": dict(kv_dtype=("int8_per_token_head",), scale_cache=("expanded",), num_blocks=(2, 3)),
    "overlapping_slots": dict(cache_layout=("overlap_slots",), block_size=(2, 4)),
}


@pytest.mark.parametrize("what", [pytest.param(w, marks=pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="issue 11: slots that overlap each other within one cache "
    "(an as_strided cache whose slot stride is smaller than a slot) are not detected: at::has_internal_overlap "
    "cannot decide them")) if w == "overlapping_slots" else w for w in sorted(OVERLAP_WRITES)])
def test_overlapping_outputs_region_of_reshape_and_cache_flash_passes_the_oracle(what):
    region_passes(kf.OVERLAP, cases("write", **dict(WRITTEN, op=("flash",), **OVERLAP_WRITES[what])))


def test_overlapping_outputs_region_of_reshape_and_cache_passes_the_oracle():
    """The legacy value cache viewing the key cache's memory."""
    region_passes(kf.OVERLAP, cases("write", **dict(WRITTEN, op=("legacy",), cache_layout=("alias",),
                                                         kv_dtype=("auto", "int8"), head_size=(16, 32))))


@pytest.mark.parametrize("out", ["alias", "expand_rows"])
def test_overlapping_outputs_region_of_gather_cache_passes_the_oracle(out):
    region_passes(kf.OVERLAP, cases("gather", **dict(READ, op=("gather_cache",), out=(out,))))


# ----------------------------------------------------------------------------- other defects found by this suite
# Each is a kf.FOUND entry (the main properties assume it away while it stands), a test
# that runs the oracle over its region and a minimal reproduction, all strict xfails.

FOUND_REGIONS = {
    "kv_cache_dtype": [("write", dict(kv_dtype=(3, None, 1.5))), ("gather", dict(kv_dtype=(3, None)))],
    "block_size_in_bytes": [("swap", dict(nbytes=("huge", "float", "str", "bool")))],
    "out_dtype": [("gather", dict(op=("gather_kv",), kv_dtype=("auto", "int8"), seq_lens=("valid",),
                                  block_table=("valid",), out_dtype=(torch.int8, torch.int32, torch.float16,
                                                                     torch.float64)))],
    "meta_scale": [("write", dict(WRITTEN, kv_dtype=("auto", "int8_per_token_head"), k_scale=("meta",),
                                  scale_cache=("fit",))),
                   ("gather", dict(READ, kv_dtype=("auto", "int8_per_token_head"), k_scale=("meta",),
                                   scale_cache=("fit",)))],
}
FOUND_LABEL = dict(zip(FOUND_REGIONS, kf.FOUND))


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 11: a kv_cache_dtype that is not a str reaches "
                   "the op schema, which raises RuntimeError (not a TypeError naming kv_cache_dtype)")
def test_found_region_kv_cache_dtype_not_a_str_passes_the_oracle():
    for kind, overrides in FOUND_REGIONS["kv_cache_dtype"]:
        region_passes(FOUND_LABEL["kv_cache_dtype"], cases(kind, **overrides), n=20)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 11: swap_blocks does not check "
                   "block_size_in_bytes in Python: True is taken as 1, a float, a str or an int beyond int64 "
                   "raise RuntimeError from the op schema")
def test_found_region_swap_blocks_size_passes_the_oracle():
    for kind, overrides in FOUND_REGIONS["block_size_in_bytes"]:
        region_passes(FOUND_LABEL["block_size_in_bytes"], cases(kind, **overrides), n=20)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 11: gather_kv with an out_dtype that is not a "
                   "float dtype (or not the cache's with \"auto\") raises from gather_cache naming key_out, an "
                   "argument the caller did not pass")
def test_found_region_gather_kv_out_dtype_passes_the_oracle():
    for kind, overrides in FOUND_REGIONS["out_dtype"]:
        region_passes(FOUND_LABEL["out_dtype"], cases(kind, **overrides), n=20)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 11: an unused k_scale/v_scale on the meta "
                   "device (kv_cache_dtype \"auto\" or \"int8_per_token_head\") sends the call to the Meta kernel: "
                   "nothing is written and no index is checked, without an error")
@pytest.mark.parametrize("kind", ["write", "gather"])
def test_found_region_unused_meta_scale_passes_the_oracle(kind):
    overrides = dict(FOUND_REGIONS["meta_scale"])[kind]
    region_passes(FOUND_LABEL["meta_scale"], cases(kind, **overrides), n=20)


def _small_write():
    key = torch.randn(2, 1, 4)
    return key, torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4), torch.tensor([0, 3])


@pytest.mark.xfail(strict=True, reason="issue 11: a kv_cache_dtype that is not a str raises RuntimeError from the op schema")
@pytest.mark.parametrize("op", ["reshape_and_cache_flash", "gather_cache", "gather_kv"])
def test_kv_cache_dtype_not_a_str_is_a_type_error(op):
    key, kc, vc, slots = _small_write()
    call = {
        "reshape_and_cache_flash": lambda: ops.reshape_and_cache_flash(key, key, kc, vc, slots, 3),
        "gather_cache": lambda: ops.gather_cache(kc, vc, torch.tensor([[0]]), torch.tensor([2]), torch.zeros(2, 1, 4),
                                                 torch.zeros(2, 1, 4), None),
        "gather_kv": lambda: ops.gather_kv(kc, vc, torch.tensor([[0]]), torch.tensor([2]), 3),
    }[op]
    with pytest.raises(TypeError, match=r"\bkv_cache_dtype\b"):
        call()


@pytest.mark.xfail(strict=True, reason="issue 11: swap_blocks leaves block_size_in_bytes to the op schema "
                                       "(True is taken as 1; the others raise RuntimeError)")
@pytest.mark.parametrize("nbytes", [True, 64.0, "64", 2**70], ids=["bool", "float", "str", "2**70"])
def test_swap_blocks_block_size_in_bytes_is_checked(nbytes):
    src, dst = torch.randn(2, 4, 4), torch.zeros(2, 4, 4)
    with pytest.raises((TypeError, ValueError), match=r"\bblock_size_in_bytes\b"):
        ops.swap_blocks(src, dst, nbytes, torch.tensor([[0, 1]]))
    assert bool((dst == 0).all())


@pytest.mark.xfail(strict=True, reason="issue 11: gather_kv blames a bad out_dtype on key_out")
@pytest.mark.parametrize("kv_dtype,out_dtype", [("int8", torch.int8), ("auto", torch.float16)])
def test_gather_kv_bad_out_dtype_names_out_dtype(kv_dtype, out_dtype):
    cache_dtype = torch.int8 if kv_dtype == "int8" else torch.float32
    kc = torch.zeros(2, 2, 1, 4, dtype=cache_dtype)
    scale = torch.ones(1) if kv_dtype == "int8" else None
    with pytest.raises((TypeError, ValueError), match=r"gather_kv: out_dtype\b"):
        ops.gather_kv(kc, kc, torch.tensor([[0]]), torch.tensor([2]), kv_dtype, out_dtype=out_dtype, k_scale=scale,
                      v_scale=scale)


@pytest.mark.xfail(strict=True, reason="issue 11: an unused scale on the meta device sends the call to the Meta "
                                       "kernel, which writes nothing (and checks no index) without an error")
@pytest.mark.parametrize("op", ["reshape_and_cache_flash", "reshape_and_cache", "gather_cache"])
def test_unused_meta_scale_is_an_error_or_ignored(op):
    meta = torch.ones(1, device="meta")
    key = torch.randn(2, 1, 4)
    if op == "reshape_and_cache_flash":
        kc, vc = torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4)
        call, check = (lambda: ops.reshape_and_cache_flash(key, key, kc, vc, torch.tensor([0, 3]), "auto", meta, meta),
                       lambda: torch.equal(kc[0, 0], key[0]) and torch.equal(vc[1, 1], key[1]))
    elif op == "reshape_and_cache":
        kc, vc = torch.zeros(2, 1, 1, 2, 4), torch.zeros(2, 1, 4, 2)  # x = 4 for float32
        call, check = (lambda: ops.reshape_and_cache(key, key, kc, vc, torch.tensor([0, 3]), "auto", meta, meta),
                       lambda: torch.equal(vc[0, 0, :, 0], key[0, 0]))
    else:
        kc = torch.randn(2, 2, 1, 4)
        ko, vo = torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)
        call, check = (lambda: ops.gather_cache(kc, kc, torch.tensor([[1]]), torch.tensor([2]), ko, vo, "auto", meta, meta),
                       lambda: torch.equal(ko, kc[1]))
    try:
        call()
    except (TypeError, ValueError) as exc:
        assert "k_scale" in str(exc), exc
        return
    assert check(), "nothing was written"
