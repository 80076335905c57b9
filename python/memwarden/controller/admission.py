"""Admission: for each request, accept it, shrink its ``max_tokens``, route it to another
model or device, queue it or reject it -- from the KV bytes of its prompt plus output
against what the running requests leave free in the budget. Returns a small
:class:`Decision` (verdict, reason, granted tokens and the byte figures behind it); it
never raises for a request that does not fit (only for malformed arguments).

The caller prices KV: ``bytes_per_token`` is what one token costs in the cache's dtype
over all layers, taken from :mod:`memwarden.footprint` -- never re-derived here. All
accounting is in whole tokens times ``bytes_per_token``, so sums are exact.

Lifecycle of a request (every request ends in exactly one terminal state)::

    admit() -+- accept/shrink --> running -+- finish() ----------------> finished
             |                             +- preempt() ---------------> preempted
             +- queue ----------> queued --+- admitted from the head --> running
             |                             +- queue_timeout, session --> rejected
             |                             +- finish() (cancelled) ----> finished
             +- reject ------------------------------------------------> rejected
             +- route -------------------------------------------------> routed

A preempted request's bytes are released; the caller recomputes or swaps it and may
``resume()`` it (admitted ahead of the queue) or ``admit()`` it again under the same id.

Policies (``policy=``):

* ``admit_all`` -- accept everything at its full ``max_tokens``, reason ``"admit_all"``;
  reservations are counted but never checked. The baseline that runs out of memory.
* ``reserve`` (TGI-style) -- reserve ``(prompt + max_tokens) * bytes_per_token`` up
  front. A request that does not fit now but would fit in an empty pool is queued; one
  that can never fit is rejected: ``prompt_too_long`` when not even the prompt plus one
  token fits, ``exceeds_budget`` when the prompt fits but not with its ``max_tokens``.
  Safe, but reserves for outputs that mostly stop early.
* ``optimistic`` (vLLM-style) -- admit when the prompt plus one token fits in what the
  running requests actually *use* (prompt plus tokens generated so far, reported through
  :meth:`AdmissionController.on_tokens`), not what they may grow to. The running set can
  outgrow the budget; when the KV cache runs out the caller calls
  :meth:`~AdmissionController.preempt`, which gives up the newest running request.
* ``memwarden`` (default) -- reserve the prompt plus an *estimated* output length: the
  ``output_quantile`` (0.9) of the output lengths of the last 512 finished requests,
  ``max_tokens`` until ``warmup_samples`` have finished, capped by ``max_tokens`` and at
  least ``min_output_tokens``. The request is still granted its full ``max_tokens``; when
  it would grow past its reservation the caller asks :meth:`~AdmissionController.extend`
  for more, and when that returns ``False`` (no room) the caller stops the request there
  (its output is cut short) or preempts it. When the estimate does not fit now,
  ``max_tokens`` is shrunk to what fits (verdict ``"shrink"``), never below
  ``min_output_tokens`` -- below that the request queues (``exceeds_budget`` when the
  prompt plus ``min_output_tokens`` could never fit). With ``route_above_tokens``,
  prompts longer than that, and requests that could never fit here, are routed elsewhere
  (verdict ``"route"``, reason ``"too_large_routed"``). Compared with ``reserve`` it
  admits more requests at once (reservations follow real output lengths); compared with
  ``optimistic`` it never overcommits, so it needs no preemption.
* ``lookahead`` -- for an engine that batches continuously (vLLM: every running request
  gains a token per step): reserve ``prompt + max_tokens`` like ``reserve``, but admit
  when the *projected peak* fits, not the sum of reservations. Running request ``i`` holds
  ``u_i`` tokens (prompt and output so far) and has ``r_i`` to go; ``t`` steps from now it
  holds ``u_i + t`` if ``t <= r_i``, else nothing (it has finished), so the pool will hold
  ``U(t) = sum over {i: r_i >= t} of (u_i + t)``, largest just before a request finishes:
  the peak is ``max_k U(r_k)``, computed over the requests sorted by ``r`` (O(n log n)).
  A request is admitted when the peak with it stays within the budget: a long request
  finishing soon leaves room that ``reserve`` would keep for it until the end. With
  ``block_tokens=B`` every request is counted in whole blocks, as a paged engine allocates
  them: exactly (O(n^2)) up to 64 running requests, beyond by the bound of ``B - 1``
  tokens more each (the most rounding can add). Rejects and queues like
  ``reserve``. The projection trusts the engine to advance the running requests together;
  one that stalls (a slow client) while others finish can make the real peak higher.

For ``reserve`` and ``memwarden`` the sum of reservations never exceeds ``budget_bytes``
(unless :meth:`~AdmissionController.extend` is forced); for ``lookahead`` the projected
peak never does.

Queueing is strict FIFO: while requests wait, new arrivals queue behind them (reason
``"behind_queue"``) even if they would fit, so none is overtaken; :meth:`finish` (and
:meth:`expire_queue`) admit from the head while the head fits. ``queue_limit`` bounds the
queue of newcomers (a request that finds it full is rejected ``"queue_full"``; a resumed
one waits at the head regardless; with ``queue_limit=0``
nothing queues and a request that does not fit now is rejected ``"pool_full"``). A
request waiting ``queue_timeout`` seconds (by ``clock``, which must be monotonic) is
rejected ``"queue_timeout"``.

``session_check(session_id, nbytes) -> (ok, reason)``, when given, is asked about every
request with a ``session_id`` before it is accepted, shrunk or queued (``nbytes``: what it
would reserve); a refusal rejects it with the returned reason (``"session_limit"`` when
empty). It must not change state: :meth:`check_admission` calls it too.

``retry_after`` (seconds): for a queued request ``queue_timeout`` (by then it is running or
rejected); for a rejection that can clear (``pool_full``, ``queue_full``,
``queue_timeout``, session limits) the mean time requests have been running (1 s until
one finishes); ``None`` when retrying cannot help.

Thread-safe: one lock around every method. Every decision is O(1) in the number of
running requests (``lookahead``: O(n log n)). Pure Python, no torch.

May import: :mod:`memwarden.controller.sessions`, :mod:`~memwarden.controller.degradation`,
:mod:`memwarden.estimate`, :mod:`memwarden.footprint` and the bottom layers. Never
:mod:`memwarden.serve` or :mod:`memwarden.cli`.
"""
from __future__ import annotations

