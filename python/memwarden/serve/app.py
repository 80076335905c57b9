"""The FastAPI app: every request goes through the ``TrafficController``
(:mod:`memwarden.controller.traffic`) -- admission, sessions (``X-Session-ID`` header),
degradation -- before the engine generates it. OpenAI-compatible ``/v1/completions`` and
``/v1/chat/completions`` (server-sent events with ``"stream": true``), ``/v1/models``,
``/memory_stats`` (the seed's keys, and ``models``: each model's state), ``/healthz`` and
Prometheus ``/metrics``. A request names its model (``model``; none: the first); the
:class:`~memwarden.serve.pool.ModelPool` loads it, swapping others out, and holds it while
the request generates.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): 400 for
malformed JSON, unknown fields or out-of-range values (the message names the field) and
for prompts longer than the model's context; 429 when a session limit refuses a request,
503 when the pool is full, both with ``Retry-After``; 404 for a model not served here;
503 when the request's model cannot be loaded (``model_load_timeout``, ``out_of_memory``).
A degraded response says so in its ``memwarden`` field and the ``X-Memwarden-Degraded``
header. Tests drive it on loopback with the official ``openai`` client.

May import: fastapi, :mod:`memwarden.controller`, :mod:`memwarden.serve.metrics`,
:mod:`memwarden.serve.schemas`, :mod:`memwarden.serve.engine`, :mod:`memwarden.serve.pool`
(the last two, and torch, only in :func:`create_app`: the gateway shares the helpers without
them) and the layers below the controller. Never :mod:`memwarden.cli`.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from typing import TYPE_CHECKING, Callable, Optional

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from memwarden.controller.traffic import PREEMPTED, STOP, Rejected, Routed, Ticket, TrafficController
from memwarden.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from memwarden.serve.schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:  # the engine imports torch; the gateway shares this module without it
    from memwarden.serve.engine import Engine
    from memwarden.serve.pool import ModelPool

__all__ = ["admission_notice", "context_exceeded", "create_app", "error_response", "refusal_response",
           "refuse_invalid_requests", "retry_after_header", "sse_data", "sse_event", "unknown_model",
           "upstream_error_response"]


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    """An OpenAI-shaped error."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def retry_after_header(seconds: Optional[float]) -> Optional[dict]:
    """``{"Retry-After": whole seconds, at least 1}``; None when waiting cannot help."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))} if seconds is not None else None


def refusal_response(refused: Rejected, metrics: Metrics) -> JSONResponse:
    """The controller's refusal (429 or 503), counted in the metrics."""
    metrics.observe("reject", refused.reason)
    return error_response(refused.status, refused.message,
                          kind="server_overloaded" if refused.status == 503 else "rate_limit_exceeded",
                          code=refused.reason, headers=retry_after_header(refused.retry_after))


def upstream_error_response(exc) -> JSONResponse:
    """The OpenAI-shaped error for a :class:`memwarden.serve.upstream.UpstreamError`."""
    kind = "upstream_error" if exc.status >= 500 else "invalid_request_error"
    return error_response(exc.status, exc.message, kind=kind, code=exc.reason,
                          headers=retry_after_header(exc.retry_after))


def sse_data(data: str) -> str:
    return f"data: {data}\n\n"


def sse_event(payload: dict) -> str:
    return sse_data(json.dumps(payload))


def unknown_model(asked: str, served) -> JSONResponse:
    """404 for a model not served here; ``served``: the name, or the names, that are."""
    listed = repr(served) if isinstance(served, str) else ", ".join(map(repr, served))
    return error_response(404, f"model {asked!r} is not served here; /v1/models lists {listed}", param="model",
                          code="model_not_found")


def context_exceeded(prompt_tokens: int, context: int, chat: bool) -> JSONResponse:
    return error_response(400, f"the prompt has {prompt_tokens} tokens; the model's context is {context}",
                          param="messages" if chat else "prompt", code="context_length_exceeded")


def admission_notice(ticket: Ticket, metrics: Metrics) -> tuple[dict, dict]:
    """(headers, the response's ``memwarden`` field) saying how the request was admitted
    and whether it was degraded; the decision is counted in the metrics."""
    applied = ticket.applied
    degraded = applied.degraded or ticket.decision.verdict == "shrink"
    metrics.observe(ticket.decision.verdict, ticket.decision.reason, applied.level if degraded else None)
    headers = {"X-Memwarden-Degraded": applied.level} if degraded else {}
    info = {"degraded": degraded, "level": applied.level, "max_tokens": ticket.max_tokens,
            "admission": ticket.decision.verdict}
    return headers, info


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(where) or None
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg')}", None
    return (f"{field}: {first.get('msg')}" if field else str(first.get("msg"))), field


