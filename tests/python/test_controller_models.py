"""Model lifecycle policies: hand-computed footprints, can_load_model verdicts and
adjustments, should_swap_models against each never-evict rule (fake clock), the registry's
transitions and thread safety; hypothesis properties of swap decisions (budget kept, the
protected models stay, same state -> same decision); the baseline policies (Ollama-like,
LRU, never-unload) against hand-computed cases and the same properties."""
from __future__ import annotations

import subprocess
import sys
import threading

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from memwarden.controller.models import (
    SWAP_POLICIES, Adjustment, LoadRequirements, ModelRegistry, ServedModel, SwapDecision, SystemState,
    can_load_model, lru_swap_models, never_unload_swap_models, ollama_swap_models, should_promote_model,
    should_swap_models,
)

MiB, GiB = 2**20, 2**30
INT8_PER_TOKEN = 1 * MiB * (128 + 4) // 256   # 1 MiB/token of bf16 heads of 128 -> int8 + fp32 scale


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def spec(name="m", weights=8 * GiB, per_token=MiB, context=4096, **kw):
    return ServedModel(name=name, weights_bytes=weights, kv_bytes_per_token=per_token, context=context, **kw)


def load(registry, clock, name, at, uses=0):
    """Load ``name`` at time ``at`` and serve ``uses`` finished requests then."""
    clock.now = at
    registry.mark_loading(name)
    registry.mark_loaded(name)
    for _ in range(uses):
        registry.begin_request(name)
        registry.end_request(name)


# --- ServedModel -------------------------------------------------------------------------

def test_footprint_by_hand():
    s = spec(buffers_bytes=100 * MiB)
    assert s.priority == s.tier == 0
    assert s.footprint() == 8 * GiB + 4096 * MiB + 100 * MiB
    assert s.footprint(context=1000) == 8 * GiB + 1000 * MiB + 100 * MiB
    assert s.kv_per_token("int8_per_token_head") == INT8_PER_TOKEN == 540672
    assert s.kv_per_token("fp8") == MiB // 2
    assert s.kv_per_token("int4") == MiB * (64 + 2 * 4) // 256   # half bytes + 2 groups of scale, zero
    assert s.footprint(kv_dtype="bf16") == s.footprint()
    assert spec(tier=2).priority == 2 and spec(tier=2, priority=0).priority == 0


@pytest.mark.parametrize("field,value", [("weights_bytes", -1), ("kv_bytes_per_token", 1.5), ("context", 0),
                                         ("min_residency_s", -1.0), ("kv_dtype", "int3"), ("quota_bytes", "9")])
def test_spec_validation_names_the_argument(field, value):
    args = dict(name="m", weights_bytes=1, kv_bytes_per_token=1, context=1)
    with pytest.raises(ValueError, match=field):
        ServedModel(**{**args, field: value})


