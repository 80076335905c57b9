"""The app of ``memwarden serve --upstream URL``: the endpoints of our own server
(:mod:`memwarden.serve.app`) in front of an OpenAI-compatible engine (vLLM) that does the
generating. Every request goes through the same ``TrafficController`` -- admission and
its queue, ``X-Session-ID`` sessions, degradation -- before it is forwarded; the
controller counts:

* **the budget**: the upstream's own KV cache, ``num_gpu_blocks x block_size`` tokens
  from its ``vllm:cache_config_info`` metric, priced at the bytes per token memwarden's
  estimator gives for the upstream's model (``server.upstream_model``: a local folder, a
  ``config.json``, an embedded name; else the served name as a hub id) in its KV dtype
  (the ``cache_dtype`` label); ``server.max_memory`` overrides it;
* **prompts**: a token-id prompt exactly; text by the upstream's ``/tokenize``, else the
  tokenizer in the ``upstream_model`` folder, else an estimate of a token per 4 bytes
  (of the text; of the messages' JSON for a chat);
* **outputs**: the upstream's ``usage`` (a stream is asked for ``include_usage``, and the
  final usage chunk is dropped again when the client did not ask for it). A stream
  reports each chunk with text as it passes, so a stream whose reservation runs out with
  no room left is stopped there (``finish_reason: "length"``; closing the stream aborts it
  upstream). Under a policy that follows output as it grows (``memwarden``,
  ``lookahead``, ``optimistic``) a whole response is streamed from the upstream too and
  assembled here into the JSON answer the upstream would have sent, so it is counted and
  stopped the same way (``reserve`` and ``admit_all`` need no progress, and a stream costs
  the upstream's server a chunk a token) -- where that answer is just the stream's text joined: one choice (``n`` is 1), no
  ``logprobs``, ``top_logprobs``, ``echo`` or ``best_of``, and for a chat no ``tools``,
  ``tool_choice``, ``functions`` or ``response_format``. Any other is forwarded whole and
  counted when it arrives. With ``server.upstream_pace`` a whole answer under
  ``lookahead`` (which reserves the whole request and needs progress only to project the
  peak) is forwarded whole and *paced* instead: counted, as it runs, at the slowest
  decoding pace of the latest answers (tokens over seconds since admission less the
  upstream's ``vllm:time_to_first_token_seconds`` lately), one token short of its end
  until it arrives. Cheaper for the upstream, but an estimate: a request counted ahead of
  where it is makes the projection free its memory too soon;
* **pressure**: the larger of what it admitted (reserved / budget) and the upstream's
  ``vllm:kv_cache_usage_perc``, read every ``server.upstream_poll_interval`` seconds --
  traffic that reaches the upstream by another way degrades requests here too. Each read
  also evicts the sessions idle past ``sessions.idle_timeout``.

The upstream's own parameters (``stop``, ``logprobs``, ...) pass through; the controller's
``max_tokens``, ``temperature`` and ``top_p`` replace the client's. Server-sent events pass
through chunk by chunk, unchanged. A completion takes one prompt (text or token ids).
Upstream failures are OpenAI-shaped errors (:mod:`memwarden.serve.upstream`: 502, 503
with ``Retry-After``, 504, or the upstream's own 4xx); in a stream, after the first
chunk, an ``{"error": ...}`` event; in the stream a whole answer is assembled from, after
the first chunk, a 502. ``/healthz`` asks the upstream's ``/health`` (503
with the reason when it does not answer); ``/memory_stats`` adds an ``upstream`` section
(its metrics and how old they are); ``/metrics`` adds ``memwarden:upstream_*`` gauges.

May import: fastapi, :mod:`memwarden.serve.app` (its error helpers), ``metrics``,
``schemas``, ``upstream``, :mod:`memwarden.controller` and the layers below. Never
:mod:`memwarden.cli`.
"""
from __future__ import annotations

import collections
import json
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import anyio
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from memwarden.controller.config import MemwardenConfig
from memwarden.controller.traffic import CONTINUE, Rejected, Ticket, TrafficController
from memwarden.serve.app import (admission_notice, context_exceeded, error_response, refusal_response,
                                 refuse_invalid_requests, sse_data, sse_event, unknown_model,
                                 upstream_error_response)
