"""Case construction and the oracle of the INT8 quantization fuzz suite (test_fuzz_quant.py).

A case is a plain dict of parameters (shape, dtype, layout, value regime, seed, injected
special values, granularity, ...), so hypothesis can draw it, a ``random.Random`` can
draw it too (for the subprocess crash sample) and a failure prints it readably.

Every case is classified by ``check_*``: either the call returns a *correct result*
(matches quant_reference.py within one quantization step) or it raises a *clear error*
(``TypeError``/``ValueError`` whose message names the offending Python argument, and
only when the arguments really are invalid). Anything else raises ``AssertionError``.
"""
from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys

import torch

from memwarden import quant
from quant_reference import grouped, reference_dequantize, reference_quantize, ungrouped

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WRONG_DTYPES = (torch.float64, torch.int8, torch.int32, torch.uint8, torch.bool)
LAYOUTS = ("contiguous", "transposed", "expanded", "strided")
# Value regimes; the last three reached the C++ bugs (a), (b), (d) of issue 11.
REGIMES = ("normal", "zeros", "constant", "huge", "tiny_ok", "offset_ok", "offset_huge", "all_tiny", "range_overflow")
SPECIALS = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 3e38, -3e38, 1e-40, 65504.0)

# Known defects of issue 11 that are *error messages naming the wrong thing* (each has a
# strict-xfail reproduction in test_fuzz_quant.py): (op, reason) -> extra accepted name.
KNOWN_MISNAMED: dict = {}  # (op, reason) -> the name a message uses instead, while a bug stands

FUZZ_LONG = os.environ.get("MEMWARDEN_FUZZ_LONG") == "1"  # conftest: --fuzz-long (20x the examples)


def examples(n: int) -> int:
    """``n`` examples, 20x with --fuzz-long (shared by every test_fuzz_*.py)."""
    return n * 20 if FUZZ_LONG else n


def fuzz_settings(n: int, **extra):
    """The settings of every fuzz property: derandomized, no database, ``examples(n)``."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=examples(n), deadline=None, derandomize=True, database=None,
                    report_multiple_bugs=False, suppress_health_check=list(HealthCheck), **extra)


# --------------------------------------------------------------------------- inputs

def make_values(shape, regime: str, seed: int, specials=()) -> torch.Tensor:
    """float32 tensor of ``shape`` in a value regime, with (flat index, value) specials."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    sigma = [1e-3, 1.0, 7.0, 1e3][seed % 4]
    if regime == "normal":
        v = base * sigma + torch.rand(1, generator=gen, dtype=torch.float64) * sigma
    elif regime == "zeros":
        v = torch.zeros(n, dtype=torch.float64)
    elif regime == "constant":
        v = torch.full((n,), [3.5, -2.25, 1e20, -7e-3][seed % 4], dtype=torch.float64)
    elif regime == "huge":  # one sign only: the asymmetric range stays below FLT_MAX
        v = base.abs() * 1e37 + 1e37
        v = -v if seed % 2 else v
    elif regime == "tiny_ok":  # small magnitudes, scale still a normal float
        v = base * 1e-25
    elif regime == "offset_ok":  # offset up to 100x the spread: float32 keeps the step
        v = base * sigma + sigma * 100.0 * (1 if seed % 2 else -1)
    elif regime == "offset_huge":  # |min| / spread > 1e5: the zero point overflowed int32
        v = base.abs() * 0.0625 + [1e6, -1e6, 3e7, 1e9][seed % 4]
    elif regime == "all_tiny":  # every value below 3.7e-37: 1 / scale overflowed
        v = base * 1e-39
    elif regime == "range_overflow":  # range > FLT_MAX: the asymmetric scale was inf
        v = base.sign() * 3e38
    else:
        raise AssertionError(regime)
    v = v.float()
    for index, value in specials:
        if n:
            v[index % n] = value
    return v.reshape(shape)


def make_tensor(shape, dtype, layout: str, regime: str, seed: int, specials=()) -> torch.Tensor:
    """A tensor of ``shape``/``dtype`` laid out as asked (the values are those of
    make_values whatever the layout)."""
    v = make_values(shape, regime, seed, specials).to(dtype)
    if layout == "contiguous" or len(shape) == 0:
        return v
    if layout == "transposed":
        if len(shape) < 2:
            return v
        perm = list(range(len(shape)))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return v.permute(perm).contiguous().permute(perm)
    if layout == "expanded":  # stride 0 along dim 0
        if shape[0] == 0:
            return v
        return v[:1].expand(shape)
    if layout == "strided":
        big = torch.zeros((*shape[:-1], shape[-1] * 2), dtype=dtype)
        big[..., ::2] = v
        return big[..., ::2]
    raise AssertionError(layout)