def test_from_estimate_matches_the_estimator(tmp_path):
    from gguf_files import write_llama

    from memwarden import footprint as F
    from memwarden.estimate import estimate
    from memwarden.models import describe

    path = write_llama(str(tmp_path / "tiny.gguf")).path
    s = ServedModel.from_estimate("tiny", path, context=256, tier=1, quota_bytes="2GiB")
    desc = describe(path)
    est = estimate(path, context=256)
    assert s.weights_bytes == est.weights == desc.bytes
    assert s.kv_bytes_per_token == F.kv_bytes_per_token(desc.spec, est.kv_dtype, desc.dtype) == 384
    assert s.footprint() == est.total      # full attention, no recurrent state: the same sum
    assert s.num_layers == 3
    decoder = sum(p.bytes for p in desc.parts if 0 <= p.layer < 3)
    assert s.layer_bytes == -(-decoder // 3)
    assert (s.tier, s.quota_bytes, s.kv_dtype, s.head_dim) == (1, 2 * GiB, est.kv_dtype, 16)


# --- can_load_model ----------------------------------------------------------------------

def test_kv_bottleneck_and_adjustments_by_hand():
    v = can_load_model(SystemState(10 * GiB, 0), spec())
    assert (v.feasible, v.bottleneck) == (False, "kv")
    assert v.needed_device_bytes == 12 * GiB and v.available_device_bytes == 10 * GiB
    shrink, int8 = v.suggested_adjustments         # no layers given: offloading is not priced
    assert shrink == Adjustment("shrink_context", shrink.detail, 2048 * MiB, True, 2048)
    # int8 saves (1 MiB - 540672) x 4096 = 1.9375 GiB: not enough for the 2 GiB short
    assert int8 == Adjustment("int8_kv", int8.detail, (MiB - INT8_PER_TOKEN) * 4096, False,
                              "int8_per_token_head")
    assert int8.saves_bytes == 2080374784


def test_buffers_count_when_shrinking_and_int8_ranks_first_when_enough():
    v = can_load_model(SystemState(11 * GiB, 0), spec(buffers_bytes=GiB // 2))
    int8, shrink = v.suggested_adjustments        # both suffice: least disruption first
    assert (int8.kind, int8.sufficient) == ("int8_kv", True)
    assert shrink.value == (11 * GiB - 8 * GiB - GiB // 2) // MiB == 2560


def test_offload_layers_smallest_n_and_host_room():
    s = spec(num_layers=32, layer_bytes=256 * MiB)
    # (n - 1) x 256 MiB >= 2 GiB short (one layer stays reserved for streaming): n = 9
    offload = [a for a in can_load_model(SystemState(10 * GiB, 4 * GiB), s).suggested_adjustments
               if a.kind == "offload_layers"]
    assert offload == [Adjustment("offload_layers", offload[0].detail, 2 * GiB, True, 9)]
    no_host = can_load_model(SystemState(10 * GiB, 2 * GiB), s).suggested_adjustments   # 9 layers need 2.25 GiB
    assert "offload_layers" not in [a.kind for a in no_host]


def test_weights_buffers_host_memory_and_quota_bottlenecks():
    assert can_load_model(SystemState(10 * GiB, 0), spec(weights=12 * GiB)).bottleneck == "weights"
    v = can_load_model(SystemState(10 * GiB, 0), spec(context=1024, buffers_bytes=2 * GiB))
    assert v.bottleneck == "buffers"
    host = LoadRequirements(spec(context=1024, num_layers=8, layer_bytes=GiB), host_layers=4)
    v = can_load_model(SystemState(10 * GiB, 2 * GiB), host)
    assert (v.feasible, v.bottleneck, v.needed_host_bytes, v.suggested_adjustments) == \
        (False, "host_memory", 4 * GiB, [])
    assert v.needed_device_bytes == 8 * GiB - 3 * GiB + 1024 * MiB
    assert can_load_model(SystemState(10 * GiB, 4 * GiB), host).feasible
    v = can_load_model(SystemState(64 * GiB, 0), spec(quota_bytes="9GiB"))
    assert (v.bottleneck, v.available_device_bytes) == ("kv", 9 * GiB)
    ok = can_load_model(SystemState(12 * GiB, 0), spec())
    assert (ok.feasible, ok.bottleneck, ok.suggested_adjustments) == (True, None, [])


def test_unload_candidates_idle_lowest_tier_then_least_recent():
    clock = FakeClock()
    reg = ModelRegistry(clock=clock)
    for name, tier in [("old", 0), ("recent", 0), ("busy", 0), ("vip", 1), ("young", 0), ("low", -1)]:
        reg.register(spec(name, weights=GiB, per_token=0, tier=tier))
    load(reg, clock, "old", 100, uses=1)
    load(reg, clock, "recent", 200, uses=1)
    load(reg, clock, "busy", 100)
    reg.begin_request("busy")
    load(reg, clock, "vip", 100)
    load(reg, clock, "low", 300, uses=5)
    load(reg, clock, "young", 990)
    clock.now = 1000
    v = can_load_model(reg.system_state(10 * GiB, 0), spec())
    unloads = [a for a in v.suggested_adjustments if a.kind == "unload_model"]
    assert [a.value for a in unloads] == ["low", "old", "recent"]   # tier -1 first, then older demand
    assert all(a.saves_bytes == GiB and not a.sufficient for a in unloads)
    reg.record_measured("old", 3 * GiB)
    enough = [a for a in can_load_model(reg.system_state(10 * GiB, 0), spec()).suggested_adjustments
              if a.kind == "unload_model" and a.sufficient]
    assert [(a.value, a.saves_bytes) for a in enough] == [("old", 3 * GiB)]


# --- registry -----------------------------------------------------------------------------

def test_registry_lifecycle_and_measured_bytes():
    clock = FakeClock(0.0)
    reg = ModelRegistry(clock=clock, demand_half_life_s=300)
    reg.register(spec("a"))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(spec("a"))
    with pytest.raises(ValueError, match="requests run only on a loaded model"):
        reg.begin_request("a")
    with pytest.raises(ValueError, match="from unloaded to offloaded"):
        reg.mark_offloaded("a")
    reg.mark_loading("a")
    clock.now = 5.0
    reg.mark_loaded("a", measured_bytes="9GiB")
    reg.begin_request("a")
    with pytest.raises(ValueError, match="1 running request"):
        reg.mark_unloaded("a")
    with pytest.raises(ValueError, match="unload it before unregistering"):
        reg.unregister("a")
    reg.end_request("a")
    with pytest.raises(ValueError, match="no running request"):
        reg.end_request("a")
    s = reg.state("a", now=305.0)
    assert (s.status, s.loaded_at, s.last_used, s.use_count, s.running) == ("loaded", 5.0, 5.0, 1, 0)
    assert s.footprint_bytes == 9 * GiB and s.demand == pytest.approx(0.5)   # one half-life later
    assert s.score == pytest.approx(0.5 / 9)
    reg.mark_offloaded("a")
    reg.mark_unloaded("a")
    assert reg.state("a").loaded_at is None
    reg.unregister("a")
    with pytest.raises(KeyError, match="not registered"):
        reg.state("a")
    with pytest.raises(ValueError, match="nbytes"):
        reg.record_measured("missing", -1)


def test_registry_is_thread_safe():
    reg = ModelRegistry()
    reg.register(spec("a"))
    reg.mark_loading("a")
    reg.mark_loaded("a")

    def serve():
        for _ in range(500):
            reg.begin_request("a")
            reg.end_request("a")

    threads = [threading.Thread(target=serve) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = reg.state("a")
    assert (s.use_count, s.running) == (4000, 0)


# --- should_swap_models -----------------------------------------------------------------

def swap_setup(**victim):
    """'x' (10 GiB, loaded at t=100, one request) and 'y' (12 GiB, unloaded) in 20 GiB."""
    clock = FakeClock()
    reg = ModelRegistry(clock=clock)
    reg.register(spec("x", weights=10 * GiB, per_token=0, **victim))
    reg.register(spec("y", weights=12 * GiB, per_token=0, tier=1 if victim.get("tier") == 2 else 0))
    load(reg, clock, "x", 100, uses=1)
    clock.now = 1000
    return reg, clock


def test_swaps_out_an_idle_quiet_model():
    reg, _ = swap_setup()
    d = should_swap_models(reg, {"y": 5}, "20GiB")
    assert (d.swap_out, d.swap_in) == (["x"], ["y"])
    assert "swap in y, swap out x" in d.reason


def test_never_evicts_running_higher_tier_or_young_models():
    reg, _ = swap_setup()
    reg.begin_request("x")
    d = should_swap_models(reg, ["y"], 20 * GiB)
    assert (d.swap_out, d.swap_in) == ([], []) and "x has 1 running request" in d.reason
    reg, _ = swap_setup(tier=2)
    d = should_swap_models(reg, {"y": 100}, 20 * GiB)
    assert (d.swap_out, d.swap_in) == ([], []) and "tier 2, above 1" in d.reason
    reg, clock = swap_setup()
    reg.mark_offloaded("x")
    clock.now = 995.0
    reg.mark_loaded("x")          # back on the device 5 s ago
    clock.now = 1000.0
    d = should_swap_models(reg, [("y", 3)], 20 * GiB)
    assert (d.swap_out, d.swap_in) == ([], []) and "loaded 5 s ago (min residency 30 s)" in d.reason


def test_busier_model_per_byte_stays():
    reg, clock = swap_setup()
    for _ in range(20):
        reg.begin_request("x")
        reg.end_request("x")
    d = should_swap_models(reg, {"y": 1}, 20 * GiB)
    assert d.swap_in == [] and "as much in demand per byte" in d.reason


def test_a_busy_model_that_would_give_way_is_drained():
    reg, _ = swap_setup()
    reg.begin_request("x")
    d = should_swap_models(reg, {"y": 5}, 20 * GiB)
    assert (d.swap_out, d.swap_in, d.drain) == ([], [], ["x"]) and "draining x" in d.reason
    reg.end_request("x")
    d = should_swap_models(reg, {"y": 5}, 20 * GiB)
    assert (d.swap_out, d.swap_in, d.drain) == (["x"], ["y"], [])
    reg, _ = swap_setup(tier=2)      # x would not give way idle either: draining it would not help
    reg.begin_request("x")
    assert should_swap_models(reg, {"y": 100}, 20 * GiB).drain == []
    for policy in ("ollama", "lru"):  # the baselines wait for a gap in x's traffic
        reg, _ = swap_setup()
        reg.begin_request("x")
        assert SWAP_POLICIES[policy](reg, {"y": 5}, 20 * GiB).drain == []


def partial_setup(parked=True):
    """'x' (10 GiB, busy per byte) loaded; 'y' (12 GiB, 6 layers of 1.5 GiB) parked in
    host memory (or unloaded) in 20 GiB: 10 GiB free."""
    clock = FakeClock()
    reg = ModelRegistry(clock=clock)
    reg.register(spec("x", weights=10 * GiB, per_token=0))
    reg.register(spec("y", weights=12 * GiB, per_token=0, num_layers=6, layer_bytes=3 * GiB // 2))
    if parked:
        load(reg, clock, "y", 100)
        reg.mark_offloaded("y")
    load(reg, clock, "x", 200, uses=20)
    clock.now = 1000
    return reg


def test_a_parked_model_that_does_not_fit_comes_back_with_layers_left_in_host_memory():
    reg = partial_setup()
    d = should_swap_models(reg, {"y": 1}, 20 * GiB)
    # 12 - 1.5 k + 1.5 (the layer streamed in) <= 10 free: k = 3 (k = 2 needs 10.5)
    assert (d.swap_out, d.swap_in, d.host_layers) == ([], ["y"], {"y": 3})
    assert "y with 3 of 6 layers in host memory" in d.reason
    reg.mark_loading("y")
    reg.mark_loaded("y", host_layers=3)
    assert reg.state("y").footprint_bytes == 9 * GiB and reg.state("y").weights_footprint_bytes == 12 * GiB
    reg.set_host_layers("y", 0)
    assert reg.state("y").footprint_bytes == 12 * GiB
    reg.set_host_layers("y", 2)
    reg.mark_offloaded("y")
    assert reg.state("y").host_layers == 0
    with pytest.raises(ValueError, match="only a loaded model"):
        reg.set_host_layers("y", 1)
    with pytest.raises(ValueError, match="host_layers"):
        reg.set_host_layers("x", 7)
    d = should_swap_models(partial_setup(parked=False), {"y": 1}, 20 * GiB)  # built from scratch: whole or not
    assert d.swap_in == [] and d.host_layers == {}
    assert should_swap_models(partial_setup(), {"y": 1}, 11 * GiB).swap_in == []   # not even 1.5 GiB free
    for policy in ("ollama", "lru"):
        assert SWAP_POLICIES[policy](partial_setup(), {"y": 1}, 20 * GiB).host_layers == {}


def test_a_parked_model_waits_for_a_busy_model_to_drain_rather_than_run_partly_from_host_memory():
    reg = partial_setup()
    clock = reg._clock
    clock.now += 3600  # x's demand has faded to its one running request: y's 5 outweigh it per byte
    reg.begin_request("x")
    d = should_swap_models(reg, {"y": 5}, 20 * GiB)
    assert (d.swap_out, d.swap_in, d.drain, d.host_layers) == ([], [], ["x"], {})
    reg.end_request("x")
    d = should_swap_models(reg, {"y": 5}, 20 * GiB)
    assert (d.swap_out, d.swap_in, d.host_layers) == (["x"], ["y"], {})


def test_a_model_with_host_layers_is_promoted_when_room_is_made_by_the_eviction_rules():
    reg = partial_setup()
    reg.mark_loading("y")
    reg.mark_loaded("y", host_layers=3)   # 9 GiB on the device beside x's 10, in 20
    assert "x is as much in demand per byte" in should_promote_model(reg, "y", 20 * GiB).reason
    d = should_promote_model(reg, "y", 30 * GiB)  # its whole 12 GiB fit beside x: nothing gives way
    assert (d.swap_out, d.swap_in, d.host_layers) == ([], ["y"], {"y": 0})
    for _ in range(40):  # y becomes the busier model per byte: x gives way
        reg.begin_request("y")
        reg.end_request("y")
    d = should_promote_model(reg, "y", 20 * GiB)
    assert (d.swap_out, d.swap_in) == (["x"], ["y"]) and "bring y's 3 host layers back" in d.reason
    reg.begin_request("x")  # never a busy model
    assert should_promote_model(reg, "y", 20 * GiB).swap_in == []
    assert "no layers in host memory" in should_promote_model(reg, "x", 20 * GiB).reason
    with pytest.raises(KeyError, match="'nope'"):
        should_promote_model(reg, "nope", GiB)


def test_a_small_model_first_in_the_eviction_order_is_spared_when_the_next_frees_enough():
    # 10 GiB: 'tiny' (1 GiB, never used: score 0, first to go) and 'small' (4 GiB, used
    # once long ago); 'big' (9 GiB) needs 4 GiB more than the 5 free. Evicting small alone
    # frees them, so tiny stays; LRU takes both in its order.
    clock = FakeClock()
    reg = ModelRegistry(clock=clock)
    for name, gib in (("tiny", 1), ("small", 4), ("big", 9)):
        reg.register(spec(name, weights=gib * GiB, per_token=0))
    load(reg, clock, "tiny", 50)
    load(reg, clock, "small", 100, uses=1)
    clock.now = 1000
    d = should_swap_models(reg, {"big": 3}, 10 * GiB)
    assert (d.swap_out, d.swap_in) == (["small"], ["big"])
    assert lru_swap_models(reg, {"big": 3}, 10 * GiB).swap_out == ["tiny", "small"]


def test_fits_without_eviction_tier_order_and_nothing_pending():
    clock = FakeClock()
    reg = ModelRegistry(clock=clock)
    reg.register(spec("small", weights=4 * GiB, per_token=0))
    reg.register(spec("vip", weights=6 * GiB, per_token=0, tier=1))
    d = should_swap_models(reg, {"small": 50, "vip": 1}, 8 * GiB)
    assert d == SwapDecision([], ["vip"], d.reason) and "skipped: small" in d.reason
    assert should_swap_models(reg, {"small": 1}, 8 * GiB).swap_in == ["small"]
    assert "no pending request" in should_swap_models(reg, {}, 8 * GiB).reason
    d = should_swap_models(reg, {"vip": 1}, 4 * GiB)
    assert d.swap_in == [] and "nothing else is loaded" in d.reason
    with pytest.raises(KeyError, match="'nope'"):
        should_swap_models(reg, ["nope"], GiB)
    with pytest.raises(ValueError, match="device_budget"):
        should_swap_models(reg, [], "lots")
    with pytest.raises(ValueError, match="pending_requests"):
        should_swap_models(reg, "small", GiB)
    with pytest.raises(ValueError, match=r"pending_requests\['small'\]"):
        should_swap_models(reg, {"small": -1}, GiB)


def test_import_stays_light():
    code = "import sys, memwarden.controller.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


models_strategy = st.lists(
    st.fixed_dictionaries({
        "gib": st.integers(1, 8), "tier": st.integers(0, 2), "status": st.sampled_from(
            ["unloaded", "loaded", "loaded", "offloaded"]),
        "running": st.sampled_from([0, 0, 0, 1]), "extra_uses": st.integers(0, 3),
        "age": st.sampled_from([10, 40, 500, 2000]), "layers": st.sampled_from([0, 4]),
    }), min_size=2, max_size=6)


def build(models):
    clock = FakeClock()
    reg = ModelRegistry(clock=clock)
    for i, m in enumerate(models):
        name = f"m{i}"
        reg.register(spec(name, weights=m["gib"] * GiB, per_token=0, tier=m["tier"], num_layers=m["layers"],
                          layer_bytes=m["gib"] * GiB // 5 if m["layers"] else 0))
        if m["status"] == "unloaded":
            continue
        load(reg, clock, name, 1000 - m["age"], uses=m["extra_uses"])
        if m["status"] == "offloaded":
            reg.mark_offloaded(name)
        else:
            for _ in range(m["running"]):
                reg.begin_request(name)
    clock.now = 1000
    return reg


@settings(max_examples=150, deadline=None)
@given(models=models_strategy, pending=st.lists(st.integers(0, 9), min_size=6, max_size=6),
       headroom_gib=st.integers(-4, 8))
def test_swap_decision_properties(models, pending, headroom_gib):
    reg = build(models)
    states = {s.name: s for s in reg.states()}
    resident = {n for n, s in states.items() if s.status in ("loading", "loaded")}
    # a budget near what is loaded, so that swaps need evictions about as often as not
    budget_gib = max(1, sum(states[n].footprint_bytes for n in resident) // GiB + headroom_gib)
    pending = {f"m{i}": count for i, count in enumerate(pending[:len(models)])}  # resident ones are ignored
    d = should_swap_models(reg, pending, budget_gib * GiB)
    assert d == should_swap_models(reg, pending, budget_gib * GiB)
    assert d == should_swap_models(build(models), pending, budget_gib * GiB)
    for name in d.drain:  # only busy models that would give way are drained
        assert states[name].running and states[name].status == "loaded" and name not in d.swap_out
    for name, layers in d.host_layers.items():  # only parked models keep layers in host memory
        assert name in d.swap_in and states[name].status == "offloaded"
        assert 1 <= layers <= states[name].spec.num_layers
    if not d.swap_in:
        assert d.swap_out == []
        return
    after = (resident - set(d.swap_out)) | set(d.swap_in)
    assert sum(device_bytes(states[n], d) for n in after) <= budget_gib * GiB
    top_tier = max(states[n].spec.tier for n in d.swap_in)
    for name in d.swap_out:
        s = states[name]
        assert s.running == 0 and s.spec.tier <= top_tier and s.status == "loaded"
        assert s.now - s.loaded_at >= s.spec.min_residency_s
    assert not set(d.swap_in) & resident


def device_bytes(state, decision):
    """What ``state``'s model takes on the device after ``decision``, by hand: its layers
    left in host memory are off the device but for the one streamed in."""
    layers = decision.host_layers.get(state.name, 0)
    return state.footprint_bytes - layers * state.spec.layer_bytes + (state.spec.layer_bytes if layers else 0)


# --- the baselines ----------------------------------------------------------------------

def baseline_setup():
    """'a' (2 GiB, loaded at 100, last used at 500) and 'b' (4 GiB, loaded at 200, last used
    at 300) in 8 GiB at t=1000; 'c' (6 GiB) and 'd' (1 GiB) unloaded."""
    clock = FakeClock()
    reg = ModelRegistry(clock=clock)
    for name, gib in [("a", 2), ("b", 4), ("c", 6), ("d", 1)]:
        reg.register(spec(name, weights=gib * GiB, per_token=0))
    load(reg, clock, "a", 100)
    load(reg, clock, "b", 200)
    for name, at in [("b", 300), ("a", 500)]:
        clock.now = at
        reg.begin_request(name)
        reg.end_request(name)
    clock.now = 1000
    return reg


def test_lru_evicts_the_least_recently_used_first():
    reg = baseline_setup()
    d = lru_swap_models(reg, {"c": 1}, 8 * GiB)  # 2 GiB free, 4 short: b (used at 300) is enough
    assert (d.swap_out, d.swap_in) == (["b"], ["c"]) and "least recently used" in d.reason
    reg.begin_request("b")
    d = lru_swap_models(reg, {"c": 1}, 8 * GiB)  # a alone frees 2 of the 4 short
    assert d == SwapDecision([], [], d.reason) and "b has 1 running request" in d.reason


def test_ollama_unloads_the_first_idle_by_name_and_keeps_max_loaded():
    reg = baseline_setup()
    hour = 3600.0  # nothing expires
    d = ollama_swap_models(reg, {"c": 1}, 8 * GiB, keep_alive_s=hour)  # a first (by name): 2 GiB, short; then b
    assert (d.swap_out, d.swap_in) == (["a", "b"], ["c"])
    d = ollama_swap_models(reg, {"d": 1}, 64 * GiB, keep_alive_s=hour, max_loaded=2)  # room, no slot: a goes
    assert (d.swap_out, d.swap_in) == (["a"], ["d"])
    assert ollama_swap_models(reg, {"d": 1}, 64 * GiB, keep_alive_s=hour).swap_out == []


def test_ollama_keep_alive_expires_idle_models():
    reg = baseline_setup()
    d = ollama_swap_models(reg, {"c": 1}, 8 * GiB, keep_alive_s=600)  # b idle 700 s: gone, then c fits
    assert (d.swap_out, d.swap_in) == (["b"], ["c"])
    d = ollama_swap_models(reg, {}, 8 * GiB, keep_alive_s=600)
    assert (d.swap_out, d.swap_in) == (["b"], []) and "expired: b" in d.reason


def test_never_unload_loads_everything_over_budget():
    reg = baseline_setup()
    d = never_unload_swap_models(reg, {"c": 1, "d": 3}, 8 * GiB)
    assert (d.swap_out, d.swap_in) == ([], ["d", "c"])  # most waiting first
    assert "nothing to swap in" in never_unload_swap_models(reg, {"a": 2}, 8 * GiB).reason


def test_memwarden_on_the_same_state_keeps_the_cheap_busy_model():
    reg = baseline_setup()
    d = should_swap_models(reg, {"c": 1}, 8 * GiB)  # a (used at 500) has more demand per byte than b
    assert (d.swap_out, d.swap_in) == (["b"], ["c"])


@settings(max_examples=150, deadline=None)
@given(models=models_strategy, pending=st.lists(st.integers(0, 9), min_size=6, max_size=6),
       headroom_gib=st.integers(-4, 8), policy=st.sampled_from(sorted(SWAP_POLICIES)),
       max_loaded=st.integers(1, 4))
def test_every_policy_keeps_the_budget_and_spares_busy_models(models, pending, headroom_gib, policy, max_loaded):
    reg = build(models)
    states = {s.name: s for s in reg.states()}
    resident = {n for n, s in states.items() if s.status in ("loading", "loaded")}
    budget = max(1, sum(states[n].footprint_bytes for n in resident) // GiB + headroom_gib) * GiB
    pending = {f"m{i}": count for i, count in enumerate(pending[:len(models)])}
    options = {"max_loaded": max_loaded} if policy == "ollama" else {}
    d = SWAP_POLICIES[policy](reg, pending, budget, **options)
    assert d == SWAP_POLICIES[policy](build(models), pending, budget, **options)
    assert d.reason
    waiting = {n for n, c in pending.items() if c and states[n].status in ("unloaded", "offloaded")}
    assert set(d.swap_in) <= waiting and not set(d.swap_out) & set(d.swap_in)
    for name in d.swap_out:
        assert states[name].running == 0 and states[name].status == "loaded"
    if policy == "never":
        assert d.swap_out == [] and set(d.swap_in) == waiting
        return
    if d.swap_in:
        after = (resident - set(d.swap_out)) | set(d.swap_in)
        assert sum(device_bytes(states[n], d) for n in after) <= budget
        if policy == "ollama":
            assert len(after) <= max_loaded
