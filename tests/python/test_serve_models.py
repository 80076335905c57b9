"""Several models in one server: the multi-model server on loopback with the official openai
client (swaps happen, each model answers as it did when it never left), per-model
/memory_stats and /metrics, a busy model never moved, the CPU stand-in device (memwarden's
host pool with a limit) where never-unloading runs out of memory and memwarden's policy does
not; and hypothesis properties of the pool under every swap policy (budget kept, busy
models stay, every request served or refused with a reason)."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

from memwarden.controller import offload  # noqa: E402
from memwarden.controller.config import MemwardenConfig  # noqa: E402
from memwarden.controller.models import SWAP_POLICIES  # noqa: E402
from memwarden.serve.engine import load_engine  # noqa: E402
from memwarden.serve.pool import EMBEDDED_MODELS, ModelPool, ModelUnavailable  # noqa: E402
from memwarden.serve.server import Server  # noqa: E402

TINY, SMALL, BASE = EMBEDDED_MODELS  # 0.41, 4.57 and 12.02 MiB of float32 weights
MiB = 2**20
# tiny fits beside either other model; small and base do not fit together
BUDGET = "13MiB"


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides):
    return MemwardenConfig.load(env={}, overrides={"server.port": 0, "server.models": list(EMBEDDED_MODELS),
                                                    "server.max_memory": BUDGET, "server.min_residency": 0.0,
                                                    # demand fades in a fifth of a second: a quiet model
                                                    # gives way to a waiting one within the test's patience
                                                    "server.demand_half_life": 0.2, **overrides})


def start(**overrides):
    server = Server(config(**overrides))
    return server, server.start()


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


PROMPT = "swap me"


@pytest.fixture(scope="module")
def never_left():
    """Each model's greedy answer from a pool that holds them all, so none ever leaves."""
    pool = ModelPool.from_config(config(**{"server.max_memory": None}))
    answers = {}
    for name in pool.names:
        hold = pool.hold(name)
        try:
            engine = hold.engine
            answers[name] = engine.tokenizer.decode([s.token for s in engine.generate(
                engine.encode_prompt(PROMPT), 12, 0.0) if s.token is not None])
        finally:
            hold.release()
    return answers


@pytest.fixture(scope="module")
def served():
    server, thread = start()
    yield server, f"http://127.0.0.1:{server.port}"
    server.stop(thread)


def test_tiny_is_the_single_model_servers_model(never_left):
    engine = load_engine(None)
    want = engine.tokenizer.decode([s.token for s in engine.generate(engine.encode_prompt(PROMPT), 12, 0.0)
                                    if s.token is not None])
    assert never_left[TINY] == want


def test_models_listed_and_swapped_with_answers_as_if_never_left(served, never_left):
    server, base = served
    c = client(base)
    assert [m.id for m in c.models.list().data] == [TINY, SMALL, BASE]
    for name in [SMALL, BASE, SMALL, TINY, BASE]:
        r = c.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
        assert r.model == name and r.choices[0].text == never_left[name]
    stats = json.loads(get(base + "/memory_stats"))
    models = stats["models"]
    assert stats["swap_policy"] == "memwarden" and stats["out_of_memory"] == 0
    assert models[SMALL]["swaps_in"] == 2 and models[SMALL]["swaps_out"] >= 1
    # base came back the second time beside small (busier per byte, so not evicted), with
    # the layers that did not fit left in host memory: 12.02 MiB of 8 layers beside 4.98
    assert models[BASE]["state"] == models[SMALL]["state"] == "loaded"
    layer = server.pool.registry.state(BASE).spec.layer_bytes
    assert models[BASE]["host_layers"] >= 1
    assert models[BASE]["offloaded_bytes"] == models[BASE]["host_layers"] * layer
    model = server.pool.engine(BASE).model
    whole = sum({id(t): t.nbytes for t in [*model.parameters(), *model.buffers()]}.values())
    # on the device: all but the host layers, and room for the one streamed in to run
    assert models[BASE]["footprint_bytes"] == whole - (models[BASE]["host_layers"] - 1) * layer
    assert stats["weights_loaded_bytes"] <= stats["weights_budget_bytes"] == 13 * MiB
    assert {models[n]["requests"] for n in (SMALL, BASE)} == {2}
    text = get(base + "/metrics")
    assert re.search(rf'memwarden:model_state\{{model="{SMALL}"\}} 2\.0', text)
    assert re.search(rf'memwarden:model_state\{{model="{BASE}"\}} 2\.0', text)
    assert re.search(rf'memwarden:model_swaps_total\{{direction="out",model="{SMALL}"\}} [1-9]', text)
    assert re.search(rf'memwarden:offloaded_bytes\{{model="{BASE}"\}} [1-9]', text)