import bisect
import collections
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable

from memwarden._checks import integer
from memwarden._units import format_bytes, parse_bytes

__all__ = ["POLICIES", "VERDICTS", "Request", "Decision", "AdmissionController"]

POLICIES = ("admit_all", "reserve", "optimistic", "memwarden", "lookahead")
VERDICTS = ("accept", "shrink", "route", "reject", "queue")

_SAMPLE_WINDOW = 512  # finished requests the output-length estimate looks back over
_SERVICE_TIME_WEIGHT = 0.1  # exponential moving average weight of the newest service time
_DEFAULT_RETRY_AFTER = 1.0  # seconds, until a request has finished
_EXACT_BLOCKS_UP_TO = 64  # running requests whose blocks lookahead counts exactly (O(n^2))


def _seconds(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Request:
    """A generation request: ``prompt_tokens`` in, up to ``max_tokens`` out.

    ``arrival`` (in ``clock`` units) is carried for the caller's latency figures; queue
    timeouts count from :meth:`AdmissionController.admit`.
    """

    request_id: Hashable
    prompt_tokens: int
    max_tokens: int
    session_id: Hashable | None = None
    arrival: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "prompt_tokens", integer(self.prompt_tokens, "prompt_tokens"))
        object.__setattr__(self, "max_tokens", integer(self.max_tokens, "max_tokens"))
        object.__setattr__(self, "arrival", _seconds(self.arrival, "arrival"))


@dataclass(frozen=True)
class Decision:
    """What admission decided for one request, and the numbers behind it.

    ``granted_max_tokens``: the output tokens the request may generate (0 unless accepted
    or shrunk). ``needed_bytes``: what the policy wants for it at its requested
    ``max_tokens``. ``free_bytes``: the budget left by the running requests when it was
    decided (never negative). ``reserved_bytes``: what this decision reserves for it (0
    unless accepted or shrunk). ``retry_after``: see the module docstring.
    """

    request_id: Hashable
    verdict: str
    reason: str
    granted_max_tokens: int
    needed_bytes: int
    free_bytes: int
    reserved_bytes: int
    retry_after: float | None = None

    @property
    def admitted(self) -> bool:
        return self.verdict in ("accept", "shrink")

    def __str__(self) -> str:
        return (f"{self.request_id}: {self.verdict} ({self.reason}), {self.granted_max_tokens} tokens, "
                f"needs {format_bytes(self.needed_bytes)}, reserves {format_bytes(self.reserved_bytes)} "
                f"of {format_bytes(self.free_bytes)} free")


