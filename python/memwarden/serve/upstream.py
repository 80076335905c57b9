"""The client of an upstream OpenAI-compatible engine (vLLM) that ``memwarden serve
--upstream URL`` admits requests for: forwarding a request (whole, or as its server-sent
events), counting a prompt's tokens with the upstream's ``/tokenize``, reading its
Prometheus ``/metrics`` (parsed with ``prometheus_client.parser``) once or every
``poll_interval`` seconds from a thread, and mapping what goes wrong to an
:class:`UpstreamError` the gateway answers with:

* the upstream cannot be reached (connection refused, a connect timeout): **503**
  ``upstream_unreachable``, ``Retry-After`` 1 s;
* it refuses or is overloaded (429, 503): **503** ``upstream_overloaded``, passing its
  ``Retry-After`` (1 s when it gives none);
* it answers 4xx (a prompt past its context, a parameter it refuses): the same status and
  its own message, reason ``upstream_rejected`` -- the client's request, not the upstream,
  is at fault;
* any other status, or a body that is not the JSON it should be: **502**
  ``upstream_error`` / ``upstream_bad_response``;
* no response within ``timeout`` (for a stream: no next chunk): **504** ``upstream_timeout``.

Every call has a timeout: ``connect_timeout`` to connect (and for the whole of a probe:
``/tokenize``, ``/metrics``, ``/health``, ``/v1/models``), ``timeout`` to wait for a
response. The HTTP client is httpx2 (what ``openai`` itself uses; httpx's API).

vLLM's metrics read here: ``vllm:cache_config_info`` (its labels carry ``num_gpu_blocks``
and ``block_size``: the KV budget), ``vllm:kv_cache_usage_perc`` (``gpu_cache_usage_perc``
before vLLM 0.10),
``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and
``vllm:num_preemptions_total``; with several engines (data parallel) blocks, requests and
preemptions are summed and the usage is the highest engine's.

May import: httpx2 (and anyio, which it runs on), prometheus_client and the bottom layers.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

import anyio
import httpx2 as httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["EngineMetrics", "MetricsPoller", "Upstream", "UpstreamError", "parse_metrics"]

_DEFAULT_RETRY_AFTER = 1.0  # seconds, when an overloaded upstream names none
_KEEP_ALIVE_S = 2.0  # seconds an idle connection to the upstream is kept for reuse
_CONNECT_RETRIES = 2
_DRAIN_SECONDS = 1.0  # after [DONE], the most a stream waits for its body's end


class UpstreamError(Exception):
    """What the gateway answers when the upstream fails: ``status`` (4xx passed on, 502,
    503 or 504), ``reason`` (a short machine word), ``retry_after`` seconds or None."""

    def __init__(self, status: int, reason: str, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.retry_after = status, reason, message, retry_after


def _transport_error(exc: httpx.HTTPError, url: str) -> UpstreamError:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return UpstreamError(503, "upstream_unreachable", f"the upstream {url} cannot be reached: {exc}",
                             _DEFAULT_RETRY_AFTER)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(504, "upstream_timeout", f"the upstream {url} did not answer in time ({exc})")
    return UpstreamError(502, "upstream_error", f"the upstream {url} broke the connection: {exc!r}")


def _status_error(status: int, body: bytes, retry_after: Optional[str], url: str) -> UpstreamError:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", errors="replace")
    if status in (429, 503):
        try:
            wait = float(retry_after) if retry_after is not None else _DEFAULT_RETRY_AFTER
        except ValueError:  # an HTTP date: retry soon rather than parse it
            wait = _DEFAULT_RETRY_AFTER
        return UpstreamError(503, "upstream_overloaded", f"the upstream {url} is overloaded ({status}): {message}",
                             wait)
    if 400 <= status < 500:
        return UpstreamError(status, "upstream_rejected", f"the upstream refused the request: {message}")
    return UpstreamError(502, "upstream_error", f"the upstream {url} failed ({status}): {message}")


def _bad_response(url: str, what: str) -> UpstreamError:
    return UpstreamError(502, "upstream_bad_response", f"the upstream {url} sent {what}")


# ---- metrics --------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineMetrics:
    """One read of the upstream's ``/metrics`` (None: the engine does not export it)."""

    kv_cache_usage_perc: Optional[float] = None
    num_requests_running: Optional[int] = None
    num_requests_waiting: Optional[int] = None
    num_preemptions_total: Optional[int] = None
    num_gpu_blocks: Optional[int] = None
    block_size: Optional[int] = None
    cache_dtype: Optional[str] = None  # vLLM's kv_cache_dtype: "auto", "fp8", ...
    # vllm:time_to_first_token_seconds, a histogram: its sum (seconds) and count so far
    first_token_seconds_sum: Optional[float] = None
    first_token_count: Optional[int] = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def parse_metrics(text: str) -> EngineMetrics:
    """vLLM's metrics (see the module doc) out of Prometheus text; ValueError when the
    text is not Prometheus' format."""
    values: dict[str, list] = {}
    config_labels: list[dict] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:cache_config_info":
                config_labels.append(sample.labels)
            else:
                values.setdefault(sample.name, []).append(sample.value)

    def total(name: str) -> Optional[int]:
        return int(sum(values[name])) if name in values else None

    def label_total(label: str) -> Optional[int]:
        found = [int(labels[label]) for labels in config_labels if str(labels.get(label, "")).isdigit()]
        return sum(found) if found else None

    # vLLM before 0.10 named it gpu_cache_usage_perc
    usage = values.get("vllm:kv_cache_usage_perc") or values.get("vllm:gpu_cache_usage_perc")
    sizes = {labels["block_size"] for labels in config_labels if str(labels.get("block_size", "")).isdigit()}
    return EngineMetrics(
        kv_cache_usage_perc=max(usage) if usage else None,
        num_requests_running=total("vllm:num_requests_running"),
        num_requests_waiting=total("vllm:num_requests_waiting"),
        num_preemptions_total=total("vllm:num_preemptions_total"),
        num_gpu_blocks=label_total("num_gpu_blocks"),
        block_size=int(sizes.pop()) if len(sizes) == 1 else None,
        cache_dtype=config_labels[0].get("cache_dtype") if config_labels else None,
        first_token_seconds_sum=(sum(values["vllm:time_to_first_token_seconds_sum"])
                                 if "vllm:time_to_first_token_seconds_sum" in values else None),
        first_token_count=total("vllm:time_to_first_token_seconds_count"))


