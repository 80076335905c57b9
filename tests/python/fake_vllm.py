"""A fake vLLM on loopback, for the gateway's tests and benchmark: OpenAI completions and
chat completions with ``usage`` (server-sent events ending in a usage chunk when
``stream_options.include_usage`` is set), ``/tokenize``, ``/v1/models``, ``/health`` and
``/metrics`` in vLLM's own format (``vllm:cache_config_info`` and the gauges the gateway
reads). Its output is deterministic: ``max_tokens`` words `` w0 w1 ...``, one a token.
A prompt's tokens are its whitespace-separated words plus one (BOS), so a count that
came from ``/tokenize`` is told apart from memwarden's bytes/4 guess.

Knobs (attributes, changed while it runs): ``mode`` -- ``"ok"``, ``"error"`` (500),
``"overloaded"`` (503 with ``Retry-After: 7``), ``"refuse"`` (400, a prompt too long),
``"garbage"`` (200 with a body that is not JSON), ``"broken_stream"`` (a stream whose second
event is not JSON); ``delay`` seconds before answering, ``chunk_delay`` between events;
``pace``: a ``threading.Semaphore`` a stream takes a permit of before each word (None: no
wait), so a test decides how far a stream has got; ``has_tokenize``; the metrics
``kv_usage``, ``running``, ``waiting``, ``preemptions``, ``first_token_sum`` and
``first_token_count``; :meth:`stop` takes it down.
``received`` lists the bodies it was sent, ``client_ports`` the port each came from (one
port for requests that shared a connection).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

MODEL = "fake-llama"

_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{model}"}} {running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{model}"}} {waiting}
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{model}"}} {kv_usage}
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{{engine="0",model_name="{model}"}} {preemptions}
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="{model}"}} 120.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_sum{{engine="0",model_name="{model}"}} 1.5
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="0.3",model_name="{model}"}} 2.0
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="+Inf",model_name="{model}"}} 3.0
vllm:e2e_request_latency_seconds_count{{engine="0",model_name="{model}"}} 3.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_sum{{engine="0",model_name="{model}"}} {first_token_sum}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="{model}"}} {first_token_count}
vllm:time_to_first_token_seconds_count{{engine="0",model_name="{model}"}} {first_token_count}
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="{block_size}",cache_dtype="auto",calculate_kv_scales="False",\
cpu_offload_gb="0",enable_prefix_caching="True",gpu_memory_utilization="0.9",is_attention_free="False",\
num_cpu_blocks="None",num_gpu_blocks="{num_gpu_blocks}",num_gpu_blocks_override="None",\
prefix_caching_hash_algo="sha256",sliding_window="None",swap_space="4",swap_space_bytes="4294967296"}} 1.0
"""


def count_tokens(text: str) -> int:
    return len(text.split()) + 1


class FakeVLLM:
    def __init__(self, max_model_len: int = 2048, num_gpu_blocks: int = 320, block_size: int = 16):
        self.max_model_len, self.num_gpu_blocks, self.block_size = max_model_len, num_gpu_blocks, block_size
        self.mode, self.delay, self.chunk_delay, self.has_tokenize = "ok", 0.0, 0.0, True
        self.pace: Optional[threading.Semaphore] = None
        self.kv_usage, self.running, self.waiting, self.preemptions = 0.0, 0, 0, 0
        self.first_token_sum, self.first_token_count = 0.0, 0  # vllm:time_to_first_token_seconds
        self.received: list[dict] = []
        self.client_ports: list[int] = []
        self.app = self._app()
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="fake-vllm")

    def start(self) -> "FakeVLLM":
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the fake vLLM stopped before it listened")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self._server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def metrics_text(self) -> str:
        return _METRICS.format(model=MODEL, running=float(self.running), waiting=float(self.waiting),
                               kv_usage=float(self.kv_usage), preemptions=float(self.preemptions),
                               block_size=self.block_size, num_gpu_blocks=self.num_gpu_blocks,
                               first_token_sum=float(self.first_token_sum),
                               first_token_count=float(self.first_token_count))

    # -- the app -----------------------------------------------------------------------------

    def _refusal(self):
        """The knob's failure, or None when the request is to be answered."""
        if self.mode == "error":
            return JSONResponse({"error": {"message": "engine crashed", "type": "InternalServerError"}}, 500)
        if self.mode == "overloaded":
            return JSONResponse({"error": {"message": "too many requests", "type": "ServiceUnavailable"}}, 503,
                                headers={"Retry-After": "7"})
        if self.mode == "refuse":
            return JSONResponse({"error": {"message": "This model's maximum context length is 2048 tokens",
                                           "type": "BadRequestError", "code": 400}}, 400)
        if self.mode == "garbage":
            return Response(b"<html>not json", media_type="application/json")
        return None

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        def health():
            return Response(status_code=200)

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "vllm",
                                                 "root": MODEL, "max_model_len": self.max_model_len}]}

        @app.get("/metrics")
        def metrics():
            return PlainTextResponse(self.metrics_text())

        @app.post("/tokenize")
        async def tokenize(request: Request):
            if not self.has_tokenize:
                return JSONResponse({"detail": "Not Found"}, 404)
            body = await request.json()
            text = body["prompt"] if "prompt" in body else " ".join(m["content"] for m in body["messages"])
            count = count_tokens(text)
            return {"count": count, "max_model_len": self.max_model_len, "tokens": list(range(count))}

        @app.post("/v1/completions")
        async def completions(request: Request):
            self.client_ports.append(request.client.port)
            return await self._answer(await request.json(), chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            self.client_ports.append(request.client.port)
            return await self._answer(await request.json(), chat=True)

        return app

    async def _answer(self, body: dict, chat: bool):
        self.received.append(body)
        if self.delay:
            await asyncio.sleep(self.delay)
        refusal = self._refusal() if self.mode != "broken_stream" else None
        if refusal is not None:
            return refusal
        if chat:
            prompt_tokens = count_tokens(" ".join(m["content"] for m in body["messages"]))
        else:
            prompt = body["prompt"]
            prompt_tokens = len(prompt) if isinstance(prompt, list) else count_tokens(prompt)
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        words = [f" w{i}" for i in range(limit)]
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": limit, "total_tokens": prompt_tokens + limit}
        head = {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion", "created": 1,
                "model": MODEL}
        if not body.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "logprobs": None,
                       "finish_reason": "length"} if chat
                      else {"index": 0, "text": "".join(words), "logprobs": None, "finish_reason": "length"})
            return {**head, "choices": [choice], "usage": usage}
        return StreamingResponse(self._events(head, words, usage, chat, body), media_type="text/event-stream")

    async def _events(self, head: dict, words: list[str], usage: dict, chat: bool, body: dict):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def event(choice: dict) -> str:
            return f"data: {json.dumps({**head, 'choices': [choice], 'usage': None})}\n\n"

        if chat:
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        for i, word in enumerate(words):
            if self.pace is not None:  # bounded: a test that fails leaves no thread waiting for ever
                await asyncio.to_thread(self.pace.acquire, timeout=10)
            if self.mode == "broken_stream" and i == 1:
                yield "data: <html>oops\n\n"
                return
            last = "length" if i == len(words) - 1 else None
            yield event({"index": 0, "delta": {"content": word}, "finish_reason": last} if chat
                        else {"index": 0, "text": word, "logprobs": None, "finish_reason": last})
            await asyncio.sleep(self.chunk_delay)
        if (body.get("stream_options") or {}).get("include_usage"):
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