class _Running:
    __slots__ = ("request", "granted", "reserved_tokens", "generated", "admitted_at")

    def __init__(self, request: Request, granted: int, reserved_tokens: int, admitted_at: float):
        self.request = request
        self.granted = granted
        self.reserved_tokens = reserved_tokens  # prompt + reserved output tokens
        self.generated = 0
        self.admitted_at = admitted_at


class AdmissionController:
    """Admits requests into a KV budget of ``budget_bytes`` (an int or ``"16GiB"``) under
    one of :data:`POLICIES`; see the module docstring for each policy and the lifecycle."""

    def __init__(self, budget_bytes, bytes_per_token: int, policy: str = "memwarden",
                 route_above_tokens: int | None = None, queue_limit: int = 64,
                 queue_timeout: float = 30.0, min_output_tokens: int = 16,
                 clock: Callable[[], float] = time.monotonic,
                 session_check: Callable[[Hashable, int], tuple[bool, str]] | None = None,
                 *, output_quantile: float = 0.9, warmup_samples: int = 32, block_tokens: int = 1):
        self._budget = parse_bytes(budget_bytes, "budget_bytes")
        if self._budget <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}")
        self._bytes_per_token = integer(bytes_per_token, "bytes_per_token")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self._policy = policy
        if route_above_tokens is not None:
            if policy != "memwarden":
                raise ValueError(f"route_above_tokens is a 'memwarden' policy option, not {policy!r}")
            route_above_tokens = integer(route_above_tokens, "route_above_tokens")
        self._route_above = route_above_tokens
        self._queue_limit = integer(queue_limit, "queue_limit", minimum=0)
        self._queue_timeout = _seconds(queue_timeout, "queue_timeout")
        if self._queue_timeout <= 0:
            raise ValueError(f"queue_timeout must be positive, got {queue_timeout!r}")
        self._min_output = integer(min_output_tokens, "min_output_tokens")
        if not callable(clock):
            raise ValueError(f"clock must be callable, got {clock!r}")
        self._clock = clock
        if session_check is not None and not callable(session_check):
            raise ValueError(f"session_check must be callable or None, got {session_check!r}")
        self._session_check = session_check
        if isinstance(output_quantile, bool) or not isinstance(output_quantile, (int, float)) \
                or not 0 < output_quantile <= 1:
            raise ValueError(f"output_quantile must be in (0, 1], got {output_quantile!r}")
        self._quantile = float(output_quantile)
        self._warmup = integer(warmup_samples, "warmup_samples", maximum=_SAMPLE_WINDOW)
        self._block_tokens = integer(block_tokens, "block_tokens")

        self._lock = threading.Lock()
        self._running: dict[Hashable, _Running] = {}  # insertion order = admission order
        self._queue: collections.OrderedDict[Hashable, tuple[Request, float, int]] = collections.OrderedDict()
        self._reserved_tokens = 0
        self._used_tokens = 0
        self._outputs = collections.deque(maxlen=_SAMPLE_WINDOW)  # arrival order, for eviction
        self._outputs_sorted: list[int] = []  # the same, sorted, for the quantile
        self._estimate: int | None = None
        self._mean_service: float | None = None  # seconds requests run, for retry_after
        self._counts: collections.Counter = collections.Counter()
        self._preemptions = 0

    # -- read-only figures ---------------------------------------------------------------

    @property
    def policy(self) -> str:
        return self._policy

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def reserved_bytes(self) -> int:
        """The sum of the running requests' reservations (may exceed the budget only under
        ``admit_all``, ``optimistic`` and ``lookahead``)."""
        return self._reserved_tokens * self._bytes_per_token

    @property
    def used_bytes(self) -> int:
        """What the running requests hold now: their prompts and the tokens generated so
        far (at most their reservations)."""
        return self._used_tokens * self._bytes_per_token

    @property
    def free_bytes(self) -> int:
        return max(0, self._budget - self.reserved_bytes)

    @property
    def output_estimate(self) -> int | None:
        """The output length ``memwarden`` reserves for (``None`` until warmed up)."""
        return self._estimate

    @property
    def preemptions(self) -> int:
        return self._preemptions

    def decision_counts(self) -> dict[tuple[str, str], int]:
        """Decisions applied so far, by ``(verdict, reason)``."""
        with self._lock:
            return dict(self._counts)

    def running_ids(self) -> list:
        """Running requests, oldest admitted first."""
        with self._lock:
            return list(self._running)

    def queued_ids(self) -> list:
        """Queued requests, head first."""
        with self._lock:
            return list(self._queue)

    def reservation(self, request_id: Hashable) -> tuple[int, int, int]:
        """``(granted_max_tokens, reserved_bytes, generated)`` of a running request."""
        with self._lock:
            run = self._running_entry(request_id)
            return run.granted, run.reserved_tokens * self._bytes_per_token, run.generated

    # -- decisions -----------------------------------------------------------------------

    def check_admission(self, request: Request) -> Decision:
        """The decision :meth:`admit` would take now, without taking it."""
        self._check_request(request)
        with self._lock:
            return self._decide(request, at_queue_head=False)[0]

    def admit(self, request: Request) -> Decision:
        """Decide and apply: reserve the bytes (accept/shrink) or enqueue (queue)."""
        self._check_request(request)
        with self._lock:
            if request.request_id in self._running or request.request_id in self._queue:
                raise ValueError(f"request_id {request.request_id!r} is already running or queued")
            decision, reserved_tokens = self._decide(request, at_queue_head=False)
            if decision.admitted:
                self._start(request, decision.granted_max_tokens, reserved_tokens)
            elif decision.verdict == "queue":
                self._queue[request.request_id] = (request, self._clock(), decision.needed_bytes)
            self._counts[decision.verdict, decision.reason] += 1
            return decision

    def resume(self, request: Request) -> Decision:
        """Admit a preempted request again, ahead of the queue: it runs now if it fits,
        else it waits at the queue's head (never behind newcomers, never refused for a full
        queue). Its prompt should hold what it generated before it was preempted."""
        self._check_request(request)
        with self._lock:
            if request.request_id in self._running or request.request_id in self._queue:
                raise ValueError(f"request_id {request.request_id!r} is already running or queued")
            decision, reserved_tokens = self._decide(request, at_queue_head=True)
            if decision.admitted:
                self._start(request, decision.granted_max_tokens, reserved_tokens)
            elif decision.verdict == "queue":
                self._queue[request.request_id] = (request, self._clock(), decision.needed_bytes)
                self._queue.move_to_end(request.request_id, last=False)
            self._counts[decision.verdict, decision.reason] += 1
            return decision

    def on_tokens(self, request_id: Hashable, generated: int) -> None:
        """Report that a running request has generated ``generated`` tokens in all.

        Under ``reserve`` and ``memwarden`` the prompt plus ``generated`` must stay within
        its reservation (call :meth:`extend` first); under ``optimistic`` its usage, and so
        the pool's, follows ``generated``.
        """
        with self._lock:
            run = self._running_entry(request_id)
            generated = integer(generated, "generated", minimum=0, maximum=run.granted)
            used = run.request.prompt_tokens + max(generated, 1)
            if self._policy in ("reserve", "memwarden") and used > run.reserved_tokens:
                raise ValueError(
                    f"generated={generated} outgrows the reservation of request {request_id!r} "
                    f"({run.reserved_tokens - run.request.prompt_tokens} output tokens): call extend() first")
            if self._policy == "optimistic":
                self._reserved_tokens += used - run.reserved_tokens
                run.reserved_tokens = used
            self._used_tokens += generated - run.generated
            run.generated = generated

    def extend(self, request_id: Hashable, tokens: int, force: bool = False) -> bool:
        """Reserve ``tokens`` more output tokens for a running request; ``False`` when that
        would overrun the budget (``reserve``/``memwarden``): the caller then stops the
        request at its reservation or preempts it -- or, with ``force``, reserves them past
        the budget (a caller that can do neither: the engine behind it preempts). Never
        past ``granted_max_tokens``. ``admit_all`` and ``optimistic`` always return ``True``."""
        tokens = integer(tokens, "tokens")
        with self._lock:
            run = self._running_entry(request_id)
            if run.reserved_tokens - run.request.prompt_tokens + tokens > run.granted:
                raise ValueError(f"tokens={tokens} would reserve past granted_max_tokens={run.granted} "
                                 f"of request {request_id!r}")
            if self._policy not in ("reserve", "memwarden"):
                return True  # they never refuse growth (optimistic's usage follows on_tokens)
            if not force and (self._reserved_tokens + tokens) * self._bytes_per_token > self._budget:
                return False
            run.reserved_tokens += tokens
            self._reserved_tokens += tokens
            return True

    def finish(self, request_id: Hashable) -> list[Decision]:
        """End a running request (or cancel a queued one), release its bytes and admit
        from the queue head while it fits; returns the decisions for the requests taken
        from the queue (admitted, or rejected on timeout or by ``session_check``)."""
        with self._lock:
            now = self._clock()
            if request_id in self._running:
                run = self._release(request_id)
                self._record_output(run.generated)
                service = now - run.admitted_at
                self._mean_service = service if self._mean_service is None else (
                    (1 - _SERVICE_TIME_WEIGHT) * self._mean_service + _SERVICE_TIME_WEIGHT * service)
            elif request_id in self._queue:
                del self._queue[request_id]
            else:
                raise ValueError(f"request_id {request_id!r} is not running or queued")
            return self._drain(now)

    def expire_queue(self, now: float | None = None) -> list[Decision]:
        """Reject the requests that have waited ``queue_timeout``, then admit from the head
        while it fits; returns the decisions for the requests taken from the queue."""
        with self._lock:
            return self._drain(self._clock() if now is None else _seconds(now, "now"))

    def preempt(self, request_id: Hashable | None = None) -> Hashable | None:
        """Give up a running request (the newest when ``request_id`` is None) and release
        its bytes; returns its id (None when nothing runs). The caller recomputes or swaps
        it, and may admit it again. The queue is not drained: memory is short."""
        with self._lock:
            if request_id is None:
                if not self._running:
                    return None
                request_id = next(reversed(self._running))
            self._running_entry(request_id)
            self._release(request_id)
            self._preemptions += 1
            return request_id

    # -- internals (called with the lock held) -----------------------------------------

    @staticmethod
    def _check_request(request) -> None:
        if not isinstance(request, Request):
            raise ValueError(f"request must be a Request, got {type(request).__name__}")

    def _running_entry(self, request_id: Hashable) -> _Running:
        run = self._running.get(request_id)
        if run is None:
            raise ValueError(f"request_id {request_id!r} is not running")
        return run

    def _decide(self, request: Request, at_queue_head: bool) -> tuple[Decision, int]:
        """The decision for ``request`` now and the tokens it would reserve."""
        prompt, max_tokens = request.prompt_tokens, request.max_tokens
        per_token = self._bytes_per_token
        free = max(0, self._budget - self._reserved_tokens * per_token)
        if self._policy == "admit_all":
            return self._grant(request, "accept", "admit_all", max_tokens, prompt + max_tokens,
                               (prompt + max_tokens) * per_token, free)
        if self._policy in ("reserve", "lookahead"):
            output = fewest = max_tokens
        elif self._policy == "optimistic":
            output = fewest = 1  # the next token; the rest is paid as it is generated
        else:
            fewest = min(self._min_output, max_tokens)
            estimate = max_tokens if self._estimate is None else self._estimate
            output = max(fewest, min(estimate, max_tokens))
        needed = (prompt + output) * per_token
        routable = self._route_above is not None
        if routable and prompt > self._route_above:
            return self._refuse(request, "route", "too_large_routed", needed, free, None)
        if (prompt + fewest) * per_token > self._budget:  # not even in an empty pool
            if routable:
                return self._refuse(request, "route", "too_large_routed", needed, free, None)
            reason = "prompt_too_long" if (prompt + 1) * per_token > self._budget else "exceeds_budget"
            return self._refuse(request, "reject", reason, needed, free, None)
        if self._policy == "lookahead":  # free: what the running requests' peak leaves
            free = max(0, self._budget - self._projected_peak() * per_token)
        if self._queue and not at_queue_head:
            return self._wait(request, "behind_queue", needed, free, at_queue_head)
        fits = (self._projected_peak((prompt, output)) * per_token <= self._budget if self._policy == "lookahead"
                else needed <= free)
        if fits:
            return self._grant(request, "accept", "fits", max_tokens, prompt + output, needed, free)
        fitting_output = free // per_token - prompt
        if self._policy == "memwarden" and fitting_output >= fewest:
            return self._grant(request, "shrink", "shrunk_to_fit", fitting_output, prompt + fitting_output,
                               needed, free)
        return self._wait(request, "pool_full", needed, free, at_queue_head)

    def _projected_peak(self, newcomer: tuple[int, int] | None = None) -> int:
        """The most tokens the running requests (and ``newcomer``: prompt, output) will
        hold at once, each gaining a token a step until it finishes (``lookahead``)."""
        ahead = [(run.granted - run.generated, run.request.prompt_tokens + run.generated)
                 for run in self._running.values()]
        if newcomer is not None:
            ahead.append((newcomer[1], newcomer[0]))
        block = self._block_tokens
        if block > 1 and len(ahead) <= _EXACT_BLOCKS_UP_TO:  # U(t) in whole blocks at each finish
            return max((sum(-(-(tokens + t) // block) * block for to_go, tokens in ahead if to_go >= t)
                        for t in {to_go for to_go, _ in ahead}), default=0)
        ahead.sort(reverse=True)  # most tokens to go first: each prefix is who is left at t = its last r
        peak = held = count = 0
        for to_go, tokens in ahead:
            held += tokens + block - 1
            count += 1
            peak = max(peak, held + count * to_go)
        return peak

    def _grant(self, request, verdict, reason, granted, reserved_tokens, needed, free):
        reserved = reserved_tokens * self._bytes_per_token
        refusal = self._session_refusal(request, reserved, needed, free)
        if refusal is not None:
            return refusal, 0
        return Decision(request.request_id, verdict, reason, granted, needed, free, reserved), reserved_tokens

    def _wait(self, request, reason, needed, free, at_queue_head):
        if not at_queue_head:  # a queued request keeps its place; only newcomers meet the limit
            if self._queue_limit == 0:
                return self._refuse(request, "reject", "pool_full", needed, free, self._retry_hint())
            if len(self._queue) >= self._queue_limit:
                return self._refuse(request, "reject", "queue_full", needed, free, self._retry_hint())
        refusal = self._session_refusal(request, needed, needed, free)
        if refusal is not None:
            return refusal, 0
        return self._refuse(request, "queue", reason, needed, free, self._queue_timeout)

    def _refuse(self, request, verdict, reason, needed, free, retry_after):
        return Decision(request.request_id, verdict, reason, 0, needed, free, 0, retry_after), 0

    def _session_refusal(self, request, nbytes, needed, free) -> Decision | None:
        if request.session_id is None or self._session_check is None:
            return None
        ok, reason = self._session_check(request.session_id, nbytes)
        if ok:
            return None
        return Decision(request.request_id, "reject", reason or "session_limit", 0, needed, free, 0,
                        self._retry_hint())

    def _retry_hint(self) -> float:
        return _DEFAULT_RETRY_AFTER if self._mean_service is None else self._mean_service

    def _start(self, request: Request, granted: int, reserved_tokens: int) -> None:
        self._running[request.request_id] = _Running(request, granted, reserved_tokens, self._clock())
        self._reserved_tokens += reserved_tokens
        self._used_tokens += request.prompt_tokens

    def _release(self, request_id: Hashable) -> _Running:
        run = self._running.pop(request_id)
        self._reserved_tokens -= run.reserved_tokens
        self._used_tokens -= run.request.prompt_tokens + run.generated
        return run

    def _record_output(self, generated: int) -> None:
        if len(self._outputs) == _SAMPLE_WINDOW:  # the deque drops its oldest on append
            oldest = self._outputs[0]
            del self._outputs_sorted[bisect.bisect_left(self._outputs_sorted, oldest)]
        self._outputs.append(generated)
        bisect.insort(self._outputs_sorted, generated)
        count = len(self._outputs_sorted)
        if count >= self._warmup:  # nearest-rank quantile
            self._estimate = self._outputs_sorted[math.ceil(self._quantile * count) - 1]

    def _drain(self, now: float) -> list[Decision]:
        decisions = []
        # a resumed request waits at the head though it queued last, so every entry is checked
        expired = [rid for rid, (_, queued_at, _) in self._queue.items() if now - queued_at >= self._queue_timeout]
        for request_id in expired:
            request, _, needed = self._queue.pop(request_id)
            decision = self._refuse(request, "reject", "queue_timeout", needed, self.free_bytes, self._retry_hint())[0]
            self._counts[decision.verdict, decision.reason] += 1
            decisions.append(decision)
        while self._queue:
            request, _, needed = next(iter(self._queue.values()))
            decision, reserved_tokens = self._decide(request, at_queue_head=True)
            if decision.verdict == "queue":
                break  # FIFO: nobody overtakes the head
            if decision.admitted:
                self._start(request, decision.granted_max_tokens, reserved_tokens)
            self._queue.popitem(last=False)
            self._counts[decision.verdict, decision.reason] += 1
            decisions.append(decision)
        return decisions