from memwarden.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from memwarden.serve.schemas import MAX_TOKENS_LIMIT, ChatCompletionRequest, CompletionRequest
from memwarden.serve.upstream import EngineMetrics, Events, MetricsPoller, Upstream, UpstreamError

__all__ = ["UpstreamModel", "UpstreamTrafficController", "build_gateway", "create_gateway"]

_COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's and vLLM's max_tokens when a completion names none
_BYTES_PER_TOKEN_GUESS = 4  # text without a tokenizer: a token per 4 bytes of UTF-8
_DECIDING_THREADS = 8  # admission threads beyond the queue's: requests being decided, not waiting
_PACE_WINDOW = 8  # finished answers whose slowest pace the answers in flight are counted at


class GatewayCompletionRequest(CompletionRequest):
    # fields the controller reads are checked; the upstream's own parameters pass through
    model_config = ConfigDict(extra="allow")
    prompt: Union[str, list[int], list[str], list[list[int]]] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)


class GatewayChatRequest(ChatCompletionRequest):
    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]] = Field(..., min_length=1)  # content parts, tool calls: the upstream's
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)


class UpstreamTrafficController(TrafficController):
    """The controller whose pressure is also the upstream's own KV usage, and which paces
    the whole answers it does not see grow under ``server.upstream_pace`` (module doc)."""

    upstream_usage = 0.0  # vllm:kv_cache_usage_perc at the last read
    first_token_s = 0.0  # the upstream's mean time to a request's first token, lately

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._paced: dict[str, Ticket] = {}  # whole answers in flight, by request id
        self._pace_lock = threading.Lock()
        # output tokens a second the latest finished paced answers decoded at
        self._paces: collections.deque = collections.deque(maxlen=_PACE_WINDOW)

    def pressure(self) -> float:
        return max(super().pressure(), self.upstream_usage)

    def acquire(self, *args, **kwargs) -> Ticket:
        self.estimate_progress()  # each decision sees the paced answers where they are now
        return super().acquire(*args, **kwargs)

    def release(self, ticket: Ticket) -> None:
        with self._pace_lock:
            self._paced.pop(ticket.request_id, None)
        self.estimate_progress()  # the queue's head is admitted against where the others are
        super().release(ticket)

    def pace(self, ticket: Ticket) -> None:
        """Count ``ticket``'s output by the upstream's pace until :meth:`paced` says it is done."""
        with self._pace_lock:
            self._paced[ticket.request_id] = ticket

    def paced(self, ticket: Ticket, generated: int) -> None:
        """``ticket``'s answer came with ``generated`` output tokens: report them, and let
        its pace (tokens over its seconds since admission less the upstream's time to a
        first token) count in the next estimates."""
        with self._pace_lock:
            self._paced.pop(ticket.request_id, None)
            seconds = self._clock() - ticket.started - self.first_token_s  # decoding
            if generated > 0 and seconds > 0:
                self._paces.append(generated / seconds)
            _account(self, ticket, generated)

    def estimate_progress(self) -> None:
        """Report each paced answer's output so far: the slowest pace of the latest
        answers over its time since admission less the upstream's time to a first token,
        short of its last token (it holds its memory until its answer arrives). Counted
        behind where it is, a request's projection runs late and peaks no lower; counted
        ahead (a young one, or steps slowed by others' prefills), it would be projected to
        free its memory too soon -- so every doubt counts it behind."""
        with self._pace_lock:
            if not self._paces:
                return
            per_second = min(self._paces)
            now = self._clock()
            for ticket in self._paced.values():
                decoding = max(0.0, now - ticket.started - self.first_token_s)
                count = min(int(per_second * decoding), ticket.max_tokens - 1)
                if count > ticket.generated:  # lookahead reserved it whole: one report, no growing in steps
                    self.progress(ticket, count)


@dataclass
class UpstreamModel:
    """What the gateway serves: the upstream's model (``card``: its ``/v1/models`` entry),
    its context and KV price, and the client and metrics thread it reaches the upstream with."""

    card: dict
    max_context: Optional[int]
    bytes_per_token: int
    budget_source: str  # where the KV budget came from
    upstream: Upstream
    poller: MetricsPoller
    tokenizer: Any = None  # the upstream_model folder's tokenizer, when it has one

    @property
    def name(self) -> str:
        return self.card["id"]

    def close(self) -> None:
        self.poller.stop()
        self.upstream.close()


