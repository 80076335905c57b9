"""memwarden serve --upstream in front of a real vLLM: the CPU build in .venv-vllm
(``scripts/setup-vllm.sh``) on the tiny llama-gqa model (2 KiB of KV a token) with a
10 MiB KV budget -- 5,120 tokens in 40 blocks of 128 -- prefix caching off, started once
for the module (30-80 s). The gateway runs in this process on loopback. Skipped without
.venv-vllm or with MEMWARDEN_SKIP_VLLM=1.

What is checked against vLLM itself: completions and streams pass through with token-id
prompts (the server has no tokenizer), a whole completion the gateway assembled from vLLM's
stream equal to vLLM's own whole answer; the gateway's budget is vLLM's own
(``vllm:cache_config_info`` and what vLLM logged); a session over its quota gets 429 while
another is served; and an overload burst behind memwarden loses nothing and causes fewer
preemptions than the same burst sent directly, by vLLM's ``vllm:num_preemptions_total``.
"""
import json
import re
import threading
from contextlib import contextmanager

import pytest

import vllm_server as V

UNAVAILABLE = V.unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))

httpx = pytest.importorskip("httpx2")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from memwarden.controller.config import MemwardenConfig  # noqa: E402
from memwarden.serve.server import Server  # noqa: E402

KV_BUDGET = 10 * 2**20
BYTES_PER_TOKEN = 4 * 2 * 2 * 64 * 2  # layers x K and V x KV heads x head size x bf16
KV_TOKENS = KV_BUDGET // BYTES_PER_TOKEN  # 5,120
SESSION_LIMIT = 1 * 2**20  # 512 tokens a session
CAPACITY_LOG = re.compile(r"KV cache size: ([\d,]+) tokens")
# 24 requests of 384 prompt + 512 output tokens, 4.2x the KV cache at once; whole blocks
# of 128 (7 a request), so the gateway's token count is vLLM's block count
BURST = 24
BURST_PROMPT, BURST_OUTPUT = 384, 512


@pytest.fixture(scope="module")
def vllm():
    with V.vllm_server(V.model_dir("llama-gqa"), KV_BUDGET, extra_args=("--no-enable-prefix-caching",)) as server:
        yield server


@contextmanager
def running_gateway(vllm, policy: str = "memwarden"):
    """memwarden serve --upstream in front of ``vllm``, in this process, under the admission
    ``policy`` (degradation off: every request is forwarded as asked)."""
    config = MemwardenConfig.load(env={}, overrides={
        "server.port": 0, "server.upstream": vllm.url, "server.upstream_model": vllm.model,
        "server.upstream_poll_interval": 0.2, "admission.policy": policy,
        "admission.queue_timeout": 120.0, "degradation.enabled": False,
        "sessions.per_session_limit": SESSION_LIMIT})
    server = Server(config)
    thread = server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop(thread)


@pytest.fixture(scope="module")
def gateway(vllm):
    with running_gateway(vllm) as url:
        yield url


def ids(count: int, offset: int = 3) -> list:
    return [offset + i % 2000 for i in range(count)]


def body(vllm, prompt: list, max_tokens: int, **extra) -> dict:
    return {"model": vllm.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.0, **extra}


def preemptions(vllm) -> int:
    return int(vllm.metric_values("vllm:num_preemptions_total")["vllm:num_preemptions_total"])


