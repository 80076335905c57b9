"""memwarden serve --upstream: the gateway in front of a fake vLLM on loopback
(tests/python/fake_vllm.py), driven with the official openai client and raw HTTP --
pass-through of whole and streamed answers (a whole one assembled from the upstream's
stream, counted as it is generated), prompt and output accounting, the
controller's refusals (429 per session, 503 for a full pool), upstream failures mapped to
502/503/504, /healthz with the upstream down, /memory_stats and /metrics from the
upstream's metrics, and the configuration keys."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx2")
pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

sys.path.insert(0, os.path.dirname(__file__))
from fake_vllm import MODEL, FakeVLLM  # noqa: E402

from memwarden.controller.config import ConfigError, MemwardenConfig  # noqa: E402
from memwarden.serve.server import Server  # noqa: E402
from memwarden.serve.upstream import parse_metrics  # noqa: E402

# 2 layers x 2 KV heads x (16 + 16) x 2 bytes (bf16): 256 B a token
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
              "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}
BYTES_PER_TOKEN = 256


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama") / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)


def start(upstream: FakeVLLM, model_config: str, **overrides):
    config = MemwardenConfig.load(env={}, overrides={
        "server.port": 0, "server.upstream": upstream.url, "server.upstream_model": model_config,
        "server.upstream_poll_interval": 0.05, "server.upstream_timeout": 2.0,
        "server.upstream_connect_timeout": 5.0, **overrides})
    server = Server(config)
    return server, server.start()


@pytest.fixture(scope="module")
def fake():
    upstream = FakeVLLM().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gateway(fake, model_config):
    server, thread = start(fake, model_config)
    yield server, f"http://127.0.0.1:{server.port}"
    server.stop(thread)


@pytest.fixture(autouse=True)
def reset(request):
    yield
    if "fake" in request.fixturenames:
        upstream = request.getfixturevalue("fake")
        upstream.mode, upstream.delay, upstream.chunk_delay, upstream.has_tokenize = "ok", 0.0, 0.0, True
        upstream.pace = None
        upstream.kv_usage = upstream.running = upstream.waiting = upstream.preemptions = 0
        upstream.first_token_sum, upstream.first_token_count = 0.0, 0


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(url, body, headers=None):
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stats(base):
    return json.loads(get(base + "/memory_stats")[1])


def idle(server):
    return server.controller.admission.reserved_bytes == 0 and not server.controller.admission.running_ids()


# ---- metrics parsing --------------------------------------------------------------------------

def test_parse_vllm_metrics():
    fake = FakeVLLM(num_gpu_blocks=320, block_size=16)
    fake.kv_usage, fake.running, fake.waiting, fake.preemptions = 0.25, 3, 2, 5
    fake.first_token_sum, fake.first_token_count = 1.75, 7
    parsed = parse_metrics(fake.metrics_text())
    assert (parsed.first_token_seconds_sum, parsed.first_token_count) == (1.75, 7)
    assert (parsed.num_gpu_blocks, parsed.block_size, parsed.cache_dtype) == (320, 16, "auto")
    assert (parsed.kv_cache_usage_perc, parsed.num_requests_running, parsed.num_requests_waiting,
            parsed.num_preemptions_total) == (0.25, 3, 2, 5)
    assert parse_metrics("# nothing here\n").num_gpu_blocks is None
    older = fake.metrics_text().replace("kv_cache_usage_perc", "gpu_cache_usage_perc")  # vLLM < 0.10
    assert parse_metrics(older).kv_cache_usage_perc == 0.25


# ---- pass-through -----------------------------------------------------------------------------

def test_models_health_and_budget_from_the_upstream(gateway):
    server, base = gateway
    assert [m.id for m in client(base).models.list().data] == [MODEL]
    status, body = get(base + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert server.controller.bytes_per_token == BYTES_PER_TOKEN
    assert server.controller.budget_bytes == 320 * 16 * BYTES_PER_TOKEN  # the upstream's blocks, priced


def test_completion_is_the_upstreams(gateway, fake):
    server, base = gateway
    direct = client(fake.url).completions.create(model=MODEL, prompt="one two three", max_tokens=5)
    via = client(base).completions.create(model=MODEL, prompt="one two three", max_tokens=5)
    assert via.choices[0].text == direct.choices[0].text == " w0 w1 w2 w3 w4"
    assert via.usage == direct.usage
    assert via.model_extra["memwarden"]["admission"] in ("accept", "shrink")
    assert idle(server)


WHOLE = [("/v1/completions", {"prompt": "one two three", "max_tokens": 5}),
         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4})]


@pytest.mark.parametrize("path,request_body", WHOLE)
def test_a_whole_answer_assembled_from_the_stream_is_the_upstreams_whole_answer(gateway, fake, path,
                                                                                 request_body):
    server, base = gateway
    request_body = {"model": MODEL, **request_body}
    status, _, direct = post(fake.url + path, request_body)
    assert status == 200 and "stream" not in fake.received[-1]
    status, _, via = post(base + path, request_body)
    assert status == 200
    assert fake.received[-1]["stream"] is True and fake.received[-1]["stream_options"] == {"include_usage": True}
    answer = json.loads(via)
    assert answer.pop("memwarden")["admission"] in ("accept", "shrink")
    assert answer == json.loads(direct)  # text or content, finish_reason, usage, model, object, id
    assert idle(server)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stream_read_to_its_end_leaves_its_connection_for_the_next_request(gateway, fake, stream):
    _, base = gateway
    for _ in range(3):  # token ids: no /tokenize in between
        assert post(base + "/v1/completions", {"prompt": [1, 2], "max_tokens": 2, "stream": stream})[0] == 200
    assert len(set(fake.client_ports[-3:])) == 1


def test_a_whole_answer_reports_its_progress_while_it_is_generated(gateway, fake):
    server, base = gateway
    admission = server.controller.admission
    fake.pace = threading.Semaphore(0)
    got = {}
    waiting = threading.Thread(target=lambda: got.update(
        answer=post(base + "/v1/completions", {"prompt": "a b", "max_tokens": 8})))
    waiting.start()

    def generated() -> int:
        running = admission.running_ids()
        return admission.reservation(running[0])[2] if running else 0

    fake.pace.release(3)  # three words, then the fake waits
    deadline = time.monotonic() + 10
    while generated() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert generated() == 3 and waiting.is_alive()  # counted before the answer is sent
    fake.pace.release(5)
    waiting.join(10)
    status, _, body = got["answer"]
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 8
    assert idle(server)


@pytest.mark.parametrize("path,extra,assembled", [
    ("/v1/completions", {"logprobs": 1}, False),
    ("/v1/completions", {"logprobs": 0}, False),  # 0: the sampled token's logprob
    ("/v1/completions", {"echo": True}, False),
    ("/v1/completions", {"best_of": 2}, False),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, False),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, False),
    ("/v1/chat/completions", {"logprobs": False, "n": 1}, True),
])
def test_only_answers_a_stream_joins_faithfully_are_assembled(gateway, fake, path, extra, assembled):
    _, base = gateway
    request_body = {**dict(WHOLE)[path], **extra}
    status, _, via = post(base + path, request_body)
    assert status == 200
    assert fake.received[-1].get("stream", False) is assembled
    answer = json.loads(via)
    answer.pop("memwarden")
    assert answer == json.loads(post(fake.url + path, {"model": MODEL, **request_body})[2])


@pytest.mark.parametrize("policy,pace,assembled", [("reserve", False, False), ("admit_all", False, False),
                                                   ("lookahead", False, True), ("lookahead", True, False),
                                                   ("optimistic", False, True), ("memwarden", False, True),
                                                   ("memwarden", True, True)])
def test_whole_answers_are_streamed_from_the_upstream_only_for_policies_that_follow_output(fake, model_config,
                                                                                           policy, pace, assembled):
    server, thread = start(fake, model_config, **{"admission.policy": policy, "server.upstream_pace": pace})
    try:
        path, request_body = WHOLE[0]
        status, _, via = post(f"http://127.0.0.1:{server.port}" + path, request_body)
        assert status == 200 and fake.received[-1].get("stream", False) is assembled
        answer = json.loads(via)
        answer.pop("memwarden")
        assert answer == json.loads(post(fake.url + path, {"model": MODEL, **request_body})[2])
    finally:
        server.stop(thread)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lookahead_paces_whole_answers_and_admits_on_the_progress_paced():
    """A whole answer's output is counted at the slowest pace of those finished before it
    (tokens over seconds since admission less the time to a first token), one short of its
    end; the projection admits on it."""
    from memwarden.controller.traffic import Rejected
    from memwarden.serve.gateway import UpstreamTrafficController

    config = MemwardenConfig.load(env={}, overrides={"admission.policy": "lookahead", "admission.queue_limit": 0,
                                                     "degradation.enabled": False, "server.upstream_pace": True})
    clock = _Clock()
    controller = UpstreamTrafficController(config, 200, 1, clock=clock, can_preempt=False)
    first = controller.acquire(None, 10, 100)
    controller.pace(first)
    clock.now = 2.0
    controller.estimate_progress()
    assert first.generated == 0  # no answer has finished yet: no pace to count by
    controller.paced(first, 100)  # 100 tokens in 2 s: 50 a second
    assert first.generated == 100
    controller.release(first)
    running = controller.acquire(None, 10, 100)
    controller.pace(running)
    # unpaced, it would hold 10 + t tokens for 100 more steps: with a newcomer of the same
    # size the peak is 220 > 200, so the newcomer is refused (no queue)
    with pytest.raises(Rejected, match="pool_full"):
        controller.acquire(None, 10, 100)
    clock.now = 3.75  # 1.75 s at 50 a second: 87 tokens made, 13 to go
    newcomer = controller.acquire(None, 10, 100)  # peak max(97 + 13 + 10 + 13, 10 + 100) = 133
    assert running.generated == 87 and newcomer.generated == 0
    clock.now = 60.0
    controller.estimate_progress()
    assert running.generated == 99  # one short of its end until its answer comes
    controller.release(running)  # an answer that failed: it is paced no more
    clock.now = 120.0
    controller.estimate_progress()
    assert running.generated == 99
    controller.release(newcomer)
    # the upstream takes 0.5 s to a first token: nothing counted before it, then 50 a second
    controller.first_token_s = 0.5
    young = controller.acquire(None, 10, 100)
    controller.pace(young)
    clock.now = 120.25
    controller.estimate_progress()
    assert young.generated == 0
    clock.now = 120.75
    controller.estimate_progress()
    assert young.generated == 12
    clock.now = 121.75  # answered: 50 tokens in 1.75 - 0.5 s of decoding, 40 a second
    controller.paced(young, 50)
    controller.release(young)
    slower = controller.acquire(None, 10, 100)  # counted at the slowest of the latest paces
    controller.pace(slower)
    clock.now += 1.5
    controller.estimate_progress()
    assert slower.generated == 40
    controller.release(slower)


def test_the_gateway_follows_the_upstreams_time_to_first_token(gateway, fake):
    server, _ = gateway
    controller = server.app.state.controller
    fake.first_token_sum, fake.first_token_count = 10.0, 5  # before: counts at start-up or the last read
    time.sleep(0.3)  # a few reads (every 0.05 s)
    fake.first_token_sum, fake.first_token_count = 11.0, 9  # 4 first tokens in 1 s since
    deadline = time.monotonic() + 10
    while controller.first_token_s != pytest.approx(0.25) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert controller.first_token_s == pytest.approx(0.25)
    controller.first_token_s = 0.0


def test_chat_stream_passes_chunk_by_chunk(gateway, fake):
    server, base = gateway
    messages = [{"role": "user", "content": "hello there"}]
    direct = list(client(fake.url).chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                                             stream=True, stream_options={"include_usage": True}))
    via = list(client(base).chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True,
                                                      stream_options={"include_usage": True}))
    assert [c.model_dump() for c in via] == [c.model_dump() for c in direct]
    assert "".join(c.choices[0].delta.content or "" for c in via if c.choices) == " w0 w1 w2 w3"
    assert via[-1].usage.completion_tokens == 4
    # not asked for: the usage chunk the gateway requested stays out of the client's stream
    plain = list(client(base).chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True))
    assert all(c.choices for c in plain) and len(plain) == len(via) - 1
    assert fake.received[-1]["stream_options"] == {"include_usage": True}
    assert idle(server)


def test_completion_stream_text_and_usage(gateway):
    server, base = gateway
    chunks = list(client(base).completions.create(model=MODEL, prompt="a b", max_tokens=6, stream=True,
                                                   stream_options={"include_usage": True},
                                                   extra_headers={"X-Session-ID": "streamer"}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(f" w{i}" for i in range(6))
    detail = stats(base)["session_details"]["streamer"]
    assert detail["tokens_in"] == 3 and detail["tokens_out"] == 6  # /tokenize's count, the upstream's usage
    assert idle(server)


def test_a_client_that_leaves_a_stream_gives_its_reservation_back(gateway, fake):
    import httpx2

    server, base = gateway
    fake.chunk_delay = 0.2
    body = {"prompt": "p", "max_tokens": 20, "stream": True}
    with httpx2.Client(timeout=10) as c, c.stream("POST", base + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    left = time.monotonic()
    while not idle(server) and time.monotonic() < left + 5:
        time.sleep(0.05)
    assert idle(server) and time.monotonic() - left < 2  # not when the 4 s stream would have ended


def test_prompt_counting(gateway, fake):
    _, base = gateway
    c = client(base)
    c.completions.create(model=MODEL, prompt=[5, 6, 7, 8, 9], max_tokens=2, extra_headers={"X-Session-ID": "ids"})
    c.completions.create(model=MODEL, prompt="x y z w", max_tokens=2, extra_headers={"X-Session-ID": "text"})
    fake.has_tokenize = False  # the model folder has no tokenizer: a token per 4 bytes
    c.completions.create(model=MODEL, prompt="x" * 40, max_tokens=2, extra_headers={"X-Session-ID": "guess"})
    details = stats(base)["session_details"]
    assert [details[s]["tokens_in"] for s in ("ids", "text", "guess")] == [5, 5, 10]
    assert [details[s]["tokens_out"] for s in ("ids", "text", "guess")] == [2, 2, 2]


def test_without_tokenize_the_model_folders_tokenizer_counts(fake, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "x", "y", "z", "hi", "there"]
    vocabulary = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    vocabulary.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocabulary, unk_token="[UNK]")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    fake.has_tokenize = False
    server, thread = start(fake, str(tmp_path))
    try:
        c = client(f"http://127.0.0.1:{server.port}")
        c.completions.create(model=MODEL, prompt="x y z", max_tokens=1, extra_headers={"X-Session-ID": "t"})
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=1,
                                  extra_headers={"X-Session-ID": "c"})
        details = server.controller.memory_stats()["session_details"]
        assert (details["t"]["tokens_in"], details["c"]["tokens_in"]) == (3, 2)  # the guess would say 2 and 15
    finally:
        server.stop(thread)


def test_upstream_parameters_pass_through_and_limits_are_the_controllers(gateway, fake):
    _, base = gateway
    status, _, _ = post(base + "/v1/completions", {"prompt": "p", "max_tokens": 3, "stop": ["\n"], "logprobs": 2})
    assert status == 200
    sent = fake.received[-1]
    assert sent["stop"] == ["\n"] and sent["logprobs"] == 2 and sent["model"] == MODEL and sent["max_tokens"] == 3
    status, _, body = post(base + "/v1/completions", {"prompt": "p", "max_tokens": 0})
    assert status == 400 and json.loads(body)["error"]["param"] == "max_tokens"
    status, _, body = post(base + "/v1/completions", {"prompt": ["a", "b"]})
    assert status == 400 and "one prompt" in json.loads(body)["error"]["message"]
    status, _, body = post(base + "/v1/completions", {"model": "gpt-9", "prompt": "p"})
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"


# ---- the controller's refusals ----------------------------------------------------------------

def test_session_quota_is_429_for_that_session_only(fake, model_config):
    # 16 KiB a session at 256 B a token: 64 tokens; "reserve" prices prompt + max_tokens, so
    # one request of 4 + 40 fits a session and a second one beside it does not
    server, thread = start(fake, model_config, **{"sessions.per_session_limit": "16KiB",
                                                  "admission.policy": "reserve"})
    try:
        base = f"http://127.0.0.1:{server.port}"
        body = {"prompt": "a b c", "max_tokens": 40}
        fake.delay = 1.0
        first = {}
        holder = threading.Thread(target=lambda: first.update(
            status=post(base + "/v1/completions", body, {"X-Session-ID": "busy"})[0]))
        holder.start()
        deadline = time.monotonic() + 10
        while not server.controller.admission.running_ids() and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, answer = post(base + "/v1/completions", body, {"X-Session-ID": "busy"})
        assert status == 429 and json.loads(answer)["error"]["code"] == "session_limit"
        assert int(headers["retry-after"]) >= 1
        assert stats(base)["session_details"]["busy"]["in_flight"] == 1
        status, _, _ = post(base + "/v1/completions", body, {"X-Session-ID": "other"})  # admitted beside it
        assert status == 200
        holder.join(10)
        assert first["status"] == 200 and idle(server)
        assert stats(base)["rejections_by_reason"] == {"session_limit": 1}
    finally:
        server.stop(thread)


def test_idle_sessions_are_evicted(fake, model_config):
    server, thread = start(fake, model_config, **{"sessions.idle_timeout": 0.2})
    try:
        base = f"http://127.0.0.1:{server.port}"
        post(base + "/v1/completions", {"prompt": "p", "max_tokens": 1}, {"X-Session-ID": "brief"})
        deadline = time.monotonic() + 5
        while "brief" in stats(base)["session_details"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "brief" not in stats(base)["session_details"]
        assert "memwarden:session_evictions_total 1.0" in get(base + "/metrics")[1]
    finally:
        server.stop(thread)


def test_full_pool_is_503_with_retry_after(model_config):
    # 4 blocks of 16 tokens upstream: 64 tokens; one request of 3 + 50 fills it
    upstream = FakeVLLM(num_gpu_blocks=4).start()
    server, thread = start(upstream, model_config, **{"admission.policy": "reserve", "admission.queue_limit": 0})
    try:
        base = f"http://127.0.0.1:{server.port}"
        upstream.delay = 1.0
        first = {}
        holder = threading.Thread(target=lambda: first.update(
            status=post(base + "/v1/completions", {"prompt": "a b", "max_tokens": 50})[0]))
        holder.start()
        deadline = time.monotonic() + 10
        while not server.controller.admission.running_ids() and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, body = post(base + "/v1/completions", {"prompt": "c d", "max_tokens": 50})
        assert status == 503 and json.loads(body)["error"]["code"] == "pool_full"
        assert int(headers["retry-after"]) >= 1
        holder.join(10)
        assert first["status"] == 200 and idle(server)
    finally:
        server.stop(thread)
        upstream.stop()


@pytest.fixture
def crowded(model_config):
    """(upstream, server, client) where a request of 40 prompt tokens has room for 25 more:
    a 64-token pool; after 32 one-token requests "memwarden" reserves 16 output tokens
    ahead: 40 + 16 fit, then the 8 left; 40 + 25 do not."""
    upstream = FakeVLLM(num_gpu_blocks=4).start()
    server, thread = start(upstream, model_config)
    try:
        c = client(f"http://127.0.0.1:{server.port}")
        for _ in range(32):
            c.completions.create(model=MODEL, prompt=[1], max_tokens=1)
        yield upstream, server, c
    finally:
        server.stop(thread)
        upstream.stop()


def test_a_stream_past_its_reservation_with_no_room_is_stopped(crowded):
    _, server, c = crowded
    chunks = list(c.completions.create(model=MODEL, prompt=list(range(40)), max_tokens=50, stream=True))
    texts = [ch.choices[0].text for ch in chunks if ch.choices[0].text]
    assert len(texts) == 25 and chunks[-1].choices[0].finish_reason == "length"
    assert server.controller.counts["cut_short"] == 1 and idle(server)


def test_a_whole_answer_past_its_reservation_with_no_room_is_stopped(crowded):
    upstream, server, c = crowded
    answer = c.completions.create(model=MODEL, prompt=list(range(40)), max_tokens=50)
    made = client(upstream.url).completions.create(model=MODEL, prompt=list(range(40)), max_tokens=25)
    assert answer.choices[0].text == made.choices[0].text and answer.choices[0].finish_reason == "length"
    assert answer.usage == made.usage  # the gateway's own count: stopped before the usage chunk
    assert server.controller.counts["cut_short"] == 1 and idle(server)


# ---- upstream failures ------------------------------------------------------------------------

@pytest.mark.parametrize("mode,status,code", [
    ("error", 502, "upstream_error"),
    ("overloaded", 503, "upstream_overloaded"),
    ("garbage", 502, "upstream_bad_response"),
    ("refuse", 400, "upstream_rejected"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_failures_map_to_clear_errors(gateway, fake, mode, status, code, stream):
    server, base = gateway
    fake.mode = mode
    got, headers, body = post(base + "/v1/completions", {"prompt": "p", "max_tokens": 2, "stream": stream})
    assert got == status and json.loads(body)["error"]["code"] == code
    if mode == "overloaded":
        assert headers["retry-after"] == "7"
    assert idle(server)


def test_a_stream_that_breaks_ends_with_an_error_event(gateway, fake):
    server, base = gateway
    fake.mode = "broken_stream"
    status, _, body = post(base + "/v1/completions", {"prompt": "p", "max_tokens": 4, "stream": True})
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and json.loads(events[0])["choices"][0]["text"] == " w0"
    assert json.loads(events[1])["error"]["code"] == "upstream_bad_response" and events[2] == "[DONE]"
    assert idle(server)


@pytest.mark.parametrize("path,request_body", WHOLE)
def test_a_whole_answer_whose_stream_breaks_is_a_502(gateway, fake, path, request_body):
    server, base = gateway
    fake.mode = "broken_stream"
    status, _, body = post(base + path, request_body)
    error = json.loads(body)["error"]
    assert status == 502 and error["code"] == "upstream_bad_response" and error["type"] == "upstream_error"
    assert fake.url in error["message"] and "after 1 output tokens" in error["message"]
    assert idle(server)


def test_upstream_timeout_is_504(gateway, fake):
    server, base = gateway
    fake.delay = 3.0  # the gateway waits 2 s
    started = time.monotonic()
    status, _, body = post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 3.0
    with pytest.raises(openai.APIStatusError) as e:
        client(base).completions.create(model=MODEL, prompt="p", max_tokens=2)
    assert e.value.status_code == 504
    assert idle(server)


def test_upstream_down(model_config):
    upstream = FakeVLLM().start()
    server, thread = start(upstream, model_config)
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/healthz")[0] == 200
        upstream.stop()
        started = time.monotonic()
        status, body = get(base + "/healthz")
        assert status == 503 and json.loads(body)["status"] == "upstream_unreachable"
        status, headers, body = post(base + "/v1/completions", {"prompt": "p", "max_tokens": 2})
        assert status == 503 and json.loads(body)["error"]["code"] == "upstream_unreachable"
        assert headers["retry-after"] == "1"
        assert time.monotonic() - started < 5 and idle(server)
        time.sleep(0.2)  # a few failed polls
        assert stats(base)["upstream"]["problem"] and "memwarden:upstream_up 0.0" in get(base + "/metrics")[1]
    finally:
        server.stop(thread)


def test_an_unreachable_upstream_at_start_is_a_clear_error(model_config):
    upstream = FakeVLLM().start()
    url = upstream.url
    upstream.stop()
    config = MemwardenConfig.load(env={}, overrides={"server.port": 0, "server.upstream": url,
                                                     "server.upstream_model": model_config,
                                                     "server.upstream_connect_timeout": 1.0})
    with pytest.raises(ValueError, match="cannot be reached"):
        Server(config)


# ---- what the gateway reports -----------------------------------------------------------------

def test_memory_stats_and_metrics_follow_the_upstream(gateway, fake):
    _, base = gateway
    fake.kv_usage, fake.running, fake.waiting, fake.preemptions = 0.42, 3, 2, 5
    deadline = time.monotonic() + 5
    while stats(base)["upstream"]["num_requests_running"] != 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    current = stats(base)
    upstream = current["upstream"]
    assert (upstream["kv_cache_usage_perc"], upstream["num_requests_waiting"], upstream["num_preemptions_total"],
            upstream["num_gpu_blocks"], upstream["block_size"]) == (0.42, 2, 5, 320, 16)
    assert current["kv_cache_usage_perc"] == pytest.approx(0.42)  # the upstream's usage is the pressure
    assert current["kv_budget_mb"] == pytest.approx(320 * 16 * BYTES_PER_TOKEN / 2**20)
    text = get(base + "/metrics")[1]
    assert re.search(r"memwarden:upstream_kv_cache_usage_perc 0\.42", text)
    assert re.search(r"memwarden:upstream_num_preemptions_total 5\.0", text)
    assert "memwarden:upstream_up 1.0" in text and "memwarden:admission_decisions_total" in text


def test_upstream_pressure_degrades_requests(gateway, fake):
    server, base = gateway
    fake.kv_usage = 0.95  # emergency: new sessions are refused
    deadline = time.monotonic() + 5
    while server.controller.upstream_usage < 0.95 and time.monotonic() < deadline:
        time.sleep(0.02)
    status, _, body = post(base + "/v1/completions", {"prompt": "p", "max_tokens": 10}, {"X-Session-ID": "late"})
    assert status == 503 and json.loads(body)["error"]["code"] == "new_session_under_pressure"
    fake.kv_usage = 0.87  # critical: max_tokens x 0.5
    while server.controller.upstream_usage > 0.9 and time.monotonic() < deadline:
        time.sleep(0.02)
    status, headers, body = post(base + "/v1/completions", {"prompt": "p", "max_tokens": 10})
    assert status == 200 and headers["x-memwarden-degraded"] == "critical"
    assert json.loads(body)["memwarden"]["max_tokens"] == 5 == fake.received[-1]["max_tokens"]
    fake.kv_usage = 0.0
    while server.controller.upstream_usage > 0 and time.monotonic() < deadline:
        time.sleep(0.02)


# ---- configuration and the command line -----------------------------------------------------

@pytest.mark.parametrize("env,message", [
    ({"MEMWARDEN_SERVER_UPSTREAM": "ftp://x"}, r"MEMWARDEN_SERVER_UPSTREAM: must be an http\(s\) URL"),
    ({"MEMWARDEN_SERVER_UPSTREAM": "http://x", "MEMWARDEN_SERVER_UPSTREAM_POLL_INTERVAL": "0"},
     r"MEMWARDEN_SERVER_UPSTREAM_POLL_INTERVAL: must be positive"),
    ({"MEMWARDEN_SERVER_UPSTREAM": "http://x", "MEMWARDEN_SERVER_MODEL": "m"}, r"not both"),
    ({"MEMWARDEN_SERVER_UPSTREAM_MODEL": "m"}, r"set server.upstream too"),
])
def test_config_keys_are_validated(env, message):
    with pytest.raises(ConfigError, match=message):
        MemwardenConfig.load(env=env)
    good = MemwardenConfig.load(env={"MEMWARDEN_SERVER_UPSTREAM": "http://h:1",
                                     "MEMWARDEN_SERVER_UPSTREAM_TIMEOUT": "9"})
    assert (good.server.upstream, good.server.upstream_timeout) == ("http://h:1", 9.0)


def test_cli_serves_in_front_of_the_upstream(fake, model_config):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-m", "memwarden.cli", "serve", "--port", "0", "--max-requests", "1",
                             "--upstream", fake.url, "--upstream-model", model_config,
                             "--upstream-poll-interval", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert f"from the upstream {fake.url}" in line
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        status, _, body = post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 200 and json.loads(body)["choices"][0]["text"] == " w0 w1"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_vllm_chunks_without_a_tokenizer_count_a_token_each():
    """vLLM 0.32 with --skip-tokenizer-init streams one chunk per token with empty text
    (these are its chunks for 3 tokens, usage last); a chat stream opens with a role-only chunk."""
    from memwarden.serve.gateway import _has_output

    stream = [{"index": 0, "text": "", "logprobs": None, "finish_reason": None, "stop_reason": None,
               "prompt_token_ids": None, "token_ids": None}] * 2 + \
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
          "prompt_token_ids": None, "token_ids": None}]
    assert sum(_has_output(choice) for choice in stream) == 3
    assert _has_output({"index": 0, "text": "", "token_ids": [828]})
    chat = [{"index": 0, "delta": {"role": "assistant", "content": ""}},
            {"index": 0, "delta": {"content": "Hi"}}, {"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]
    assert [_has_output(choice) for choice in chat] == [False, True, True]