# ---- start-up --------------------------------------------------------------------------------

def _price(model: str, cache_dtype: Optional[str]) -> tuple[int, Optional[int]]:
    """(KV bytes per token, max_position_embeddings) of ``model`` by memwarden's estimator."""
    from memwarden.footprint import kv_bytes_per_token
    from memwarden.models import describe

    try:
        description = describe(model)
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot price the upstream's KV cache from {model!r} ({exc}); pass --upstream-model "
                         f"(a local model folder, a config.json or an embedded name)") from None
    try:
        per_token = kv_bytes_per_token(description.spec, cache_dtype or "auto", description.dtype)
    except ValueError as exc:
        raise ValueError(f"the upstream's KV cache dtype (vllm:cache_config_info cache_dtype={cache_dtype!r}) "
                         f"is not one memwarden prices: {exc}") from None
    return math.ceil(per_token), description.spec.max_position_embeddings


def _local_tokenizer(model: Optional[str]):
    """The tokenizer saved in a local model folder (or beside its config.json), else None."""
    if model is None or not os.path.exists(model):
        return None
    folder = model if os.path.isdir(model) else os.path.dirname(model)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except (ImportError, OSError, ValueError):  # no tokenizer files there
        return None


def build_gateway(config: MemwardenConfig, on_response: Optional[Callable[[], None]] = None):
    """(app, model, controller) in front of ``config.server.upstream``; ValueError when the
    upstream cannot be reached or its KV cannot be priced."""
    server = config.server
    upstream = Upstream(server.upstream, server.upstream_timeout, server.upstream_connect_timeout)
    try:
        try:
            card = upstream.served_models()[0]
            first = upstream.metrics()
        except UpstreamError as exc:
            raise ValueError(f"{exc.message}; the gateway reads its models and metrics at start-up") from None
        bytes_per_token, positions = _price(server.upstream_model or card["id"], first.cache_dtype)
        if server.max_memory is not None:
            budget, source = server.max_memory, "server.max_memory"
        elif first.num_gpu_blocks and first.block_size:
            budget = first.num_gpu_blocks * first.block_size * bytes_per_token
            source = f"{first.num_gpu_blocks} blocks of {first.block_size} tokens upstream"
        else:
            raise ValueError(f"the upstream {upstream.url} exports no vllm:cache_config_info (num_gpu_blocks, "
                             f"block_size): set server.max_memory (--max-memory) to its KV budget")
    except ValueError:
        upstream.close()
        raise
    # vLLM generates (nothing to recompute here) and allocates KV in blocks
    controller = UpstreamTrafficController(config, budget, bytes_per_token, can_preempt=False,
                                           block_tokens=first.block_size or 1)
    controller.upstream_usage = first.kv_cache_usage_perc or 0.0

    previous = first

    def on_read(metrics: EngineMetrics) -> None:
        nonlocal previous
        controller.upstream_usage = metrics.kv_cache_usage_perc or 0.0
        first_tokens = _delta(metrics, previous, "first_token_count")
        if first_tokens:  # the mean over the requests whose first token came since the last read
            controller.first_token_s = _delta(metrics, previous, "first_token_seconds_sum") / first_tokens
        previous = metrics
        controller.estimate_progress()
        controller.sessions.evict_idle()  # the poll is the gateway's clock tick

    tokenizer = _local_tokenizer(server.upstream_model)
    poller = MetricsPoller(upstream, server.upstream_poll_interval, first, on_read=on_read).start()
    model = UpstreamModel(card, card.get("max_model_len") or positions, bytes_per_token, source, upstream, poller,
                          tokenizer)
    return create_gateway(model, controller, on_response), model, controller


def _delta(now: EngineMetrics, before: EngineMetrics, name: str) -> float:
    """How much counter ``name`` grew between two reads (0 when either lacks it or it was reset)."""
    a, b = getattr(now, name), getattr(before, name)
    return max(a - b, 0) if a is not None and b is not None else 0


# ---- counting --------------------------------------------------------------------------------

def _guess(text: str) -> int:
    return max(1, math.ceil(len(text.encode("utf-8")) / _BYTES_PER_TOKEN_GUESS))