def assembled_fields(answer: dict) -> dict:
    """What a whole completion the gateway assembles from a stream has of vLLM's whole
    answer (vLLM's usage chunk has no ``*_tokens_details``, null in a whole answer)."""
    usage, choice = answer["usage"], answer["choices"][0]
    return {"object": answer["object"], "model": answer["model"],
            **{key: usage[key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")},
            **{key: choice[key] for key in ("index", "text", "logprobs", "finish_reason", "stop_reason")}}


def test_a_token_id_completion_passes_through(vllm, gateway):
    request = body(vllm, ids(20), 6)
    direct = httpx.post(vllm.url + "/v1/completions", json=request, timeout=60)
    through = httpx.post(gateway + "/v1/completions", json=request, timeout=60)
    assert direct.status_code == through.status_code == 200, through.text
    answer = through.json()
    assert assembled_fields(answer) == assembled_fields(direct.json())  # assembled from vLLM's stream
    assert answer["usage"]["prompt_tokens"] == 20 and answer["usage"]["completion_tokens"] == 6
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["memwarden"]["admission"] == "accept" and not answer["memwarden"]["degraded"]


def test_a_stream_passes_through_event_by_event(vllm, gateway):
    events = []
    with httpx.stream("POST", gateway + "/v1/completions", json=body(vllm, ids(12), 5, stream=True),
                      timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["choices"] for chunk in chunks)  # the usage chunk the gateway asked for is dropped
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_the_budget_is_vllms_own_kv_cache(vllm, gateway):
    cache = vllm.metric_labels("vllm:cache_config_info")
    stats = httpx.get(gateway + "/memory_stats", timeout=10).json()
    blocks, block_size = int(cache["num_gpu_blocks"]), int(cache["block_size"])
    assert blocks * block_size == int(cache["kv_cache_size_tokens"]) == KV_TOKENS
    assert stats["kv_budget_source"] == f"{blocks} blocks of {block_size} tokens upstream"
    assert stats["upstream"]["num_gpu_blocks"] == blocks
    logged = CAPACITY_LOG.search(vllm.log())
    assert logged and logged[1] == f"{KV_TOKENS:,}"
    assert stats["kv_budget_mb"] * 2**20 == KV_TOKENS * BYTES_PER_TOKEN == KV_BUDGET


def test_a_session_over_its_quota_gets_429_while_another_is_served(vllm, gateway):
    # session "big" streams a request; its next one, 600 prompt tokens, is over the session's
    # 512-token quota by itself -- refused whether or not vLLM has finished the stream by then
    # (it can, in a second) -- while session "small" is served beside them
    headers = {"X-Session-ID": "big"}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", gateway + "/v1/completions", headers=headers,
                           json=body(vllm, ids(200), 200, stream=True)) as held:
            assert held.status_code == 200
            lines = held.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # running upstream now
            over = client.post(gateway + "/v1/completions", headers=headers, json=body(vllm, ids(600), 200))
            other = client.post(gateway + "/v1/completions", headers={"X-Session-ID": "small"},
                                json=body(vllm, ids(200), 200))
            rest = [line for line in lines if line.startswith("data:")]
    assert over.status_code == 429, over.text
    assert over.json()["error"]["code"] == "session_limit"
    assert other.status_code == 200 and other.json()["usage"]["completion_tokens"] == 200
    assert rest[-1] == "data: [DONE]"


def burst(url: str, vllm) -> list:
    """BURST requests sent at once to ``url``: (HTTP status, output tokens, the
    ``max_tokens`` memwarden granted or None) of each."""
    results = [None] * BURST

    def send(i: int) -> None:
        try:
            response = httpx.post(url + "/v1/completions", timeout=300,
                                  json=body(vllm, ids(BURST_PROMPT, offset=3 + 50 * i), BURST_OUTPUT))
            answer = response.json()
            results[i] = (response.status_code, (answer.get("usage") or {}).get("completion_tokens"),
                          (answer.get("memwarden") or {}).get("max_tokens"))
        except httpx.HTTPError as exc:
            results[i] = (type(exc).__name__, None, None)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(BURST)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_an_overload_burst_behind_memwarden_loses_nothing_and_preempts_less(vllm):
    for _ in range(3):  # a burst vLLM happened to absorb without preempting (seen once in CI) is no baseline
        before = preemptions(vllm)
        direct = burst(vllm.url, vllm)
        middle = preemptions(vllm)
        assert direct == [(200, BURST_OUTPUT, None)] * BURST
        if middle > before:
            break
    # lookahead, the policy for vLLM: memwarden's learnt estimate, when a request outgrows
    # it with no room left, overcommits vLLM (it cannot preempt there) and vLLM may preempt
    with running_gateway(vllm, "lookahead") as gateway:
        through = burst(gateway, vllm)
    after = preemptions(vllm)
    # none lost or refused; memwarden may shrink a request to what fits (shrunk_to_fit),
    # and then vLLM makes exactly the max_tokens it was granted
    assert all(status == 200 and made == granted and 0 < granted <= BURST_OUTPUT
               for status, made, granted in through), through
    assert sum(made for _, made, _ in through) >= 0.8 * BURST * BURST_OUTPUT, through
    direct_preemptions, gateway_preemptions = middle - before, after - middle
    assert direct_preemptions > 0, "the burst did not overload vLLM"
    assert gateway_preemptions <= 0.1 * direct_preemptions, (direct_preemptions, gateway_preemptions)
