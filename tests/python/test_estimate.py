import pytest

from memwarden import estimate as E
from memwarden import models as M

GIB = 2**30


def test_kv_and_totals_by_hand():
    e = E.estimate("llama-3.1-8b", context=8192, batch=2, cuda_context=0, workspace=0)
    assert e.kv_cache == 8192 * 2 * 32 * 8 * 128 * 2 * 2  # tokens x layers x kv x hd x (K,V) x bytes
    assert e.weights == M.describe("llama-3.1-8b").bytes
    assert e.total == e.weights + e.kv_cache + e.activations
    assert E.estimate("llama-3.1-8b", context=8192, kv_dtype="int8").kv_cache == 8192 * 32 * 8 * 128 * 2


def test_mla_and_sliding_window():
    assert E.estimate("deepseek-v3", context=1000).kv_cache == 1000 * 61 * 576 * 2
    g = E.estimate("gpt-oss-20b", context=4096).kv_cache
    per = 8 * 64 * 2 * 2
    assert g == 12 * per * 4096 + 12 * per * 128


def test_activation_peak_grows_with_chunk_not_context():
    a = E.estimate("mixtral-8x7b", context=100_000, prefill_chunk=1024).activations
    b = E.estimate("mixtral-8x7b", context=200_000, prefill_chunk=1024).activations
    c = E.estimate("mixtral-8x7b", context=200_000, prefill_chunk=2048).activations
    assert a == b < c


def test_per_device_breakdown_adds_up():
    e = E.estimate("mixtral-8x7b", "int4", context=32768, max_memory={0: "24GiB", 1: "24GiB"})
    assert e.fits
    assert sum(d.model for d in e.devices) == e.weights
    assert sum(d.context for d in e.devices) == pytest.approx(e.kv_cache, rel=1e-6)
    assert all(d.free == d.memory - d.model - d.context - d.compute - d.overhead for d in e.devices)
    assert "fits" in e.report()
    assert E.estimate("mixtral-8x7b", max_memory={0: "24GiB"}).fits is False


def test_max_context_is_the_boundary():
    mem = {0: "24GiB"}
    c = E.max_context("llama-3.1-8b", mem)
    assert 0 < c < 131072
    assert E.estimate("llama-3.1-8b", context=c, max_memory=mem).fits
    assert not E.estimate("llama-3.1-8b", context=c + 1, max_memory=mem).fits
    assert E.max_context("llama-3.1-8b", {0: "8GiB"}) == 0
    assert E.max_context("llama-3.1-8b", {0: "80GiB"}) == 131072


@pytest.mark.parametrize("kw,match", [({"context": 0}, "context"), ({"batch": -1}, "batch"),
                                      ({"dtype": "int3"}, "dtype"), ({"kv_dtype": "int4"}, "kv_dtype")])
def test_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        E.estimate("llama-3.1-8b", **kw)


def test_plan_auto_reserve_leaves_room_for_kv():
    from memwarden.plan import plan
    p = plan("mixtral-8x7b", {0: "48GiB", 1: "48GiB"}, reserve="auto", context=32768)
    kv = E.kv_cache_bytes(M.model_spec("mixtral-8x7b"), 32768)
    assert all(p.reserve[d] > kv // 2 for d in (0, 1))
