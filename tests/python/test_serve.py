"""memwarden serve on loopback: the official openai client and raw HTTP against the real
server (embedded tiny model), the controller's refusals (429/503 with Retry-After), input
validation (400 naming the field, never a 500), /memory_stats and /metrics, and the CLI
(`memwarden serve --max-requests`, which stops by itself)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from memwarden.controller.config import MemwardenConfig  # noqa: E402
from memwarden.controller.traffic import Rejected, TrafficController  # noqa: E402
from memwarden.serve.server import Server  # noqa: E402


def start(**overrides):
    config = MemwardenConfig.load(env={}, overrides={"server.port": 0, **overrides})
    server = Server(config)
    return server, server.start()


@pytest.fixture(scope="module")
def served():
    server, thread = start(**{"server.max_memory": "4MiB"})
    yield server, f"http://127.0.0.1:{server.port}"
    server.stop(thread)


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(url, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def greedy_reference(server, prompt_ids, new, suppress_eos=False):
    """transformers' own greedy generate with DynamicCache and SDPA on the same model
    (``suppress_eos``: the end-of-sequence token never chosen)."""
    model = server.engine.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), past_key_values=DynamicCache(config=model.config),
                                 max_new_tokens=new, do_sample=False, pad_token_id=server.engine.tokenizer.pad_token_id,
                                 suppress_tokens=[server.engine.eos] if suppress_eos else None)
    finally:
        model.set_attn_implementation(previous)
    ids = out[0, len(prompt_ids):].tolist()
    eos = server.engine.eos
    return ids[: ids.index(eos)] if eos in ids else ids


def test_models_and_health(served):
    server, base = served
    assert [m.id for m in client(base).models.list().data] == [server.engine.name]
    assert json.loads(get(base + "/healthz"))["status"] == "ok"


def test_an_idle_connection_outlives_the_clients_keep_alive(served):
    """httpx (the openai client) reuses an idle connection for 5 s: the server must keep it
    open longer, or a request sent as the server closes it is lost unanswered."""
    import http.client

    server, _ = served
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for pause in (0.0, 6.0):
            time.sleep(pause)
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["status"] == "ok"
    finally:
        connection.close()


def test_completion_matches_transformers_greedy(served):
    server, base = served
    r = client(base).completions.create(model=server.engine.name, prompt="memory", max_tokens=12, temperature=0)
    prompt = server.engine.encode_prompt("memory")
    want = server.engine.tokenizer.decode(greedy_reference(server, prompt, 12))
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens <= 12
    assert r.model_extra["memwarden"]["admission"] in ("accept", "shrink")


def test_chat_stream_equals_the_whole_response(served):
    server, base = served
    c = client(base)
    messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi there"}]
    whole = c.chat.completions.create(model=server.engine.name, messages=messages, max_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model=server.engine.name, messages=messages, max_tokens=10,
                                            temperature=0, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sessions_are_tracked_and_released(served):
    server, base = served
    c = client(base)
    for _ in range(2):
        c.completions.create(model=server.engine.name, prompt="abc", max_tokens=3,
                             extra_headers={"X-Session-ID": "tenant-7"})
    stats = json.loads(get(base + "/memory_stats"))
    detail = stats["session_details"]["tenant-7"]
    assert detail["requests"] == 2 and detail["in_flight"] == 0
    assert detail["kv_bytes"] == 0  # a finished request gives its KV back
    for key in ("active_sessions", "total_kv_mb", "gpu_usage", "gpu_free_mb", "session_details", "gpu_memory",
                "rejected_count", "routed_count", "degraded_count"):
        assert key in stats
    assert stats["num_requests_running"] == 0 and stats["kv_reserved_mb"] == 0


@pytest.mark.parametrize("body,field", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logit_bias": {"eos": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"3": 101}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
])
def test_bad_input_is_400_naming_the_field(served, body, field):
    _, base = served
    status, _, payload = post(base + "/v1/completions", body)
    assert status == 400
    assert payload["error"]["param"] == field and field in payload["error"]["message"]


def test_malformed_json_and_unknown_model(served):
    _, base = served
    status, _, payload = post(base + "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in payload["error"]["message"]
    status, _, payload = post(base + "/v1/chat/completions",
                              {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and payload["error"]["code"] == "model_not_found"
    status, _, payload = post(base + "/v1/completions", {"prompt": "y" * 5000})
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"


def test_metrics_use_engine_style_names(served):
    _, base = served
    text = get(base + "/metrics")
    for name in ("memwarden:kv_cache_usage_perc", "memwarden:num_requests_running", "memwarden:num_requests_waiting",
                 "memwarden:admission_decisions_total", "memwarden:memory_pressure_level",
                 "memwarden:sessions_active", "memwarden:session_evictions_total", "memwarden:preemptions_total",
                 "memwarden:degradations_total"):
        assert name in text
    assert re.search(r'memwarden:admission_decisions_total\{decision="accept",reason="[a-z_]+"\} [1-9]', text)


def test_refusals_429_and_503_with_retry_after():
    # 512 B a token: a 16 KiB session limit holds 32 tokens, the 64 KiB pool 128.
    server, thread = start(**{"server.max_memory": "64KiB", "sessions.per_session_limit": "16KiB",
                              "admission.policy": "reserve"})
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, headers, payload = post(base + "/v1/completions", {"prompt": "a" * 20, "max_tokens": 20},
                                        {"X-Session-ID": "s1"})
        assert status == 429 and payload["error"]["code"] == "session_limit"
        assert int(headers["retry-after"]) >= 1
        status, _, payload = post(base + "/v1/completions", {"prompt": "b" * 200, "max_tokens": 4})
        assert status == 503 and payload["error"]["code"] == "prompt_too_long"
        stats = json.loads(get(base + "/memory_stats"))
        assert stats["rejected_count"] == 2
        assert stats["rejections_by_reason"] == {"session_limit": 1, "prompt_too_long": 1}
        assert 'reason="session_limit"' in get(base + "/metrics")
    finally:
        server.stop(thread)


def test_degradation_under_pressure_shrinks_max_tokens(caplog):
    # Hand-computed: 100 B a token, budget 10000 B; a running request holding 25 prompt + 50
    # generated tokens puts the pool at 0.75 (level "medium", max_tokens x 0.9): 20 -> 18 tokens.
    config = MemwardenConfig.load(env={}, overrides={"admission.policy": "reserve"})
    controller = TrafficController(config, 10_000, 100)
    caplog.set_level("INFO", logger="memwarden.controller")
    first = controller.acquire(None, 25, 50)
    assert first.max_tokens == 50 and not first.applied.degraded
    assert controller.pressure() == 0.25  # what it holds, not the 75 tokens it reserved
    assert controller.progress(first, 50) == "continue"
    second = controller.acquire(None, 5, 20)
    assert second.applied.level == "medium" and second.applied.degraded and second.max_tokens == 18
    controller.release(first)
    controller.release(second)
    assert controller.memory_stats()["degraded_count"] == 1 and controller.admission.reserved_bytes == 0
    with pytest.raises(Rejected) as e:
        controller.acquire(None, 200, 1)  # 201 tokens > the 100-token pool
    assert e.value.status == 503 and e.value.reason == "prompt_too_long"
    # structured logs: one JSON object per decision and level change
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "memwarden.controller"]
    assert [(e["event"], e.get("decision"), e.get("new")) for e in events] == [
        ("admission", "accept", None), ("pressure_level", None, "medium"), ("admission", "accept", None),
        ("pressure_level", None, "low"), ("admission", "reject", None)]
    assert events[2]["max_tokens"] == 18 and events[2]["level"] == "medium"


def test_cli_serves_and_stops_after_max_requests(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-m", "memwarden.cli", "serve", "--port", "0", "--max-requests", "1",
                             "--max-memory", "1MiB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        status, _, payload = post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 200 and payload["object"] == "text_completion"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_print_config_names_sources(tmp_path):
    path = tmp_path / "memwarden.toml"
    path.write_text("[sessions]\nidle_timeout = 60\n")
    out = subprocess.run([sys.executable, "-m", "memwarden.cli", "serve", "--print-config", "--config", str(path),
                          "--policy", "reserve"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert out.returncode == 0
    assert re.search(r"sessions\.idle_timeout\s+60(\.0)?\s+file", out.stdout)
    assert re.search(r"admission\.policy\s+reserve\s+override", out.stdout)


def test_concurrent_requests_each_get_their_own_greedy_answer(served):
    server, base = served
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"prompt number {i}" for i in range(6)]
    c = client(base)

    def ask(prompt):
        return c.completions.create(model=server.engine.name, prompt=prompt, max_tokens=8, temperature=0)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, answer in zip(prompts, answers):
        want = server.engine.tokenizer.decode(greedy_reference(server, server.engine.encode_prompt(prompt), 8))
        assert answer.choices[0].text == want
    stats = json.loads(get(base + "/memory_stats"))
    assert stats["num_requests_running"] == 0 and stats["kv_reserved_mb"] == 0


def test_requests_that_do_not_fit_together_wait_their_turn():
    # reserve: 20 prompt + 16 output tokens at 512 B = 18 KiB each; a 30 KiB pool holds one
    # at a time, so of three sent at once two queue, and all three complete.
    from concurrent.futures import ThreadPoolExecutor

    server, thread = start(**{"server.max_memory": "30KiB", "admission.policy": "reserve"})
    try:
        base = f"http://127.0.0.1:{server.port}"
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda i: post(base + "/v1/completions",
                                                   {"prompt": f"{i:019d}", "max_tokens": 16}), range(3)))
        assert [status for status, _, _ in results] == [200, 200, 200]
        counts = server.controller.admission.decision_counts()
        assert sum(n for (verdict, _), n in counts.items() if verdict == "queue") >= 1
        assert server.controller.admission.reserved_bytes == 0
    finally:
        server.stop(thread)


def test_preempted_requests_recompute_and_answer_as_if_never_preempted():
    # optimistic, 512 B a token: a 64 KiB pool holds 128 tokens; two 31-token prompts that
    # each grow by 60 tokens outgrow it together, so the newer is preempted, recomputed
    # when the older finishes, and both answers equal transformers' greedy generate.
    from concurrent.futures import ThreadPoolExecutor

    server, thread = start(**{"server.max_memory": "64KiB", "admission.policy": "optimistic"})
    try:
        base = f"http://127.0.0.1:{server.port}"
        c = client(base)
        prompts = [f"{i:030d}" for i in range(2)]
        eos = str(server.engine.eos)

        def ask(prompt):
            return c.completions.create(model=server.engine.name, prompt=prompt, max_tokens=60, temperature=0,
                                        logit_bias={eos: -100})

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(ask, prompts))
        for prompt, answer in zip(prompts, answers):
            ids = greedy_reference(server, server.engine.encode_prompt(prompt), 60, suppress_eos=True)
            assert answer.choices[0].text == server.engine.tokenizer.decode(ids)
            assert answer.usage.completion_tokens == 60 and answer.choices[0].finish_reason == "length"
        stats = json.loads(get(base + "/memory_stats"))
        assert stats["preempted_count"] >= 1 and stats["cut_short_count"] == 0
        assert stats["kv_reserved_mb"] == 0
        assert re.search(r"^memwarden:preemptions_total [1-9]", get(base + "/metrics"), re.M)
    finally:
        server.stop(thread)


def test_logit_bias_steers_the_tokens(served):
    server, base = served
    r = client(base).completions.create(model=server.engine.name, prompt="z", max_tokens=5, temperature=0,
                                        logit_bias={str(ord("q")): 100})
    assert r.choices[0].text == "qqqqq"


def test_long_prompts_are_routed_to_the_other_pool():
    # admission.route_above_tokens=20: a 31-token prompt goes to the upstream pool (a fake
    # vLLM answering " w0 w1 ..."), a 6-token one is generated here
    from fake_vllm import FakeVLLM

    upstream = FakeVLLM().start()
    server, thread = start(**{"admission.route_above_tokens": 20, "admission.upstream_url": upstream.url})
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, headers, payload = post(base + "/v1/completions", {"prompt": "x" * 30, "max_tokens": 3})
        assert status == 200 and headers["x-memwarden-routed"] == upstream.url
        assert payload["choices"][0]["text"] == " w0 w1 w2"
        assert "model" not in upstream.received[-1] and upstream.received[-1]["prompt"] == "x" * 30
        chunks = list(client(base).completions.create(model=server.engine.name, prompt="y" * 30, max_tokens=2,
                                                      stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == " w0 w1"
        local = client(base).completions.create(model=server.engine.name, prompt="short", max_tokens=2)
        assert local.model == server.engine.name and len(upstream.received) == 2
        stats = json.loads(get(base + "/memory_stats"))
        assert stats["routed_count"] == 2 and stats["rejected_count"] == 0 and stats["kv_reserved_mb"] == 0
        assert 'memwarden:admission_decisions_total{decision="route",reason="too_large_routed"} 2.0' in get(
            base + "/metrics")
        upstream.mode = "overloaded"
        status, headers, payload = post(base + "/v1/completions", {"prompt": "z" * 30, "max_tokens": 3})
        assert status == 503 and payload["error"]["code"] == "upstream_overloaded" and headers["retry-after"] == "7"
    finally:
        server.stop(thread)
        upstream.stop()


def test_routing_needs_a_pool_and_the_memwarden_policy():
    from memwarden.controller.config import ConfigError

    with pytest.raises(ConfigError, match="admission.route_above_tokens.*admission.upstream_url"):
        MemwardenConfig.load(env={}, overrides={"admission.route_above_tokens": 20})
    with pytest.raises(ConfigError, match="admission.policy"):
        MemwardenConfig.load(env={}, overrides={"admission.route_above_tokens": 20, "admission.policy": "reserve",
                                                "admission.upstream_url": "http://127.0.0.1:9"})


def test_pressure_shrinks_the_batch_and_relief_restores_it():
    # at "high" (0.80) the batch factor is 0.75: 4 requests generating at once become 3
    server, thread = start(**{"server.max_concurrency": 4})
    try:
        degradation, engine = server.controller.degradation, server.engine
        assert engine.concurrency == 4
        degradation.update(0.82)
        assert degradation.level.label == "high" and engine.concurrency == 3
        degradation.update(0.0)
        assert engine.concurrency == 4
    finally:
        server.stop(thread)


def test_a_lowered_limit_admits_no_one_until_the_running_finish():
    import threading

    from memwarden.serve.engine import _Limit

    limit, entered = _Limit(2), []
    limit.__enter__()
    limit.__enter__()
    limit.set(1)
    limit.__exit__()  # one left running: still at the new limit
    waiter = threading.Thread(target=lambda: (limit.__enter__(), entered.append(1)))
    waiter.start()
    waiter.join(0.2)
    assert entered == []
    limit.__exit__()
    waiter.join(5)
    assert entered == [1]