def test_default_and_unknown_model(served, never_left):
    _, base = served
    status, payload = post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert status == 200 and payload["model"] == TINY and payload["choices"][0]["text"] == never_left[TINY]
    status, payload = post(base + "/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert status == 404 and payload["error"]["code"] == "model_not_found" and SMALL in payload["error"]["message"]


def test_a_busy_model_is_never_moved():
    server, thread = start(**{"server.load_timeout": 0.3})
    try:
        base = f"http://127.0.0.1:{server.port}"
        hold = server.pool.hold(SMALL)  # a request generating on small
        try:
            status, payload = post(base + "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 2})
            assert status == 503 and payload["error"]["code"] == "model_load_timeout"
            assert "running request" in payload["error"]["message"]
            assert server.pool.registry.state(SMALL).status == "loaded"
        finally:
            hold.release()
        status, _ = post(base + "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 2})
        assert status == 200
    finally:
        server.stop(thread)


def test_a_loaded_model_answers_while_another_model_is_built(never_left):
    """A build runs without the pool's lock: tiny (loaded) answers while small's weights are
    being made, and small answers once they are."""
    pool = ModelPool.from_config(config())
    building, finish = threading.Event(), threading.Event()
    books = pool._models[SMALL]
    build = books.build

    def slow_build():
        building.set()
        assert finish.wait(30), "the test never let the build finish"
        return build()

    books.build = slow_build
    answers = {}
    loader = threading.Thread(target=lambda: answers.setdefault(SMALL, answer(pool, SMALL)))
    try:
        loader.start()
        assert building.wait(30)
        assert pool.registry.state(SMALL).status == "loading"
        assert answer(pool, TINY) == never_left[TINY]  # would wait for the build under the lock
        finish.set()
        loader.join(30)
        assert answers[SMALL] == never_left[SMALL] and pool.registry.state(SMALL).status == "loaded"
    finally:
        finish.set()
        loader.join(30)
        pool.close()


def test_a_request_that_waited_its_models_load_time_outweighs_any_demand():
    """Ski rental: once the oldest waiting request of a model has waited as long as that
    model takes to load (its last load; before any, its bytes at the pool's measured
    seconds per byte), the model outranks every idle one, however busy per byte."""
    pool = ModelPool.from_config(config(**{"server.demand_half_life": 600.0}))
    try:
        for _ in range(10):
            answer(pool, SMALL)  # small: ten requests' demand that barely fades
        now = time.monotonic()
        tiny, small = pool._models[TINY], pool._models[SMALL]
        per_byte = (tiny.load_seconds + small.load_seconds) / (
            pool.registry.state(TINY).weights_footprint_bytes + pool.registry.state(SMALL).weights_footprint_bytes)
        assert pool._models[BASE].load_seconds is None
        assert pool._expected_load_seconds(BASE) == pytest.approx(
            per_byte * pool.registry.state(BASE).weights_footprint_bytes)
        pool._models[BASE].load_seconds = 0.25
        pool._waiting[BASE] = [now - 0.2, now]  # the oldest has waited 0.2 s of base's 0.25
        assert pool._overdue_at(BASE) == pytest.approx(now + 0.05)
        assert pool._pending() == {BASE: 2}
        assert should_swap(pool, {BASE: 2}).swap_in == []  # small is busier per byte
        pool._waiting[BASE] = [now - 0.3, now]
        pending = pool._pending()
        assert pending[BASE] > 2**59
        assert should_swap(pool, pending).swap_out == [SMALL]
    finally:
        pool._waiting[BASE] = []
        pool.close()


def should_swap(pool, pending):
    return SWAP_POLICIES["memwarden"](pool.registry, pending, pool.weights_budget)


@pytest.mark.parametrize("policy, served_base", [("never", False), ("memwarden", True)])
def test_stand_in_device_out_of_memory_only_without_unloading(policy, served_base):
    # memwarden's host pool limited to 15.5 MiB is the device: tiny and small (5 MiB) fit,
    # all three (17 MiB) do not
    server, thread = start(**{"server.swap_policy": policy, "server.device_limit": "15.5MiB"})
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert post(base + "/v1/completions", {"model": SMALL, "prompt": "x", "max_tokens": 2})[0] == 200
        status, payload = post(base + "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 2})
        stats = server.pool.stats()
        if served_base:
            assert (status, stats["out_of_memory"], stats["models"][SMALL]["state"]) == (200, 0, "offloaded"), payload
        else:
            assert status == 503 and payload["error"]["code"] == "out_of_memory"
            assert stats["out_of_memory"] == 1 and stats["models"][BASE]["state"] == "unloaded"
            # the pool still serves what it holds
            assert post(base + "/v1/completions", {"model": SMALL, "prompt": "x", "max_tokens": 2})[0] == 200
    finally:
        server.stop(thread)


def answer(pool, name):
    hold = pool.hold(name)
    try:
        engine = hold.engine
        return engine.tokenizer.decode([s.token for s in engine.generate(engine.encode_prompt(PROMPT), 12, 0.0)
                                        if s.token is not None])
    finally:
        hold.release()


def assert_bits_as_before(model, before):
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        original, clone = before[name]
        assert tensor is original or not isinstance(original, torch.nn.Parameter), name
        assert torch.equal(tensor.detach().reshape(-1).view(torch.uint8), clone.reshape(-1).view(torch.uint8)), name


def test_parked_weights_come_back_bit_identical_and_tied_even_after_a_failed_load(monkeypatch):
    pool = ModelPool.from_config(config(**{"server.models": [SMALL, BASE], "server.swap_policy": "lru"}))
    try:
        model = pool.engine(SMALL).model
        model.lm_head.weight = model.model.embed_tokens.weight  # tie them: one tensor to park
        before = {name: (t, t.detach().clone()) for name, t in [*model.named_parameters(), *model.named_buffers()]}
        tied_answer = answer(pool, SMALL)
        assert answer(pool, BASE)  # small does not fit beside base: it is parked
        stats = pool.stats()["models"][SMALL]
        assert stats["state"] == "offloaded"
        assert stats["offloaded_bytes"] == sum(t.nbytes for t, _ in before.values())  # the tied tensor once
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert_bits_as_before(model, before)

        with monkeypatch.context() as patch:  # the device is out of memory for small's one copy back
            patch.setattr(offload, "_device_buffer",
                          lambda *a, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("no room")))
            with pytest.raises(ModelUnavailable) as refused:
                pool.hold(SMALL)
        assert refused.value.reason == "out_of_memory"
        assert_bits_as_before(model, before)  # still parked, whole

        assert answer(pool, SMALL) == tied_answer
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert_bits_as_before(model, before)
    finally:
        pool.close()


def test_a_model_that_does_not_fit_beside_a_busier_one_runs_with_layers_in_host_memory(never_left):
    """Base (12 MiB, 8 layers) comes back beside small (busier per byte) with the layers that
    do not fit left in host memory, answers as if it never left, and brings them back once
    it is the busier model and small, idle, gives way."""
    # demand that barely fades while the test runs, however slowly the machine answers
    pool = ModelPool.from_config(config(**{"server.demand_half_life": 600.0}))
    try:
        for name in (SMALL, BASE, SMALL, SMALL):  # base is built, then parked for small
            assert answer(pool, name) == never_left[name]
        assert pool.registry.state(BASE).status == "offloaded"
        assert answer(pool, BASE) == never_left[BASE]
        base, small = pool.registry.state(BASE), pool.registry.state(SMALL)
        assert small.status == "loaded" and base.status == "loaded" and base.host_layers >= 1
        free = 13 * MiB - small.footprint_bytes - pool.registry.state(TINY).footprint_bytes
        whole, layer = base.weights_footprint_bytes, base.spec.layer_bytes
        # the fewest layers that leave the rest, and the one streamed in, within what was free
        assert base.host_layers == next(k for k in range(1, 9) if whole - (k - 1) * layer <= free)
        assert pool.stats()["models"][BASE]["offloaded_bytes"] == base.host_layers * layer
        for _ in range(12):  # base's demand per byte overtakes small's, whose requests have stopped
            assert answer(pool, BASE) == never_left[BASE]
            if pool.registry.state(BASE).host_layers == 0:
                break
        base = pool.registry.state(BASE)
        assert base.host_layers == 0 and base.footprint_bytes == whole
        assert pool.registry.state(SMALL).status == "offloaded"
        assert pool.stats()["models"][BASE]["offloaded_bytes"] == 0
        assert pool.stats()["weights_loaded_bytes"] <= 13 * MiB
        assert answer(pool, BASE) == never_left[BASE] and answer(pool, SMALL) == never_left[SMALL]
    finally:
        pool.close()


@pytest.fixture(scope="module")
def pools():
    """One pool per policy, reused across examples: the properties hold from any state."""
    made = {}
    for policy in sorted(SWAP_POLICIES):
        options = {"max_loaded": 2} if policy == "ollama" else {}
        made[policy] = ModelPool.from_config(config(**{"server.swap_policy": policy}), load_timeout=0.05,
                                             policy_options=options)
    return made


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.sampled_from(sorted(SWAP_POLICIES)),
       requests=st.lists(st.tuples(st.sampled_from([TINY, SMALL, BASE]), st.booleans()), min_size=1, max_size=8))
def test_pool_properties_under_every_policy(pools, policy, requests):
    pool = pools[policy]
    open_holds = []
    try:
        for name, keep in requests:
            before = {s.name: s for s in pool.registry.states()}
            try:
                hold = pool.hold(name)
            except ModelUnavailable as refused:
                assert refused.reason in ("model_load_timeout", "out_of_memory") and refused.message
            else:
                assert pool.registry.state(name).status == "loaded"
                (open_holds.append(hold) if keep else hold.release())
            for state in pool.registry.states():
                if before[state.name].running:  # a model with a running request stayed
                    assert state.status == "loaded"
            if policy != "never":
                assert pool.stats()["weights_loaded_bytes"] <= pool.weights_budget
            if len(open_holds) > 1:
                open_holds.pop(0).release()
    finally:
        for hold in open_holds:
            hold.release()
    assert all(s.running == 0 for s in pool.registry.states())


def test_concurrent_requests_across_models(served, never_left):
    _, base = served
    c = client(base)
    names = [SMALL, BASE, TINY] * 2
    answers = [None] * len(names)

    def ask(i):
        answers[i] = c.completions.create(model=names[i], prompt=PROMPT, max_tokens=12, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.choices[0].text for a in answers] == [never_left[n] for n in names]
