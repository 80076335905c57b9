"""memwarden.plan: invariants (hypothesis), a baseline, errors and the device_map."""
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memwarden import _C
from memwarden import models as M
from memwarden import plan as P


# --- a random model: embed, layers (dense item + experts), head ----------------------
@st.composite
def problems(draw):
    layers = draw(st.integers(1, 12))
    experts = draw(st.integers(0, 8))
    size = st.integers(0, 1000)
    items = [(draw(size), -1, False)]
    for l in range(layers):
        items.append((draw(st.integers(1, 1000)), l, False))
        esz = draw(st.integers(1, 500))
        same = draw(st.booleans())
        for _ in range(experts):
            items.append((esz if same else draw(st.integers(1, 500)), l, True))
    items.append((draw(size), layers, False))
    total = sum(b for b, _, _ in items)
    ndev = draw(st.integers(1, 6))
    equal = draw(st.booleans())
    slack = draw(st.floats(0.7, 2.0))
    if equal:
        caps = [int(total * slack / ndev) + 1] * ndev
    else:
        caps = [int(total * slack * draw(st.floats(0.05, 1.0)) / ndev * 2) + 1 for _ in range(ndev)]
    return items, caps


def run(items, caps, fn=_C.plan.plan, spill=None):
    return fn([b for b, _, _ in items], [l for _, l, _ in items], [f for _, _, f in items], caps,
              spill or [False] * len(caps))


def greedy_baseline(items, target):
    """Independent reference: whole layers (dense items + their experts) walk to the
    device whose cumulative target they reach (cut where the unit's midpoint crosses)."""
    units = {}
    for i, (b, l, _) in enumerate(items):
        units.setdefault(l, []).append(i)
    order = sorted(units)
    pipe = [d for d, t in enumerate(target) if t > 0] or [0]
    assign = [None] * len(items)
    p, cum, cum_t = 0, 0, target[pipe[0]]
    for l in order:
        b = sum(items[i][0] for i in units[l])
        while p + 1 < len(pipe) and cum + 0.5 * b > cum_t:
            p += 1
            cum_t += target[pipe[p]]
        for i in units[l]:
            assign[i] = pipe[p]
        cum += b
    load = [0] * len(target)
    for i, d in enumerate(assign):
        load[d] += items[i][0]
    return assign, load


