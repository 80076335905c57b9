"""Hypothesis fuzz suite of the INT8 family of memwarden.quant (issue 11, item 2).

Every generated case is either a *correct result* (the plain-PyTorch reference of
quant_reference.py within one quantization step, plus a round trip within one step)
or a *clear error* (TypeError/ValueError naming the offending Python argument, only
for invalid arguments); see fuzz_runner.py for the oracle. The C++ bugs of issue 11
this suite found each have a reproduction below and a ``test_fuzz_region_*`` test that
runs the property restricted to the bug's region (both failed before the fix).
``--fuzz-long`` runs 20x the examples.
"""
import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

import fuzz_runner as fr
from memwarden import quant
from quant_reference import reference_quantize


# @settings is applied at import, before any fixture: conftest sets the option's variable first.
FUZZ_LONG = fr.FUZZ_LONG
examples, fuzz_settings = fr.examples, fr.fuzz_settings


# ----------------------------------------------------------------------------- strategies

shapes = st.integers(1, 4).flatmap(lambda nd: st.tuples(
    *([st.sampled_from([0, 1, 2, 3, 5])] * (nd - 1)), st.sampled_from([0, 1, 2, 3, 4, 6, 8, 12, 16, 24])))
specials = st.lists(st.tuples(st.integers(0, 400), st.sampled_from(fr.SPECIALS)), max_size=4).map(tuple)
group_sizes = st.one_of(st.none(), st.sampled_from([1, 2, 3, 4, 5, 6, 8, 16, 7]),
                        st.sampled_from([0, -1, -8, True, False, 2.0, "4", 2**40]))


def cases(kind, regimes=fr.REGIMES, dtypes=None, layouts=("contiguous",) * 5 + fr.LAYOUTS, **extra):
    dtypes = st.sampled_from(fr.FLOAT_DTYPES * 6 + fr.WRONG_DTYPES) if dtypes is None else dtypes
    #(fr.FLOAT_DTYPES * 3 + fr.WRONG_DTYPES)
    base = dict(kind=st.just(kind), shape=shapes, dtype=dtypes, layout=st.sampled_from(layouts),
                regime=st.sampled_from(regimes), seed=st.integers(0, 2**16), specials=specials,
                symmetric=st.booleans())
    base.update(extra)
    return st.fixed_dictionaries(base)


quantize_cases = cases("quantize", granularity=st.sampled_from(quant.GRANULARITIES * 2 + ("row", "", "TOKEN")),
                       group_size=group_sizes)
into_cases = cases("into", group_size=group_sizes,
                   bad_out=st.sampled_from([None] * 6 + ["q_dtype", "q_shape", "scale_shape", "scale_dtype", "azp_dtype"]))
good_static = st.sampled_from([0.01, 1.0, 0.37, 1e-20, 1e20, 1e-30, 3e30])
scaled_cases = cases("scaled", static_scale=st.one_of(st.none(), good_static),
                     azp=st.one_of(st.none(), st.integers(-300, 300), st.just(2**31 - 1)),
                     scale_dtype=st.sampled_from([torch.float32] * 5 + [torch.float64, torch.float16]),
                     azp_dtype=st.sampled_from([torch.int32] * 5 + [torch.int64]))


# ----------------------------------------------------------------------------- main properties

@fuzz_settings(600)
@given(quantize_cases)
def test_fuzz_quantize_int8(case):
    fr.check_quantize(case)


@fuzz_settings(300)
@given(into_cases)
def test_fuzz_quantize_int8_into(case):
    fr.check_quantize_into(case)


@fuzz_settings(300)
@given(scaled_cases)
def test_fuzz_scaled_int8_quant(case):
    fr.check_scaled(case)


@fuzz_settings(60)
@given(st.sampled_from([None, 3, 2.5, "x", [1.0], torch.ones(2, 2).numpy()]), st.sampled_from(["quantize", "into", "scaled"]))
def test_fuzz_non_tensor_inputs(value, kind):
    case = dict(kind=kind, not_tensor=value, granularity="token", group_size=None, symmetric=True)
    if value is None and kind == "scaled":
        case["not_tensor"] = 1
    fr.CHECKS[kind](case)


@fuzz_settings(80)
@given(cases("quantize", dtypes=st.sampled_from(fr.FLOAT_DTYPES), layouts=("contiguous",),
             granularity=st.sampled_from(quant.GRANULARITIES), group_size=st.sampled_from([1, 2, 4])),
       st.sampled_from(["bad_granularity", "scale_dtype", "scale_shape", "azp_dtype", "q_dtype", "out_dtype", "out_dtype_str", "q_strided"]))