def device_memory() -> dict:
    """GPU memory per device when there is one, else the host's (psutil)."""
    import torch

    if torch.cuda.is_available():
        gpus = {}
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus[f"cuda:{i}"] = {"total_mb": total / 2**20, "free_mb": free / 2**20, "used_mb": (total - free) / 2**20}
        used = sum(g["used_mb"] for g in gpus.values())
        total = sum(g["total_mb"] for g in gpus.values())
        return {"gpu_memory": gpus, "gpu_usage": used / total if total else 0.0,
                "gpu_free_mb": sum(g["free_mb"] for g in gpus.values())}
    import psutil

    vm = psutil.virtual_memory()
    return {"gpu_memory": {}, "gpu_usage": None, "gpu_free_mb": None,
            "host_memory": {"total_mb": vm.total / 2**20, "available_mb": vm.available / 2**20,
                            "used_perc": vm.percent / 100}}


def refuse_invalid_requests(app: FastAPI) -> None:
    """Malformed JSON, unknown fields and out-of-range values: a 400 naming the field."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        message, field = _validation_message(exc)
        return error_response(400, message, param=field)


def create_app(pool: "ModelPool", controller: TrafficController, on_response: Optional[Callable[[], None]] = None):
    """The app over a pool of models and one controller; ``on_response`` is called after
    every completed response (the CLI counts them to stop after ``--max-requests``)."""
    import torch

    from memwarden.serve.pool import ModelUnavailable

    app = FastAPI(title="memwarden", docs_url=None, redoc_url=None)
    metrics = Metrics(controller, pool)
    engine = pool.engine(pool.default)
    app.state.pool, app.state.engine, app.state.controller, app.state.metrics = pool, engine, controller, metrics
    refuse_invalid_requests(app)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": pool.engine(name).created,
                                             "owned_by": "memwarden"} for name in pool.names]}

    @app.get("/memory_stats")
    def memory_stats():
        return {**controller.memory_stats(), **device_memory(), **pool.stats()}

    @app.get("/metrics")
    def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def _engine_for(body) -> Optional["Engine"]:
        name = pool.default if body.model is None else body.model
        return pool.engine(name) if name in pool.names else None

    @app.post("/v1/completions")
    def completions(body: CompletionRequest, x_session_id: Optional[str] = Header(None)):
        engine = _engine_for(body)
        if engine is None:
            return unknown_model(body.model, pool.names)
        return _serve(body, engine, engine.encode_prompt(body.text()), body.max_tokens, x_session_id, chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest, x_session_id: Optional[str] = Header(None)):
        engine = _engine_for(body)
        if engine is None:
            return unknown_model(body.model, pool.names)
        prompt = engine.encode_chat([m.model_dump(exclude_none=True) for m in body.messages])
        return _serve(body, engine, prompt, body.output_limit(), x_session_id, chat=True)

    def _serve(body, engine: "Engine", prompt: list[int], max_tokens: int, session_id: Optional[str], chat: bool):
        biases = body.token_biases()
        unknown = [token for token in biases if token >= engine.vocab_size]
        if unknown:
            return error_response(400, f"logit_bias: token {unknown[0]} is not in the vocabulary of {engine.vocab_size}",
                                  param="logit_bias")
        room = engine.max_context - len(prompt)
        if room < 1:
            return context_exceeded(len(prompt), engine.max_context, chat)
        try:
            hold = pool.hold(engine.name)
        except ModelUnavailable as e:
            return error_response(503, e.message, kind="server_overloaded", param="model", code=e.reason,
                                  headers=retry_after_header(e.retry_after))
        try:
            ticket = controller.acquire(session_id, len(prompt), min(max_tokens, room), body.temperature, body.top_p)
        except Rejected as e:
            hold.release()
            return refusal_response(e, metrics)
        except Routed as routed:
            hold.release()
            metrics.observe("route", routed.decision.reason)
            return _route(body, routed.url, chat)
        steps = _Steps(engine, controller, ticket, prompt, body.seed, biases, hold)  # releases both when closed
        try:
            return _respond(body, engine, steps, ticket, prompt, chat)
        except torch.OutOfMemoryError as e:  # the device ran out during the forward (a policy that overfills it)
            steps.close()
            return error_response(503, f"out of device memory while generating: {str(e).splitlines()[0]}",
                                  kind="server_overloaded", code="out_of_memory")
        except BaseException:
            steps.close()
            raise

    routes = app.state.routes = {}  # upstream url -> its client, made at the first request routed there

    def _route(body, url: str, chat: bool):
        """The request as asked, answered by the pool at ``url`` (streams relayed event by
        event); its ``model`` is left to that pool, which may name it otherwise."""
        import anyio

        from memwarden.serve.upstream import Upstream, UpstreamError

        server = controller.config.server
        upstream = routes.get(url) or routes.setdefault(url, Upstream(url, server.upstream_timeout,
                                                                      server.upstream_connect_timeout))
        path = "/v1/chat/completions" if chat else "/v1/completions"
        payload = body.model_dump(exclude_none=True, exclude={"model"})
        headers = {"X-Memwarden-Routed": url}
        try:
            if not body.stream:
                answer = anyio.from_thread.run(upstream.complete, path, payload)
                if on_response is not None:
                    on_response()
                return JSONResponse(answer, headers=headers)
            events = anyio.from_thread.run(upstream.events, path, payload)
        except UpstreamError as e:
            return upstream_error_response(e)

        async def relay():
            try:
                async for data, _ in events.chunks():
                    yield sse_data(data)
            except UpstreamError as e:
                yield sse_event({"error": {"message": e.message, "type": "upstream_error", "code": e.reason}})
            finally:
                await events.aclose()
            if on_response is not None:
                on_response()
            yield "data: [DONE]\n\n"

        return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)

    def _respond(body, engine: "Engine", steps: "_Steps", ticket: Ticket, prompt: list[int], chat: bool):
        headers, info = admission_notice(ticket, metrics)
        response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            # the background close also releases a stream whose body never started
            return StreamingResponse(_sse(steps, ticket, response_id, created, engine.name, chat, info, on_response),
                                     media_type="text/event-stream", headers=headers,
                                     background=BackgroundTask(steps.close))
        try:
            text = "".join(steps)
        finally:
            steps.close()
        finish = _finish_reason(ticket)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": ticket.generated,
                 "total_tokens": len(prompt) + ticket.generated}
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
                  else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        if on_response is not None:
            on_response()
        return JSONResponse({"id": response_id, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": engine.name, "choices": [choice], "usage": usage,
                             "memwarden": info}, headers=headers)

    return app


def _finish_reason(ticket: Ticket) -> str:
    return "length" if ticket.generated >= ticket.max_tokens or ticket.cut_short else "stop"


class _Steps:
    """The request's text pieces; its reservation and its hold on the model go back however
    they end (done, client gone, an error), and on :meth:`close` even if they never started."""

    def __init__(self, engine: "Engine", controller: TrafficController, ticket: Ticket, prompt: list[int], seed,
                 logit_bias: dict[int, float], hold):
        self._controller, self._ticket, self._hold, self._released = controller, ticket, hold, False
        self._pieces = _pieces(engine, controller, ticket, prompt, seed, logit_bias)

    def __iter__(self):
        try:
            yield from self._pieces
        finally:
            self.close()

    def close(self) -> None:
        self._pieces.close()
        if not self._released:
            self._released = True
            self._controller.release(self._ticket)
            self._hold.release()


def _pieces(engine: Engine, controller: TrafficController, ticket: Ticket, prompt: list[int], seed, logit_bias):
    """The request's text; a preempted request drops its cache, waits to be admitted again
    and recomputes what it had generated (vLLM's recompute), so its text goes on."""
    applied = ticket.applied
    produced: list[int] = []
    shown = 0  # characters yielded
    while True:
        steps = engine.generate(prompt, ticket.max_tokens, applied.temperature, applied.top_p, seed, logit_bias,
                                output=produced, shown=shown)
        try:
            for step in steps:
                if step.token is not None:
                    produced.append(step.token)
                    verdict = controller.progress(ticket, len(produced))
                    if verdict == STOP:  # no room for more output: stop here
                        return
                    if verdict == PREEMPTED:
                        break
                shown += len(step.text)
                yield step.text
            else:
                return
        finally:
            steps.close()  # frees its cache before the request waits
        if len(produced) >= ticket.max_tokens or not controller.resume(ticket, len(produced)):
            return


def _sse(steps, ticket: Ticket, response_id: str, created: int, model: str, chat: bool, info: dict, on_response):
    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": response_id, "object": kind, "created": created, "model": model}
    try:
        if chat:
            yield event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
        for text in steps:
            if not text:
                continue
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": None} if chat
                      else {"index": 0, "text": text, "logprobs": None, "finish_reason": None})
            yield event({**head, "choices": [choice]})
        done = {"index": 0, "finish_reason": _finish_reason(ticket)}
        final = {**done, "delta": {}} if chat else {**done, "text": "", "logprobs": None}
        yield event({**head, "choices": [final], "memwarden": info})
        yield "data: [DONE]\n\n"
    finally:
        steps.close()
        if on_response is not None:
            on_response()