def spread(load, target):
    dev = [x - t for x, t in zip(load, target)]
    return max(dev) - min(dev)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_planner_invariants(problem):
    items, caps = problem
    r = run(items, caps)
    total = sum(b for b, _, _ in items)
    again = run(items, caps)
    assert {k: v for k, v in r.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
    if total > sum(caps):
        assert not r["feasible"]
        assert r["shortfall"] == total - sum(caps)
        assert "short by" in r["message"]
        return
    assign = r["device"]
    assert len(assign) == len(items)  # every item placed exactly once
    assert all(0 <= d < len(caps) for d in assign)
    load = [0] * len(caps)
    for (b, _, _), d in zip(items, assign):
        load[d] += b
    assert load == r["load"]
    dense = [d for (_, _, f), d in zip(items, assign) if not f]
    assert dense == sorted(dense)  # pipeline order
    assert sum(r["target"]) == pytest.approx(total)
    ref_assign, ref_load = greedy_baseline(items, r["target"])
    ref_feasible = all(x <= c for x, c in zip(ref_load, caps))
    if r["feasible"]:
        assert all(x <= c for x, c in zip(load, caps))  # no device over budget
        if ref_feasible:
            assert r["spread"] <= spread(ref_load, r["target"]) + 1e-6
            if len(set(caps)) == 1:
                mean = sum(load) / len(load)
                ref_imb = (max(ref_load) - min(ref_load)) / mean if mean else 0
                assert r["imbalance"] <= ref_imb + 1e-9
    else:
        assert r["shortfall"] > 0
        assert not ref_feasible  # the baseline did not find a fit either


def test_baseline_matches_the_core_baseline():
    items = [(5, -1, False)] + [(7, l, False) for l in range(9)] + [(3, 9, False)]
    caps = [30, 30, 30]
    core = run(items, caps, _C.plan.layer_greedy)
    assign, load = greedy_baseline(items, core["target"])
    assert core["device"] == assign and core["load"] == load


GIB = 2**30


@pytest.mark.parametrize("name,ndev,mem", [("mixtral-8x7b", 2, 48), ("mixtral-8x7b", 4, 24),
                                           ("qwen3-30b-a3b", 4, 16), ("deepseek-v3", 8, 180)])
def test_moe_models_balance_within_half_a_percent(name, ndev, mem):
    p = P.plan(name, {i: f"{mem}GiB" for i in range(ndev)})
    assert p.feasible and p.imbalance <= 0.005
    placed = p.placement()
    assert len(placed) == len(p.parts)  # each part exactly once
    assert p.assignment[0] == 0 and p.assignment[-1] == ndev - 1
    layer_dev = [p.layer_devices[i] for i in range(p.num_layers)]
    assert layer_dev == sorted(layer_dev)
    assert all(p.load[d] <= p.capacity[d] for d in p.devices)


def test_deepseek_v3_on_8_devices_is_fast():
    desc = M.describe("deepseek-v3")
    t = time.perf_counter()
    p = P.plan(desc, {i: "180GiB" for i in range(8)})
    wall = time.perf_counter() - t
    assert p.seconds < 0.5 and wall < 1.0, (p.seconds, wall)


def test_unequal_devices_and_reserve():
    p = P.plan("qwen3-30b-a3b", {0: "24GiB", 1: "16GiB", 2: "16GiB"}, "int4", reserve={0: "20GiB"})
    assert p.capacity[0] == 4 * GIB
    assert p.load[0] <= 4 * GIB
    assert abs(p.load[1] - p.load[2]) / p.load[1] < 0.005  # the two uncapped devices share the rest


def test_spill_to_cpu_keeps_the_head_on_a_gpu():
    p = P.plan("mixtral-8x7b", {0: "24GiB", 1: "24GiB", "cpu": "64GiB"})
    assert p.load["cpu"] > 0
    assert p.placement()["head"] == 1
    assert all(d != "cpu" for d in p.layer_devices.values())


def test_infeasible_is_reported_with_the_shortfall():
    with pytest.raises(P.InfeasiblePlanError, match="short by") as e:
        P.plan("llama-3.1-70b", {0: "16GiB", 1: "16GiB"})
    need = M.describe("llama-3.1-70b").bytes
    assert e.value.shortfall == need - 32 * GIB
    p = P.plan("llama-3.1-70b", {0: "16GiB"}, raise_on_infeasible=False)
    assert not p.feasible and "DOES NOT FIT" in p.report()


@pytest.mark.parametrize("max_memory,reserve,match", [
    ({0: 0}, None, r"max_memory\[0\] must be > 0"),
    ({0: -5}, None, r"max_memory\[0\] must be > 0"),
    ({0: "-1GiB"}, None, "max_memory"),
    ({}, None, "non-empty"),
    ({"gpu7": "1GiB"}, None, "max_memory key must be a GPU index"),
    ({0: "16GiB"}, "20GiB", "reserve for device 0"),
    ({0: "16GiB"}, {1: "1GiB"}, "not in max_memory"),
])
def test_argument_errors(max_memory, reserve, match):
    with pytest.raises(ValueError, match=match):
        P.plan("llama-3.1-8b", max_memory, reserve=reserve)


def test_bad_balance_and_unknown_model():
    with pytest.raises(ValueError, match="balance"):
        P.plan("llama-3.1-8b", {0: "80GiB"}, balance="nope")
    with pytest.raises(ValueError, match="Embedded models"):
        P.plan("llama-9", {0: "80GiB"})


def test_report_and_json():
    p = P.plan("mixtral-8x7b", {0: "48GiB", 1: "48GiB"}, reserve="2GiB")
    text = p.report()
    assert "imbalance" in text and "0-15" in text
    d = p.to_dict()
    assert [x["device"] for x in d["devices"]] == [0, 1]
    assert sum(x["weights"] for x in d["devices"]) == M.describe("mixtral-8x7b").bytes


def _tiny_moe_config():
    return {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
            "num_experts_per_tok": 2, "vocab_size": 64, "max_position_embeddings": 128}


def test_device_map_is_accepted_by_accelerate():
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    import torch
    cfg = _tiny_moe_config()
    total = M.describe(cfg).bytes
    p = P.plan(cfg, {0: total // 2 + 4096, 1: total // 2 + 4096})
    dm = p.to_device_map()
    conf = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(conf)
    accelerate.utils.check_device_map(model, dm)  # raises when a parameter is not covered
    assert set(dm.values()) == {0, 1}
    assert dm["model.embed_tokens"] == 0 and dm["lm_head"] == 1