# ---- the client ------------------------------------------------------------------------------

class Upstream:
    """One upstream at ``url``: blocking probes (start-up, the metrics thread) and async
    calls -- forwarding, ``/tokenize``, ``/health`` -- from the gateway's handlers, on
    uvicorn's event loop."""

    def __init__(self, url: str, timeout: float, connect_timeout: float):
        self.url = url.rstrip("/")
        self._probe_timeout = httpx.Timeout(connect_timeout)
        # no pool limit: admission, not the client, bounds how many requests are in flight.
        # An idle connection is dropped well before the upstream's own keep-alive timeout
        # (uvicorn's, so vLLM's, is 5 s), or a request sent on one the upstream is closing
        # fails unanswered; a failed connect is retried (nothing was sent yet): a busy
        # engine's server can be slow to accept.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64,
                              keepalive_expiry=_KEEP_ALIVE_S)
        transport = httpx.AsyncHTTPTransport(limits=limits, retries=_CONNECT_RETRIES)
        self._async = httpx.AsyncClient(base_url=self.url, transport=transport,
                                        timeout=httpx.Timeout(timeout, connect=connect_timeout))
        self._sync = httpx.Client(base_url=self.url, timeout=self._probe_timeout)
        self.has_tokenize: Optional[bool] = None  # learnt on the first /tokenize

    # -- blocking probes ---------------------------------------------------------------------

    def _get(self, path: str) -> httpx.Response:
        try:
            response = self._sync.get(path)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        if response.status_code != 200:
            raise _status_error(response.status_code, response.content, response.headers.get("retry-after"),
                                self.url)
        return response

    def served_models(self) -> list[dict]:
        """The upstream's ``/v1/models`` entries (vLLM adds ``root`` and ``max_model_len``)."""
        try:
            models = self._get("/v1/models").json()["data"]
        except (ValueError, KeyError, TypeError):
            raise _bad_response(self.url, "a /v1/models that is not an OpenAI model list") from None
        if not models or not all(isinstance(entry, dict) and "id" in entry for entry in models):
            raise _bad_response(self.url, f"a /v1/models without model ids: {models!r:.200}")
        return models

    def metrics(self) -> EngineMetrics:
        try:
            return parse_metrics(self._get("/metrics").text)
        except ValueError as exc:
            raise _bad_response(self.url, f"a /metrics that is not Prometheus text ({exc})") from None

    # -- forwarding ----------------------------------------------------------------------------

    async def _send(self, path: str, payload: dict, stream: bool, timeout=httpx.USE_CLIENT_DEFAULT) -> httpx.Response:
        request = self._async.build_request("POST", path, json=payload, timeout=timeout)
        try:
            response = await self._async.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        if response.status_code != 200:
            try:
                body = await response.aread()
            except httpx.HTTPError:
                body = b""
            finally:
                await response.aclose()
            raise _status_error(response.status_code, body, response.headers.get("retry-after"), self.url)
        return response

    async def complete(self, path: str, payload: dict) -> dict:
        """The upstream's whole JSON answer to ``payload`` at ``path``."""
        response = await self._send(path, payload, stream=False)
        try:
            answer = response.json()
        except ValueError:
            raise _bad_response(self.url, f"a {path} response that is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise _bad_response(self.url, f"a {path} response without choices")
        return answer

    async def events(self, path: str, payload: dict) -> "Events":
        """The upstream's server-sent events for ``payload`` (raises before the first one
        when the upstream refuses it or answers with something else)."""
        response = await self._send(path, payload, stream=True)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            await response.aclose()
            raise _bad_response(self.url, f"a {response.headers.get('content-type')!r} body for a stream")
        return Events(response, self.url)

    async def count_tokens(self, payload: dict) -> Optional[int]:
        """The prompt's tokens by the upstream's ``/tokenize`` (``{"prompt"}`` or
        ``{"messages"}``); None when it has none or the probe fails (the caller estimates)."""
        if self.has_tokenize is False:
            return None
        try:
            response = await self._send("/tokenize", payload, stream=False, timeout=self._probe_timeout)
            count = response.json()["count"]
        except UpstreamError as exc:
            if exc.status in (404, 405):
                self.has_tokenize = False
            return None
        except (ValueError, KeyError, TypeError):
            return None
        self.has_tokenize = True
        return int(count)

    async def health(self) -> Optional[str]:
        """None when the upstream answers ``/health``, else what is wrong."""
        try:
            response = await self._async.get("/health", timeout=self._probe_timeout)
        except httpx.HTTPError as exc:
            return _transport_error(exc, self.url).message
        if response.status_code != 200:
            return _status_error(response.status_code, response.content, None, self.url).message
        return None

    def close(self) -> None:
        self._sync.close()


class Events:
    """An upstream stream: :meth:`chunks` yields each event as it arrives; :meth:`aclose`
    ends it (an unfinished one aborts the request upstream)."""

    def __init__(self, response: httpx.Response, url: str):
        self._response, self._url = response, url

    async def chunks(self) -> AsyncIterator[tuple[str, dict]]:
        """(the event's data as sent, parsed) up to ``[DONE]``; raises :class:`UpstreamError`
        when the stream breaks, sends something that is not JSON, or ends before ``[DONE]``."""
        try:
            lines = self._response.aiter_lines()
            async for line in lines:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    await self._drain(lines)
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise _bad_response(self._url, "an event that is not JSON") from None
                if not isinstance(chunk, dict):
                    raise _bad_response(self._url, f"an event that is not a JSON object: {data[:80]}")
                yield data, chunk
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self._url) from None
        raise _bad_response(self._url, "a stream that ended before [DONE]")

    async def _drain(self, lines: AsyncIterator[str]) -> None:
        """Read the body to its end, which the engine sends right after ``[DONE]``: a
        response read to the end leaves its connection in the pool for the next request,
        one closed before it takes its connection down (a new one for every stream)."""
        with anyio.move_on_after(_DRAIN_SECONDS):
            try:
                async for _ in lines:
                    pass
            except httpx.HTTPError:
                pass  # the answer is whole already; the connection just is not reused

    async def aclose(self) -> None:
        await self._response.aclose()


class MetricsPoller:
    """Reads the upstream's ``/metrics`` every ``interval`` seconds in a daemon thread;
    :attr:`latest` is the last good read, :attr:`problem` why the last one failed (None
    when it did not); ``on_read(metrics)`` is called after every good read."""

    def __init__(self, upstream: Upstream, interval: float, first: EngineMetrics,
                 on_read: Optional[Callable[[EngineMetrics], None]] = None):
        self.upstream, self.interval, self.on_read = upstream, interval, on_read
        self.latest, self.problem, self.read_at = first, None, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memwarden-upstream-metrics")

    def start(self) -> "MetricsPoller":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                metrics = self.upstream.metrics()
            except UpstreamError as exc:
                self.problem = exc.message
                continue
            self.latest, self.problem, self.read_at = metrics, None, time.monotonic()
            if self.on_read is not None:
                self.on_read(metrics)

    def age(self) -> float:
        """Seconds since the last good read."""
        return time.monotonic() - self.read_at

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + 1)

