"""INT8 quantization ops against the plain-PyTorch reference in quant_reference.py."""
import pytest
import torch
from torch.library import opcheck

from memwarden import quant
from quant_reference import reference_dequantize, reference_quantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, group_size for "group"): odd last dimensions included.
SHAPES = [((3, 67), 67), ((2, 5137), 11), ((1, 8193), 2731), ((2, 3, 256), 64), ((17, 4096), 128), ((5,), 5)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_input(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3 + torch.rand(shape, generator=gen)  # not centred
    return x.to(dtype).to(device)


def quantize(x, granularity, group_size, symmetric):
    return quant.quantize_int8(x, granularity, group_size if granularity == "group" else None, symmetric)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", quant.GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,group_size", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_quantize_matches_reference(shape, group_size, dtype, granularity, symmetric, device):
    x = make_input(shape, dtype, device)
    q, scale, azp = quantize(x, granularity, group_size, symmetric)
    ref_q, ref_scale, ref_azp = reference_quantize(x.cpu(), granularity, group_size, symmetric)

    assert q.dtype == torch.int8 and q.shape == x.shape and q.device == x.device
    assert scale.dtype == torch.float32
    torch.testing.assert_close(scale.cpu().reshape(-1), ref_scale, rtol=1e-6, atol=0)
    # x / scale (reference) and x * (1 / scale) (kernels) may round a tie differently.
    assert (q.cpu().int() - ref_q.int()).abs().max() <= (1 if symmetric else 2)
    if symmetric:
        assert azp is None
    else:
        assert azp.dtype == torch.int32 and azp.shape == scale.shape
        assert (azp.cpu().reshape(-1) - ref_azp).abs().max() <= 1

    expected_scale_shape = {
        "tensor": (1,),
        "token": (*shape[:-1], 1),
        "channel": (shape[-1],),
        "group": (*shape[:-1], shape[-1] // group_size),
    }[granularity]
    assert tuple(scale.shape) == expected_scale_shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", quant.GRANULARITIES)
@pytest.mark.parametrize("shape,group_size", SHAPES[:4], ids=[str(s) for s, _ in SHAPES[:4]])
def test_round_trip_error_is_half_a_step(shape, group_size, granularity, symmetric, device):
    x = make_input(shape, torch.float32, device, seed=1)
    gs = group_size if granularity == "group" else None
    q, scale, azp = quant.quantize_int8(x, granularity, gs, symmetric)
    x_hat = quant.dequantize_int8(q, scale, azp, granularity, gs, out_dtype=torch.float32)
    torch.testing.assert_close(x_hat.cpu(), reference_dequantize(q.cpu(), scale.cpu(), None if azp is None else azp.cpu(), granularity, gs))

    step = quant.broadcast_scale(scale.cpu(), x.shape, granularity, gs)
    err = (x_hat.cpu() - x.cpu()).abs()
    half_step = step / 2 * (1 + 1e-5) + 1e-7
    if symmetric:
        assert bool((err <= half_step).all()), f"max error/step {(err / step).max():.4f}"
    else:
        # The extremes of a group may saturate one step short (azp is rounded too).
        saturated = (q.cpu() == 127) | (q.cpu() == -128)
        assert bool((err[~saturated] <= half_step[~saturated]).all())
        assert bool((err[saturated] <= step[saturated] * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_output_dtypes(dtype, device):
    x = make_input((4, 96), torch.float32, device)
    q, scale, azp = quant.quantize_int8(x, "group", 32, symmetric=False)
    out = quant.dequantize_int8(q, scale, azp, "group", 32, out_dtype=dtype)
    ref = reference_dequantize(q.cpu(), scale.cpu(), azp.cpu(), "group", 32)
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu(), ref.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", ["token", "channel", "group"])
def test_static_quantization_uses_given_scales(granularity, device):
    x = make_input((6, 64), torch.float16, device)
    gs = 16 if granularity == "group" else None
    _, scale, azp = quant.quantize_int8(x, granularity, gs, symmetric=False)
    scale, azp = scale * 1.5, azp // 2  # different from what the data would give
    q = torch.ops.memwarden.quantize_int8_static(x, scale, azp, granularity, gs)
    s = quant.broadcast_scale(scale.cpu(), x.shape, granularity, gs)
    z = quant.broadcast_scale(azp.cpu().float(), x.shape, granularity, gs)
    expected = (torch.round(x.cpu().float() / s) + z).clamp(-128, 127)
    assert (q.cpu().float() - expected).abs().max() <= 1


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_int8_quant_vllm_shapes(device):
    x = make_input((7, 40), torch.bfloat16, device)
    q, scales, azp = quant.scaled_int8_quant(x)
    assert q.shape == x.shape and scales.shape == (7, 1) and azp is None
    ref_q, ref_scale, _ = reference_quantize(x.cpu(), "token")
    torch.testing.assert_close(scales.cpu().reshape(-1), ref_scale)
    assert (q.cpu().int() - ref_q.int()).abs().max() <= 1

    q, scales, azp = quant.scaled_int8_quant(x, symmetric=False)
    assert scales.shape == (7, 1) and azp.shape == (7, 1) and azp.dtype == torch.int32

    static_scale = torch.tensor([0.05], device=device)
    q, scales, azp = quant.scaled_int8_quant(x, static_scale)
    assert scales is static_scale or torch.equal(scales, static_scale)
    unclamped = torch.round(x.cpu().float() / 0.05)
    assert (q.cpu().float() - unclamped.clamp(-128, 127)).abs().max() <= 1

    static_azp = torch.tensor([10], dtype=torch.int32, device=device)
    q, _, azp = quant.scaled_int8_quant(x, static_scale, static_azp, symmetric=False)
    assert (q.cpu().float() - (unclamped + 10).clamp(-128, 127)).abs().max() <= 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_zero_and_constant_rows(symmetric, device):
    x = torch.zeros(3, 33, device=device)
    x[1] = 5.0
    x[2] = -3.0
    q, scale, azp = quant.quantize_int8(x, "token", symmetric=symmetric)
    assert not torch.isnan(scale).any()
    assert scale[0].item() == 0.0 and bool((q[0] == 0).all())
    x_hat = quant.dequantize_int8(q, scale, azp, "token", out_dtype=torch.float32)
    torch.testing.assert_close(x_hat, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_follow_the_documented_rules(device):
    x = torch.tensor([[1.0, float("nan"), float("inf"), float("-inf"), -2.0] + [0.5] * 27], device=device)
    q, scale, _ = quant.quantize_int8(x, "token")
    assert scale.item() == pytest.approx(2.0 / 127)  # only finite values set the scale
    assert q[0, :5].tolist() == [64, 0, 127, -128, -127]  # 63.5 rounds half to even: 64

    q, scale, azp = quant.quantize_int8(x, "token", symmetric=False)
    assert scale.item() == pytest.approx(3.0 / 255)
    assert q[0, 1].item() == azp.item()  # NaN: round(0) + azp, dequantizes to 0
    assert (q[0, 2].item(), q[0, 3].item()) == (127, -128)

    q, scale, _ = quant.quantize_int8(torch.tensor([[float("nan"), float("inf")] * 8], device=device), "token")
    assert scale.item() == 0.0 and bool((q == 0).all())


def test_errors_name_the_argument():
    x = torch.randn(4, 64)
    with pytest.raises(TypeError, match=r"quantize_int8: x must be torch\.float32, torch\.float16 or torch\.bfloat16, got torch\.int32"):
        quant.quantize_int8(x.to(torch.int32))
    with pytest.raises(ValueError, match=r"quantize_int8: x must be contiguous"):
        quant.quantize_int8(x.t())
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize_int8(x, "group", 7)
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize_int8(x, "group")
    with pytest.raises(ValueError, match="granularity must be one of"):
        quant.quantize_int8(x, "row")
    with pytest.raises(ValueError, match="at least one dimension"):
        quant.quantize_int8(torch.tensor(1.0))
    q, scale, azp = quant.quantize_int8(x, "token", symmetric=False)
    with pytest.raises(ValueError, match="scale must have 4 elements"):
        quant.dequantize_int8(q, scale[:2], azp[:2])
    with pytest.raises(TypeError, match=r"dequantize_int8: scale must be torch\.float32, got torch\.float64"):
        quant.dequantize_int8(q, scale.double(), azp)
    with pytest.raises(TypeError, match=r"dequantize_int8: azp must be torch\.int32, got torch\.int64"):
        quant.dequantize_int8(q, scale, azp.long())
    with pytest.raises(ValueError, match="azp must have as many elements"):
        quant.dequantize_int8(q, scale, azp[:1])
    with pytest.raises(TypeError, match=r"dequantize_int8: q must be torch\.int8, got torch\.uint8"):
        quant.dequantize_int8(q.to(torch.uint8), scale, azp)
    with pytest.raises(TypeError, match="out_dtype"):
        quant.dequantize_int8(q, scale, azp, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="scale must be on the input's device"):
        quant.dequantize_int8(q, scale.to("meta"), azp)
    with pytest.raises(ValueError, match="azp is only accepted together with a static scale"):
        quant.scaled_int8_quant(x, azp=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="needs azp"):
        quant.scaled_int8_quant(x, torch.ones(1), symmetric=False)
    with pytest.raises(ValueError, match="scale must have 1 elements"):
        quant.scaled_int8_quant(x, torch.ones(2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_quantize_into_preallocated_matches_functional(symmetric, device):
    x = make_input((3, 5, 96), torch.float16, device)
    q = torch.full(x.shape, 99, dtype=torch.int8, device=device)  # poisoned
    scale = torch.full((3, 5, 3), float("nan"), device=device)
    azp = None if symmetric else torch.full((3, 5, 3), 99, dtype=torch.int32, device=device)
    quant.quantize_int8_into(x, q, scale, azp, group_size=32)
    ref_q, ref_scale, ref_azp = quant.quantize_int8(x, "group", 32, symmetric)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    if not symmetric:
        assert torch.equal(azp, ref_azp)


def test_quantize_into_checks_the_outputs():
    x = torch.randn(4, 64)
    q, scale = torch.empty(4, 64, dtype=torch.int8), torch.empty(4, 1)
    with pytest.raises(TypeError, match=r"quantize_int8_into: q must be torch\.int8, got torch\.float32"):
        quant.quantize_int8_into(x, q.float(), scale)
    with pytest.raises(ValueError, match=r"scale must have shape \[4, 1\], got \[4, 2\]"):
        quant.quantize_int8_into(x, q, torch.empty(4, 2))
    with pytest.raises(ValueError, match="q must be contiguous"):
        quant.quantize_int8_into(x, torch.empty(64, 4, dtype=torch.int8).t(), scale)
    with pytest.raises(TypeError, match=r"quantize_int8_into: azp must be torch\.int32, got torch\.float32"):
        quant.quantize_int8_into(x, q, scale, torch.empty(4, 1))


def test_empty_input():
    q, scale, _ = quant.quantize_int8(torch.empty(0, 16), "token")
    assert q.shape == (0, 16) and scale.shape == (0, 1)
    out = quant.dequantize_int8(q, scale, None, "token")
    assert out.shape == (0, 16)


def _opcheck_cases(device):
    x = make_input((5, 48), torch.bfloat16, device)
    q, scale, azp = quant.quantize_int8(x, "group", 16, symmetric=False)
    ops = torch.ops.memwarden
    return [
        (ops.quantize_int8_groups.default, (x, 16, False)),
        (ops.quantize_int8_groups.default, (x, 48, True)),
        (ops.quantize_int8_groups_out.default, (x, 16, torch.empty_like(q), torch.empty_like(scale), torch.empty_like(azp))),
        (ops.quantize_int8_groups_out.default, (x, 16, torch.empty_like(q), torch.empty_like(scale), None)),
        (ops.quantize_int8_params.default, (x, "channel", False)),
        (ops.quantize_int8_params.default, (x, "tensor", True)),
        (ops.quantize_int8_static.default, (x, scale, azp, "group", 16)),
        (ops.dequantize_int8.default, (q, scale, azp, "group", 16, torch.float32)),
        (ops.quantize_int8.default, (x, "channel", None, False)),
        (ops.quantize_int8.default, (x, "tensor", None, True)),
        (ops.scaled_int8_quant.default, (x, None, None, False)),
        (ops.scaled_int8_quant.default, (x, torch.tensor([0.1], device=device), None, True)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        opcheck(op, args)


def test_torch_compile_with_dynamic_tokens():
    def fn(x):
        q, scale, azp = quant.quantize_int8(x, "token", symmetric=False)
        return quant.dequantize_int8(q, scale, azp, "token", out_dtype=torch.float32)

    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    for tokens in (3, 9):
        x = make_input((tokens, 64), torch.float16, "cpu", seed=tokens)
        torch.testing.assert_close(compiled(x), fn(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("granularity", quant.GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu(granularity, dtype):
    x = make_input((33, 4096 + 8), dtype, "cpu")
    gs = 8 if granularity == "group" else None
    cpu = quant.quantize_int8(x, granularity, gs, symmetric=False)
    gpu = quant.quantize_int8(x.cuda(), granularity, gs, symmetric=False)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1])
    # Asymmetric: the zero point (min / scale, rounded) and q may each round a tie the
    # other way on the two devices, as against the reference.
    assert (gpu[2].cpu() - cpu[2]).abs().max() <= 1
    assert (gpu[0].cpu().int() - cpu[0].int()).abs().max() <= 2
    # A one-step difference in q moves the dequantized value by at most one scale.
    step = quant.broadcast_scale(cpu[1], x.shape, granularity, gs)
    gpu_x = quant.dequantize_int8(*gpu, granularity, gs, torch.float32).cpu()
    cpu_x = quant.dequantize_int8(*cpu, granularity, gs, torch.float32)
    assert bool(((gpu_x - cpu_x).abs() <= 2 * step * 1.001).all())


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 4), (4, 0)])
def test_empty_input_every_granularity(shape, symmetric):
    # Issue 11: "tensor"/"channel" failed inside amax. Empty q; scale (and azp) shaped as documented,
    # zeros like an all-zero group; dequantizes to an empty tensor.
    x = torch.empty(shape, dtype=torch.bfloat16)
    cols = shape[-1]
    for granularity, group_size, scale_shape in [("tensor", None, (1,)), ("channel", None, (cols,)),
                                                 ("token", None, None), ("group", 2, None)]:
        if granularity == "group" and cols == 0:
            continue
        q, scale, azp = quant.quantize_int8(x, granularity, group_size, symmetric)
        assert q.shape == x.shape and q.dtype == torch.int8
        assert scale.dtype == torch.float32
        if scale_shape is not None:
            assert scale.shape == scale_shape and bool((scale == 0).all())
        assert (azp is None) == symmetric
        if azp is not None:
            assert azp.shape == scale.shape and azp.dtype == torch.int32 and bool((azp == 0).all())
        out = quant.dequantize_int8(q, scale, azp, granularity, group_size)
        assert out.shape == x.shape


def test_empty_input_still_checks_the_dtype():
    with pytest.raises(TypeError, match=r"quantize_int8: x must be torch\.float32, .*got torch\.int32"):
        quant.quantize_int8(torch.empty(0, 4, dtype=torch.int32), "tensor")


def test_quantize_into_rejects_a_0_dim_input():
    with pytest.raises(ValueError, match="quantize_int8_into: x must have at least one dimension"):
        quant.quantize_int8_into(torch.tensor(1.0), torch.empty((), dtype=torch.int8), torch.empty(1))


@pytest.mark.parametrize("group_size", [0, -4, True, False, 2.0, "4"], ids=repr)
def test_group_size_must_be_a_positive_int(group_size):
    x = torch.randn(4, 64)
    q, scale, _ = quant.quantize_int8(x, "group", 16)
    pattern = r"{}: group_size must be a positive integer, got "
    with pytest.raises(ValueError, match=pattern.format("quantize_int8")):
        quant.quantize_int8(x, "group", group_size)
    with pytest.raises(ValueError, match=pattern.format("quantize_int8_into")):  # 0 meant per token
        quant.quantize_int8_into(x, torch.empty_like(q), torch.empty(4, 1), group_size=group_size)
    with pytest.raises(ValueError, match=pattern.format("dequantize_int8")):
        quant.dequantize_int8(q, scale, None, "group", group_size)
    with pytest.raises(ValueError, match=pattern.format("broadcast_scale")):
        quant.broadcast_scale(scale, x.shape, "group", group_size)


def test_group_size_accepts_index_ints():
    x = torch.randn(4, 64)
    ref = quant.quantize_int8(x, "group", 16)
    got = quant.quantize_int8(x, "group", torch.tensor(16).numpy()[()])  # numpy integer: __index__
    assert all(torch.equal(a, b) for a, b in zip(ref[:2], got[:2]))


def test_dequantize_defaults_to_float32():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    q, scale, azp = quant.quantize_int8(x, "token", symmetric=False)
    out = quant.dequantize_int8(q, scale, azp, "token")
    assert out.dtype == torch.float32
    assert quant.dequantize_int8(q, scale, azp, "token", out_dtype=None).dtype == torch.float32
    bf16 = quant.dequantize_int8(q, scale, azp, "token", out_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, out.to(torch.bfloat16))
    with pytest.raises(TypeError, match="dequantize_int8: out_dtype must be a torch.dtype or None, got str"):
        quant.dequantize_int8(q, scale, azp, "token", out_dtype="float16")
    with pytest.raises(TypeError, match=r"dequantize_int8: out_dtype must be torch\.float32, .*got torch\.int32"):
        quant.dequantize_int8(q, scale, azp, "token", out_dtype=torch.int32)


def test_wrappers_reject_non_tensors_and_name_dtypes_as_torch_does():
    x = torch.randn(4, 64)
    with pytest.raises(TypeError, match="quantize_int8: x must be a torch.Tensor, got list"):
        quant.quantize_int8([[1.0, 2.0]])
    with pytest.raises(TypeError, match=r"scaled_int8_quant: input must be torch\.float32, .*got torch\.int32"):
        quant.scaled_int8_quant(x.to(torch.int32))
    with pytest.raises(TypeError, match=r"quantize_int8_into: scale must be torch\.float32, got torch\.float16"):
        quant.quantize_int8_into(x, torch.empty(4, 64, dtype=torch.int8), torch.empty(4, 1, dtype=torch.float16))
    with pytest.raises(TypeError, match="dequantize_int8: scale must be a torch.Tensor, got float"):
        quant.dequantize_int8(torch.zeros(4, 64, dtype=torch.int8), 0.5, None, "tensor")


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_params_op_matches_the_reference(granularity, symmetric):
    """The one-pass reduction (several threads' partial ranges merged) against the reference."""
    x = make_input((2000, 40), torch.float32, "cpu", seed=3)  # several 32k-element tasks
    x[5, 7], x[100, 3] = float("nan"), float("-inf")
    scale, azp = torch.ops.memwarden.quantize_int8_params(x, granularity, symmetric)
    _, ref_scale, ref_azp = reference_quantize(x, granularity, None, symmetric)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    assert (azp is None) == symmetric and (symmetric or torch.equal(azp, ref_azp))


def test_params_op_names_granularity():
    with pytest.raises(ValueError, match="granularity must be 'tensor' or 'channel'"):
        torch.ops.memwarden.quantize_int8_params(torch.randn(2, 4), "token", True)


@pytest.mark.parametrize("granularity,group_size", [("token", None), ("group", 16)])
def test_eager_fast_path_matches_the_op(granularity, group_size):
    """Eager plain tensors skip the dispatcher (decode sizes): the same kernel, the same bits."""
    x = make_input((3, 64), torch.bfloat16, "cpu")
    fast = quant.quantize_int8(x, granularity, group_size, symmetric=False)
    slow = torch.ops.memwarden.quantize_int8(x, granularity, group_size, False)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    ref_q, ref_scale, ref_azp = reference_quantize(x, granularity, group_size, symmetric=False)
    torch.testing.assert_close(fast[1].reshape(-1), ref_scale, rtol=1e-6, atol=0)
    assert (fast[0].int() - ref_q.int()).abs().max() <= 2  # ties may round the other way (x * 1/s vs x / s)
    assert (fast[2].reshape(-1) - ref_azp).abs().max() <= 1


def test_dispatch_modes_still_see_the_op():
    """Under a dispatch mode (FakeTensorMode, profilers, memory trackers) the op is dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        quant.quantize_int8(torch.randn(2, 8), "token")
    assert any(name.startswith("memwarden.quantize_int8") for name in seen), seen