def test_fuzz_dequantize_bad_arguments(case, bad):
    """dequantize_int8 with one corrupted argument: a clear error naming it."""
    x = fr.case_input(case)
    gs = case["group_size"] if case["granularity"] == "group" else None
    assume(x.numel() > 0 and (gs is None or x.shape[-1] % gs == 0))
    q, scale, azp = quant.quantize_int8(x, case["granularity"], gs, case["symmetric"])
    args = dict(q=q, scale=scale, azp=azp, granularity=case["granularity"], group_size=gs, out_dtype=None)
    arg = {"bad_granularity": "granularity", "scale_dtype": "scale", "scale_shape": "scale", "azp_dtype": "azp",
           "q_dtype": "q", "out_dtype": "out_dtype", "out_dtype_str": "out_dtype", "q_strided": "q"}[bad]
    if bad == "bad_granularity":
        args["granularity"] = "rows"
    elif bad == "scale_dtype":
        args["scale"] = scale.double()
    elif bad == "scale_shape":
        args["scale"] = torch.cat([scale.reshape(-1), scale.reshape(-1)[:1]])
    elif bad == "azp_dtype":
        if azp is None:
            return
        args["azp"] = azp.long()
    elif bad == "q_dtype":
        args["q"] = q.to(torch.int16)
    elif bad == "out_dtype":
        args["out_dtype"] = torch.int8
    elif bad == "out_dtype_str":
        args["out_dtype"] = "float16"
    elif bad == "q_strided":
        if q.dim() < 2 or q.shape[-1] < 2 or q.shape[-2] < 2:
            return
        args["q"] = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    fr.call("dequantize_int8", quant.dequantize_int8, [(bad, arg)], **args)


# ----------------------------------------------------------------------------- crashes

def test_fuzz_sample_in_subprocess():
    """A few dozen cases in a fresh interpreter: a signal (segfault, abort) is a failure,
    so is an oracle failure."""
    proc = fr.run_in_subprocess(seed=11, n=examples(12), timeout=600 if FUZZ_LONG else 120)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DONE" in proc.stdout


# ----------------------------------------------------------------------------- the C++ bugs of issue 11

def _fuzz_region(prop, strategy, n=60):
    """``prop`` over ``strategy``: a region of inputs that once reached a bug."""
    @fuzz_settings(n)
    @given(strategy)
    def run(case):
        prop(case)

    run()


def _region_cases(regime, kind="quantize", **extra):
    base = dict(granularity=st.sampled_from(["token", "tensor", "channel", "group"]), group_size=st.just(2))
    base.update(extra)
    return cases(kind, regimes=(regime,), dtypes=st.just(torch.float32), layouts=("contiguous",), **base)


def test_large_offset_zero_point_stays_in_int8():
    """(a) The zero point of 1e6 + [0, 0.0625] was INT32_MIN: every value read back as -526344."""
    x = torch.tensor([[1e6, 1e6 + 0.0625, 1e6 + 0.03125]])
    q, scale, azp = quant.quantize_int8(x, "token", symmetric=False)
    assert -128 <= azp.item() <= 127
    x_hat = quant.dequantize_int8(q, scale, azp, "token")
    assert (x_hat - x).abs().max() <= scale.item()


def test_large_offset_keeps_the_step():
    """(a) Below the overflow, float32 arithmetic lost 2-85 steps."""
    x = torch.tensor([[1e5, 1e5 + 1.0, 1e5 + 0.5]])
    q, scale, azp = quant.quantize_int8(x, "token", symmetric=False)
    x_hat = quant.dequantize_int8(q, scale, azp, "token")
    steps = ((x_hat.double() - x.double()).abs() / scale.item()).max().item()
    assert steps <= 1.0, f"round trip off by {steps:.2f} steps"


def test_tiny_group_uses_the_minimum_scale():
    """(b) 127 / absmax overflowed for absmax < 3.7e-37: 3e-40 read back as 1e-37."""
    x = torch.tensor([[1e-37, 3e-40, 0.0]])
    q, scale, _ = quant.quantize_int8(x, "token")
    assert scale.item() == torch.finfo(torch.float32).tiny
    assert q.tolist() == [[9, 0, 0]], q.tolist()  # 1e-37 / FLT_MIN = 8.51
    x_hat = quant.dequantize_int8(q, scale, None, "token")
    assert (x_hat - x).abs().max().item() <= scale.item() / 2


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"])
def test_bad_static_scale_is_rejected(bad):
    """(c) It silently wrote zeros."""
    with pytest.raises(ValueError, match=r"scaled_int8_quant: scale must be positive and finite"):
        quant.scaled_int8_quant(torch.tensor([[1.0, -2.0, 3.0]]), torch.tensor([bad]))


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_range_beyond_float_max_has_a_finite_scale(granularity):
    """(d) max - min overflowed float32: scale inf, NaN read back."""
    x = torch.tensor([[-3e38, 3e38, 1.0]])
    q, scale, azp = quant.quantize_int8(x, granularity, symmetric=False)
    x_hat = quant.dequantize_int8(q, scale, azp, granularity)
    assert torch.isfinite(scale).all() and ((x_hat - x).abs() <= scale).all(), (scale, q, x_hat)


def test_nan_reads_back_as_zero_when_the_values_exclude_zero():
    """(e) The zero point lay outside [-128, 127], so NaN read back as the group's end nearest 0."""
    q, scale, azp = quant.quantize_int8(torch.tensor([[float("nan"), 1.0, 2.0]]), "token", symmetric=False)
    assert quant.dequantize_int8(q, scale, azp, "token")[0, 0].item() == 0.0