async def _prompt_tokens(model: UpstreamModel, payload: dict, chat: bool) -> int:
    """See the module doc: ids exactly, else /tokenize, else the local tokenizer, else a guess."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of one prompt (larger batches are refused)
    if isinstance(prompt, list):
        return len(prompt)  # token ids
    probe = {"model": model.name, **({"messages": payload["messages"]} if chat else {"prompt": prompt})}
    counted = await model.upstream.count_tokens(probe)
    if counted is not None:
        return counted
    tokenizer = model.tokenizer
    if tokenizer is not None:
        if chat:
            ids = await run_in_threadpool(tokenizer.apply_chat_template, payload["messages"],
                                          add_generation_prompt=True, tokenize=True)
            return len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding or the ids
        return len(await run_in_threadpool(tokenizer.encode, prompt))
    return _guess(json.dumps(payload["messages"]) if chat else prompt)


def _account(controller: TrafficController, ticket: Ticket, generated: int) -> bool:
    """Report output up to ``generated`` tokens, one at a time (the controller grows a
    reservation in steps); False where the pool had no room for more."""
    for count in range(ticket.generated + 1, min(generated, ticket.max_tokens) + 1):
        if controller.progress(ticket, count) != CONTINUE:
            return False
    return True


def _completion_tokens(answer: dict, otherwise: int) -> int:
    """The output tokens an answer's ``usage`` reports, or ``otherwise`` when it has none."""
    count = (answer.get("usage") or {}).get("completion_tokens")
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else otherwise


def _has_output(choice: dict) -> bool:
    """Whether a streamed choice carries an output token. vLLM sends a chunk per token, with
    empty text when it runs without a tokenizer, so a ``text`` or ``content`` key counts
    even when empty (a chunk that only ends the stream then counts one token too many,
    the safe side for admission); a chat's first chunk, which names the role, does not."""
    delta = choice.get("delta") or {}
    if "role" in delta and not delta.get("content"):
        return False
    return "text" in choice or "content" in delta or bool(choice.get("token_ids"))


# what a whole answer joined from a stream could not reproduce: several candidates' or
# tool calls' deltas, logprobs, an echoed prompt -- those the upstream assembles itself
# (several choices, n > 1, the request schema refuses already)
_WHOLE_ONLY = ("logprobs", "top_logprobs", "echo", "best_of")
_WHOLE_ONLY_CHAT = ("tools", "tool_choice", "functions", "response_format")


_FOLLOWS_OUTPUT = ("memwarden", "lookahead", "optimistic")  # policies whose decisions read progress


def _paced_whole(controller: UpstreamTrafficController) -> bool:
    """Whether whole answers are paced rather than streamed (``server.upstream_pace``,
    under ``lookahead``: the only policy that needs progress but stops nothing)."""
    return controller.admission.policy == "lookahead" and controller.config.server.upstream_pace


def _assembles(payload: dict, chat: bool, policy: str) -> bool:
    """Whether the gateway streams a whole request from the upstream and joins the answer
    (see the module doc)."""
    if policy not in _FOLLOWS_OUTPUT:
        return False
    keys = _WHOLE_ONLY + (_WHOLE_ONLY_CHAT if chat else ())
    return all(payload.get(key) is None or payload.get(key) is False for key in keys)  # logprobs 0 is asked for


def _head(chunk: dict) -> dict:
    """The fields of a chunk that name the answer it belongs to."""
    return {key: chunk[key] for key in ("id", "object", "created", "model") if key in chunk}