# --------------------------------------------------------------------------- oracle

def classify_error(op: str, exc: BaseException, reasons: list[tuple[str, str]]) -> None:
    """``exc`` must be a TypeError/ValueError naming the argument of one of ``reasons``
    ((reason, python argument) pairs; empty means the call was valid)."""
    if not reasons:
        raise AssertionError(f"{op}: valid arguments raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(exc, (TypeError, ValueError)):
        raise AssertionError(f"{op}: {reasons} raised {type(exc).__name__} (want TypeError/ValueError): {exc}") from exc
    msg = str(exc)
    if "incompatible function arguments" in msg or "incompatible constructor arguments" in msg:
        # pybind11's overload error lists every argument's name: it names none in particular
        raise AssertionError(f"{op}: {reasons} raised pybind11's generic overload error: {msg}") from exc
    names = set()
    for reason, arg in reasons:
        names.add(arg)
        if (op, reason) in KNOWN_MISNAMED:
            names.add(KNOWN_MISNAMED[(op, reason)])
    if not any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", msg) for n in names):
        raise AssertionError(f"{op}: {reasons} raised a message naming none of {sorted(names)}: {msg}") from exc


RAISED = object()  # what call() returns for a clear error


def call(op: str, fn, reasons, *args, **kwargs):
    """Run ``fn``; return its result (RAISED when it raised a clear error)."""
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - classified
        classify_error(op, exc, reasons)
        return RAISED
    if reasons:
        raise AssertionError(f"{op}: invalid arguments {reasons} were accepted")
    return result


def _group_size_reasons(group_size):
    if group_size is None:
        return []
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        return [("bad group_size", "group_size")]
    return []


def _x_reasons(x, name="x"):
    if not isinstance(x, torch.Tensor):
        return [("not a tensor", name)]
    if x.dtype not in FLOAT_DTYPES:
        return [("wrong dtype", name)]
    if x.dim() == 0:
        return [("0-dim", name)]
    return []


def quantize_reasons(x, granularity, group_size, symmetric):
    reasons = _x_reasons(x) + _group_size_reasons(group_size)
    if reasons:
        return reasons
    if granularity not in quant.GRANULARITIES:
        return [("bad granularity", "granularity")]
    if granularity in ("tensor", "channel") and x.numel() == 0:
        return []
    if not x.is_contiguous():
        reasons.append(("x not contiguous", "x"))
    if granularity == "group":
        if group_size is None or x.shape[-1] % group_size:
            reasons.append(("group_size missing or not dividing", "group_size"))
    return reasons


def step_of(scale, shape, granularity, group_size):
    """Per-element scale from the reference grouping (independent of broadcast_scale)."""
    g = grouped(torch.zeros(shape), granularity, group_size)
    return ungrouped(scale.reshape(-1, 1).expand_as(g).contiguous(), torch.zeros(shape), granularity)


def check_result(x, q, scale, azp, granularity, group_size, symmetric):
    """q/scale/azp from one of the dynamic ops against the reference."""
    xc = x.contiguous()
    if x.numel() == 0:  # the reference cannot group an empty tensor: the documented zeros
        assert q.shape == x.shape and q.dtype == torch.int8
        n = {"tensor": 1, "channel": x.shape[-1]}.get(granularity, 0)
        assert scale.dtype == torch.float32 and scale.numel() == n and (scale == 0).all(), scale
        assert symmetric == (azp is None) and (azp is None or (azp.numel() == n and (azp == 0).all()))
        return
    ref_q, ref_scale, ref_azp = reference_quantize(xc, granularity, group_size, symmetric)
    assert q.dtype == torch.int8 and q.shape == x.shape, (q.dtype, q.shape)
    assert scale.dtype == torch.float32
    expected_shape = {
        "tensor": (1,),
        "token": (*x.shape[:-1], 1) if x.numel() else None,
        "channel": (x.shape[-1],),
        "group": (*x.shape[:-1], x.shape[-1] // group_size) if group_size else None,
    }[granularity]
    if expected_shape is not None:
        assert tuple(scale.shape) == expected_shape, (tuple(scale.shape), expected_shape)
    assert scale.numel() == ref_scale.numel(), (scale.shape, ref_scale.shape)
    torch.testing.assert_close(scale.reshape(-1), ref_scale, rtol=1e-6, atol=0, equal_nan=False)
    assert torch.isfinite(scale).all(), scale
    if x.numel() == 0:
        assert q.numel() == 0
        return
    # x / scale (reference) and x * (1 / scale) (kernels) may round a tie differently.
    dq = (q.int() - ref_q.int()).abs().max().item()
    assert dq <= (1 if symmetric else 2), f"q differs from the reference by {dq} steps"
    if symmetric:
        assert azp is None
    else:
        assert azp.dtype == torch.int32 and azp.shape == scale.shape
        assert (azp.reshape(-1).long() - ref_azp.long()).abs().max() <= 1
    # Round trip: every finite value comes back within one step of itself.
    x_hat = quant.dequantize_int8(q, scale, azp, granularity, group_size, out_dtype=torch.float32)
    step = step_of(scale, x.shape, granularity, group_size)
    finite = torch.isfinite(xc.float())
    err = torch.where(finite, (x_hat.double() - xc.double()).abs(), 0.0)
    bound = step.double() * 1.001 + 1e-6 * xc.double().abs().nan_to_num(0.0, 0.0, 0.0)
    worst = (err - bound).max().item()
    assert worst <= 0, f"round trip off by {(err / step.double().clamp(min=1e-300)).max().item():.3g} steps"
    # NaN reads back as 0 (the zero point is always in [-128, 127]).
    nan = torch.isnan(xc)
    assert (x_hat[nan] == 0).all(), x_hat[nan]
    # Dequantize and broadcast_scale against the reference.
    out_dtype = x.dtype
    got = quant.dequantize_int8(q, scale, azp, granularity, group_size, out_dtype=out_dtype)
    want = reference_dequantize(q, scale, azp, granularity, group_size).to(out_dtype)
    assert got.dtype == out_dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-2 if out_dtype != torch.float32 else 1e-6, atol=0, equal_nan=True)
    per_elem = quant.broadcast_scale(scale, x.shape, granularity, group_size)
    assert per_elem.shape == x.shape and torch.equal(per_elem, step), "broadcast_scale disagrees"
    if azp is not None:
        assert torch.equal(quant.broadcast_scale(azp, x.shape, granularity, group_size), step_of(azp, x.shape, granularity, group_size))


def check_quantize(case) -> None:
    x = case_input(case)
    granularity, group_size, symmetric = case["granularity"], case["group_size"], case["symmetric"]
    reasons = quantize_reasons(x, granularity, group_size, symmetric)
    out = call("quantize_int8", quant.quantize_int8, reasons, x, granularity, group_size, symmetric)
    if out is not RAISED:
        check_result(x, *out, granularity, group_size if granularity == "group" else None, symmetric)


def check_quantize_into(case) -> None:
    x = case_input(case)
    group_size, symmetric = case["group_size"], case["symmetric"]
    reasons = _x_reasons(x) + _group_size_reasons(group_size)
    q = scale = azp = None
    if not reasons:
        cols = x.shape[-1]
        if not x.is_contiguous():
            reasons.append(("x not contiguous", "x"))
        if group_size is None and cols == 0:
            reasons.append(("x has an empty last dimension", "x"))
        gs = cols if group_size is None else group_size
        if gs and cols % gs:
            reasons.append(("group_size not dividing", "group_size"))
        n = cols // gs if gs and not cols % gs else 1
        sshape = (*x.shape[:-1], n)
        q = torch.empty(x.shape, dtype=torch.int8)
        scale = torch.empty(sshape, dtype=torch.float32)
        azp = None if symmetric else torch.empty(sshape, dtype=torch.int32)
        bad = case.get("bad_out")
        if bad == "q_dtype":
            q, _ = q.to(torch.int32), reasons.append(("q dtype", "q"))
        elif bad == "q_shape":
            q, _ = torch.empty((*x.shape[:-1], cols + 1), dtype=torch.int8), reasons.append(("q shape", "q"))
        elif bad == "scale_shape":
            scale, _ = torch.empty((*x.shape[:-1], n + 1)), reasons.append(("scale shape", "scale"))
        elif bad == "scale_dtype":
            scale, _ = scale.double(), reasons.append(("scale dtype", "scale"))
        elif bad == "azp_dtype" and azp is not None:
            azp, _ = azp.long(), reasons.append(("azp dtype", "azp"))
    else:
        q = torch.empty(1, dtype=torch.int8)
        scale = torch.empty(1)
    if call("quantize_int8_into", quant.quantize_int8_into, reasons, x, q, scale, azp, group_size) is RAISED:
        return
    granularity = "token" if group_size is None else "group"
    check_result(x, q, scale, azp, granularity, group_size, symmetric)


def check_scaled(case) -> None:
    """scaled_int8_quant, dynamic (per token) or static (one scale, optional azp)."""
    x = case_input(case)
    symmetric = case["symmetric"]
    static = case.get("static_scale")
    scale = None if static is None else torch.tensor([static], dtype=case.get("scale_dtype", torch.float32))
    azp = None
    if case.get("azp") is not None:
        azp = torch.tensor([case["azp"]], dtype=case.get("azp_dtype", torch.int32))
    reasons = _x_reasons(x, "input")
    if not reasons:
        if scale is not None and scale.dtype != torch.float32:
            reasons.append(("scale dtype", "scale"))
        if azp is not None and azp.dtype != torch.int32:
            reasons.append(("azp dtype", "azp"))
    if not reasons:
        if azp is not None and scale is None:
            reasons.append(("azp without scale", "azp"))
        elif scale is not None and symmetric != (azp is None):
            reasons.append(("azp vs symmetric", "azp"))
        if not x.is_contiguous() and not (scale is None and x.numel() == 0):
            reasons.append(("input not contiguous", "input"))
        if scale is not None and not (math.isfinite(static) and static > 0):
            reasons.append(("static scale not positive and finite", "scale"))
    out = call("scaled_int8_quant", quant.scaled_int8_quant, reasons, x, scale, azp, symmetric)
    if out is RAISED:
        return
    q, scales, zp = out
    xc = x.contiguous()
    if scale is None:
        rows = xc.numel() // xc.shape[-1] if xc.shape[-1] else 0
        if xc.numel():
            assert scales.shape == (rows, 1), scales.shape
        check_result(xc, q, scales.reshape(*xc.shape[:-1], -1) if xc.numel() else scales, None if zp is None else zp.reshape(*xc.shape[:-1], -1) if xc.numel() else zp, "token", None, symmetric)
        return
    assert torch.equal(scales, scale) and (zp is None) == (azp is None)
    z = 0.0 if azp is None else float(azp.item())
    ref = torch.round(xc.double() / static)
    ref = (torch.nan_to_num(ref, nan=0.0) + z).clamp(-128, 127)
    ref = torch.where(torch.isnan(xc), min(max(z, -128), 127), ref)
    diff = (q.double() - ref).abs().max().item() if q.numel() else 0
    assert q.shape == x.shape and q.dtype == torch.int8 and diff <= 1, f"static q off by {diff}"


def case_input(case):
    if "not_tensor" in case:
        return case["not_tensor"]
    return make_tensor(case["shape"], case["dtype"], case["layout"], case["regime"], case["seed"], case.get("specials", ()))


CHECKS = {"quantize": check_quantize, "into": check_quantize_into, "scaled": check_scaled}


# --------------------------------------------------------------------------- subprocess sample

def random_case(rng: random.Random, kind: str) -> dict:
    """A case like the hypothesis strategies draw (valid-leaning), from ``rng``."""
    ndim = rng.randint(1, 4)
    shape = tuple(rng.choice([0, 1, 2, 3, 5]) for _ in range(ndim - 1)) + (rng.choice([0, 1, 4, 6, 8, 12]),)
    case = dict(kind=kind, shape=shape, dtype=rng.choice(FLOAT_DTYPES + WRONG_DTYPES[:1]),
                layout=rng.choice(LAYOUTS), regime=rng.choice(REGIMES), seed=rng.randrange(1000),
                specials=tuple((rng.randrange(64), rng.choice(SPECIALS)) for _ in range(rng.randint(0, 3))),
                granularity=rng.choice(quant.GRANULARITIES + ("row",)),
                group_size=rng.choice([None, 1, 2, 3, 4, 5, 0, -1]), symmetric=rng.random() < 0.5)
    if kind == "scaled":
        case["static_scale"] = rng.choice([None, None, 0.01, 1.0, 1e-20, 1e20])
        if case["static_scale"] is not None and not case["symmetric"]:
            case["azp"] = rng.randint(-200, 200)
    return case


def run_checks(cases) -> int:
    """Run ``(case, check)`` pairs; print and count oracle failures, then a DONE line (a
    crash kills the process, which the caller sees as a signal)."""
    failures = ran = 0
    for case, check in cases:
        ran += 1
        try:
            check(case)
        except AssertionError as exc:
            failures += 1
            print(f"FAIL {case}: {exc}", flush=True)
    print(f"DONE {ran} cases, {failures} failures", flush=True)
    return failures


def run_sample(seed: int, n: int) -> int:
    """``n`` random cases of each kind through :func:`run_checks`."""
    rng = random.Random(seed)
    return run_checks((random_case(rng, kind), check) for _ in range(n) for kind, check in CHECKS.items())


def run_in_subprocess(seed: int, n: int, timeout: float = 120.0, module: str = "fuzz_runner") -> subprocess.CompletedProcess:
    """``module.run_sample(seed, n)`` (which returns its failure count) in a fresh interpreter."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import {module}; "
            f"sys.exit(1 if {module}.run_sample({seed}, {n}) else 0)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})