def test_fuzz_region_large_offset():
    _fuzz_region(fr.check_quantize, _region_cases("offset_huge", symmetric=st.just(False)))


def test_fuzz_region_tiny_values():
    _fuzz_region(fr.check_quantize, _region_cases("all_tiny", specials=st.just(((1, 3e-40), (2, 1e-37)))))


def test_fuzz_region_bad_static_scale():
    strategy = cases("scaled", dtypes=st.just(torch.float32), layouts=("contiguous",), regimes=("normal",),
                     symmetric=st.just(True), static_scale=st.sampled_from([0.0, -1.0, math.nan, math.inf]))
    _fuzz_region(fr.check_scaled, strategy, n=10)


def test_fuzz_region_range_overflow():
    _fuzz_region(fr.check_quantize, _region_cases("range_overflow", symmetric=st.just(False)))


# ----------------------------------------------------------------------------- other bugs found by this suite

def test_noncontiguous_x_is_refused_naming_x():
    with pytest.raises(ValueError, match=r"quantize_int8: x\b"):
        quant.quantize_int8(torch.randn(4, 8).t(), "token")


def test_into_with_an_empty_last_dimension_names_x_not_group_size():
    """It blamed group_size (0), which the caller never passed."""
    with pytest.raises(ValueError, match=r"quantize_int8_into: x's last dimension is empty"):
        quant.quantize_int8_into(torch.randn(3, 0), torch.empty(3, 0, dtype=torch.int8), torch.empty(3, 0))


@pytest.mark.parametrize("call,name", [
    (lambda: quant.quantize_int8(torch.randn(2, 4), 3), "granularity"),
    (lambda: quant.quantize_int8(torch.randn(2, 4), "token", symmetric="no"), "symmetric"),
    (lambda: quant.scaled_int8_quant(torch.randn(2, 4), symmetric=None), "symmetric"),
    (lambda: quant.quantize_int8(torch.randn(2, 4), "group", 2**70), "group_size"),
    (lambda: quant.dequantize_int8(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2), None, 1), "granularity"),
], ids=["granularity_int", "symmetric_str", "scaled_symmetric_none", "group_size_2**70", "dequant_granularity_int"])
def test_wrong_python_types_are_clear_errors(call, name):
    """These reached the op schema and raised RuntimeError before the wrappers checked them."""
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        call()


@pytest.mark.parametrize("args,name", [
    (([0.5], (2, 4), "token", None), "scale"),                  # was AttributeError
    ((torch.ones(3), (2, 4), "token", None), "scale"),          # wrong number of scales: was RuntimeError
    ((torch.ones(2, 2), (2, 4), "group", 3), "group_size"),     # not dividing: was RuntimeError
    ((torch.ones(1), (), "tensor", None), "shape"),             # 0-dim shape: was IndexError
], ids=["not_tensor", "wrong_numel", "group_not_dividing", "zero_dim_shape"])
def test_broadcast_scale_checks_its_arguments(args, name):
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        quant.broadcast_scale(*args)


def _one_buffer(x_shape, q_shape, scale_shape):
    """x (float32), q (int8) and scale (float32) as views of one byte buffer, overlapping."""
    buf = torch.zeros(4096, dtype=torch.uint8)
    x = buf[: 4 * math.prod(x_shape)].view(torch.float32).view(x_shape)
    q = buf[: math.prod(q_shape)].view(torch.int8).view(q_shape)
    scale = buf[: 4 * math.prod(scale_shape)].view(torch.float32).view(scale_shape)
    return x, q, scale


@pytest.mark.parametrize("pair", [("q", "scale"), ("q", "input"), ("scale", "input")])
def test_into_rejects_overlapping_outputs(pair):
    """q and scale in one buffer (or either over x) was accepted: the scales overwrote q."""
    x, q, scale = _one_buffer((2, 8), (2, 8), (2, 1))
    fresh = {"input": torch.randn(2, 8), "q": torch.empty(2, 8, dtype=torch.int8), "scale": torch.empty(2, 1)}
    args = {name: ({"input": x, "q": q, "scale": scale}[name] if name in pair else fresh[name]) for name in fresh}
    with pytest.raises(ValueError, match=rf"{pair[0]} and {pair[1]} overlap"):
        quant.quantize_int8_into(args["input"], args["q"], args["scale"])


def test_into_accepts_disjoint_views_of_one_buffer():
    buf = torch.zeros(4096, dtype=torch.uint8)
    q = buf[:16].view(torch.int8).view(2, 8)
    scale = buf[16:24].view(torch.float32).view(2, 1)
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5, 0.0, 1.5, -1.0, 2.0]] * 2)
    quant.quantize_int8_into(x, q, scale)
    ref_q, ref_scale, _ = reference_quantize(x, "token")
    assert torch.equal(q, ref_q) and torch.equal(scale.reshape(-1), ref_scale)


def test_op_messages_use_torch_dtype_names():
    """The ops said "got Float"; Python users write torch.float32."""
    with pytest.raises(TypeError, match=r"q must be torch\.int8, got torch\.float32"):
        torch.ops.memwarden.dequantize_int8(torch.zeros(2, 4), torch.ones(2), None, "token")