class _Admitted:
    """An admitted request's way out: its reservation goes back, and its upstream stream
    (if any) is closed, exactly once however it ends. :meth:`chunks` reads that stream,
    reporting its output to the controller as it passes."""

    def __init__(self, controller: TrafficController, ticket: Ticket):
        self.controller, self.ticket = controller, ticket
        self.events: Optional[Events] = None
        self.generated = 0  # chunks with output so far: a token each, until the usage chunk counts
        self.stopped = False  # the controller ended it: the pool had no room for more output
        self._done = False

    async def chunks(self):
        """The upstream stream's (data, chunk) pairs; each chunk with output is reported
        after the caller has had it, and a STOP ends the chunks there (``stopped``)."""
        async for data, chunk in self.events.chunks():
            if chunk.get("usage"):
                _account(self.controller, self.ticket, _completion_tokens(chunk, self.generated))
            yield data, chunk
            if any(_has_output(choice) for choice in chunk.get("choices") or []):
                self.generated += 1
                if not _account(self.controller, self.ticket, self.generated):
                    self.stopped = True
                    return

    async def close(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            if self.events is not None:
                await self.events.aclose()
        finally:
            self.controller.release(self.ticket)


# ---- the app ---------------------------------------------------------------------------------

def create_gateway(model: UpstreamModel, controller: UpstreamTrafficController,
                   on_response: Optional[Callable[[], None]] = None) -> FastAPI:
    """The app in front of ``model.upstream``; ``on_response`` as for ``create_app``."""
    from prometheus_client import Gauge

    app = FastAPI(title="memwarden gateway", docs_url=None, redoc_url=None)
    metrics = Metrics(controller)
    app.state.model, app.state.controller, app.state.metrics = model, controller, metrics
    refuse_invalid_requests(app)
    upstream, poller = model.upstream, model.poller
    gauges = {name: Gauge(f"memwarden:upstream_{name}", f"The upstream's vllm:{name} at the last read",
                          registry=metrics.registry)
              for name in ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting",
                           "num_preemptions_total")}
    up = Gauge("memwarden:upstream_up", "1 when the last read of the upstream's /metrics succeeded",
               registry=metrics.registry)
    # acquire() blocks while a request queues: threads of their own for every queued request
    # and a few deciding, so a full queue never starves the shared thread pool
    admitting = anyio.CapacityLimiter(controller.config.admission.queue_limit + _DECIDING_THREADS)

    @app.get("/healthz")
    async def healthz():
        problem = await upstream.health()
        if problem is not None:
            return JSONResponse({"status": "upstream_unreachable", "upstream": upstream.url, "reason": problem},
                                status_code=503)
        return {"status": "ok", "model": model.name, "upstream": upstream.url}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model.card]}

    @app.get("/memory_stats")
    def memory_stats():
        return {**controller.memory_stats(), "kv_budget_source": model.budget_source,
                "upstream": {"url": upstream.url, **poller.latest.as_dict(), "read_seconds_ago": poller.age(),
                             "problem": poller.problem}}

    @app.get("/metrics")
    def prometheus():
        for name, gauge in gauges.items():
            value = getattr(poller.latest, name)
            if value is not None:
                gauge.set(value)
        up.set(0 if poller.problem else 1)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: GatewayCompletionRequest, x_session_id: Optional[str] = Header(None)):
        if isinstance(body.prompt, list) and len(body.prompt) > 1 and not isinstance(body.prompt[0], int):
            return error_response(400, "prompt: the gateway admits one prompt per request, got "
                                  f"{len(body.prompt)}", param="prompt")
        return await _serve(body, "/v1/completions", body.max_tokens or _COMPLETION_DEFAULT_TOKENS, x_session_id,
                            chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: GatewayChatRequest, x_session_id: Optional[str] = Header(None)):
        return await _serve(body, "/v1/chat/completions", body.output_limit(), x_session_id, chat=True)

    async def _serve(body, path: str, wanted: Optional[int], session_id: Optional[str], chat: bool):
        if body.model is not None and body.model != model.name:
            return unknown_model(body.model, model.name)
        payload = body.model_dump(exclude_unset=True)
        prompt_tokens = await _prompt_tokens(model, payload, chat)
        room = model.max_context - prompt_tokens if model.max_context else MAX_TOKENS_LIMIT
        if room < 1:
            return context_exceeded(prompt_tokens, model.max_context, chat)
        try:
            ticket = await anyio.to_thread.run_sync(controller.acquire, session_id, prompt_tokens,
                                                    min(wanted or room, room), body.temperature, body.top_p,
                                                    limiter=admitting)
        except Rejected as e:
            return refusal_response(e, metrics)
        admitted = _Admitted(controller, ticket)
        headers, info = admission_notice(ticket, metrics)
        paced = not body.stream and _paced_whole(controller)
        assembled = not body.stream and not paced and _assembles(payload, chat, controller.admission.policy)
        forward = _forwarded(payload, ticket, model.name, stream=body.stream or assembled)
        try:
            if body.stream:
                admitted.events = await upstream.events(path, forward)
                wants_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
                # the background close also releases a stream whose body never started
                return StreamingResponse(_relay(admitted, wants_usage, chat), media_type="text/event-stream",
                                         headers=headers, background=BackgroundTask(admitted.close))
            if assembled:
                admitted.events = await upstream.events(path, forward)
                answer = await _assemble(admitted, chat)
            else:
                if paced:
                    controller.pace(ticket)
                answer = await upstream.complete(path, forward)
                # no usage: count the most it may have made, so the estimate errs on the safe side
                generated = _completion_tokens(answer, ticket.max_tokens)
                if paced:
                    controller.paced(ticket, generated)
                else:
                    _account(controller, ticket, generated)
        except UpstreamError as e:
            await admitted.close()
            return upstream_error_response(e)
        except BaseException:
            await admitted.close()
            raise
        await admitted.close()
        if on_response is not None:
            on_response()
        return JSONResponse({**answer, "memwarden": info}, headers=headers)

    async def _relay(admitted: _Admitted, wants_usage: bool, chat: bool):
        head, ending = {}, "data: [DONE]\n\n"
        try:
            async for data, chunk in admitted.chunks():
                head = _head(chunk) or head
                if chunk.get("usage") and not chunk.get("choices") and not wants_usage:
                    continue  # the usage chunk the gateway asked for, not the client
                yield sse_data(data)
            if admitted.stopped:  # no room for more: the client learns why it ends here
                ending = sse_event({**head, "choices": [_length_finish(chat)]}) + ending
        except UpstreamError as e:
            ending = sse_event({"error": {"message": e.message, "type": "upstream_error", "code": e.reason}}) + ending
        except BaseException:  # the client left: the upstream's request is aborted too
            await admitted.close()
            raise
        # released before the last event: a client that sends its next request at once finds the room
        await admitted.close()
        if on_response is not None:
            on_response()
        yield ending

    return app


def _length_finish(chat: bool) -> dict:
    done = {"index": 0, "finish_reason": "length"}
    return {**done, "delta": {}} if chat else {**done, "text": "", "logprobs": None}


async def _assemble(admitted: _Admitted, chat: bool) -> dict:
    """The whole answer the upstream would have sent for the request it streams to
    ``admitted``: one choice with the chunks' text joined (a chat's ``content``, and
    vLLM's ``reasoning`` where its reasoning parser sends one), the finish of the last chunk
    that has one (``length`` where the controller stopped it) and the usage chunk's
    usage. A stream that breaks after its first chunk is a 502, whatever broke it: the
    client asked for one answer and it is half made."""
    head, joined, finish, usage, began = {}, {}, {}, None, False
    try:
        async for _, chunk in admitted.chunks():
            began = True
            head = _head(chunk) or head
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                pieces = (choice.get("delta") or {}) if chat else {"text": choice.get("text")}
                for key, piece in pieces.items():
                    if key != "role" and isinstance(piece, str):
                        joined.setdefault(key, []).append(piece)
                if choice.get("finish_reason") is not None:  # vLLM's stop_reason comes with it
                    finish = {key: choice[key] for key in ("finish_reason", "stop_reason") if key in choice}
    except UpstreamError as e:
        if not began:
            raise
        raise UpstreamError(502, e.reason, f"{e.message} (after {admitted.generated} output tokens)") from None
    if admitted.stopped:
        finish = {"finish_reason": "length"}
    if usage is None:  # stopped before the usage chunk (or an upstream that sends none): the gateway's count
        prompt = admitted.ticket.prompt_tokens
        usage = {"prompt_tokens": prompt, "completion_tokens": admitted.generated,
                 "total_tokens": prompt + admitted.generated}
    texts = {key: "".join(pieces) for key, pieces in joined.items()}
    choice = {"message": {"role": "assistant", "content": "", **texts}} if chat else {"text": "", **texts}
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": None, **finish}], "usage": usage}


def _forwarded(payload: dict, ticket: Ticket, name: str, stream: bool) -> dict:
    """The client's request as the upstream gets it: the served name, the controller's
    output limit and sampling caps, and for a ``stream`` (the client's, or the one a whole
    answer is assembled from) its usage asked for."""
    forward = {**payload, "model": name}
    for key in [k for k in ("max_tokens", "max_completion_tokens") if k in payload] or ["max_tokens"]:
        forward[key] = ticket.max_tokens
    for key in ("temperature", "top_p"):
        value = getattr(ticket.applied, key)
        if value is not None:
            forward[key] = value
    if stream:
        forward["stream"] = True
        forward["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    return forward
