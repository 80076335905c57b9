"""The ``TrafficController`` facade: one request's way through admission, sessions and
degradation, and the counters ``/memory_stats`` and the metrics read.

:meth:`TrafficController.acquire` (blocking: call it from a worker thread) degrades the
request by the KV pressure of the pool (held / budget), asks the session table and
admission, waits in admission's FIFO queue when told to, and returns a :class:`Ticket`
or raises :class:`Rejected` (HTTP 429 for session limits, 503 for a full pool, with the
reason and ``Retry-After``). While generating, :meth:`~TrafficController.progress` reports
tokens and asks for more room when the reservation runs out (``False``: stop there);
:meth:`~TrafficController.release` ends the request and admits the queue's head.

May import: the controller's modules and the bottom layers.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Optional

from memwarden.controller.admission import AdmissionController, Decision, Request
from memwarden.controller.config import MemwardenConfig
from memwarden.controller.degradation import DEFAULT_POLICIES, Applied, Degradation, Level
from memwarden.controller.sessions import SessionTable

__all__ = ["CONTINUE", "PREEMPTED", "STOP", "Rejected", "Routed", "Ticket", "TrafficController"]

log = logging.getLogger("memwarden.controller")  # one JSON object per line: decisions, levels, evictions

_SESSION_REASONS = ("session_limit", "global_limit")
_EXTEND_STEP = 16  # output tokens asked for at a time when a reservation runs out
_SWEEP_INTERVAL = 1.0  # seconds between sweeps for idle sessions

# what progress() tells the generating request
CONTINUE, STOP, PREEMPTED = "continue", "stop", "preempted"


class Rejected(Exception):
    """A request refused by the controller: ``status`` (429 or 503), ``reason`` (a short
    machine word), ``retry_after`` seconds (None: retrying cannot help)."""

    def __init__(self, status: int, reason: str, message: str, retry_after: Optional[float]):
        super().__init__(message)
        self.status, self.reason, self.message, self.retry_after = status, reason, message, retry_after


class Routed(Exception):
    """A request admission sends to the other pool at ``url`` (``admission.upstream_url``):
    its prompt is above ``admission.route_above_tokens``, or it could never fit here."""

    def __init__(self, url: str, decision: Decision):
        super().__init__(f"routed to {url} ({decision.reason})")
        self.url, self.decision = url, decision


@dataclass
class Ticket:
    """An admitted request: its decision, the degraded sampling settings and its session."""

    request_id: str
    session_id: Optional[str]
    prompt_tokens: int
    decision: Decision
    applied: Applied
    started: float
    generated: int = 0
    cut_short: bool = False  # stopped when the pool had no room for more output
    preempted: bool = False  # set (from any thread) when its memory was taken back; cleared by resume()
    preemptions: int = 0
    resumed_from: int = 0  # output tokens generated before the current admission

    @property
    def max_tokens(self) -> int:
        """Output tokens the request may generate in all."""
        return self.resumed_from + self.decision.granted_max_tokens


class TrafficController:
    """Admission (``config.admission``), sessions (``config.sessions``, limits capped by
    the budget) and degradation (``config.degradation``) over one KV budget of
    ``budget_bytes``, every token priced at ``bytes_per_token``."""

    def __init__(self, config: MemwardenConfig, budget_bytes: int, bytes_per_token: int, clock=time.monotonic,
                 can_preempt: bool = True, block_tokens: int = 1):
        self.config, self.budget_bytes, self.bytes_per_token = config, budget_bytes, bytes_per_token
        self.can_preempt = can_preempt  # False where requests cannot be recomputed (a gateway): they overcommit
        s = config.sessions
        self.sessions = SessionTable(per_session_limit=min(s.per_session_limit, budget_bytes),
                                     global_limit=min(s.global_limit, budget_bytes), idle_timeout=s.idle_timeout,
                                     clock=clock)
        a = config.admission
        self.admission = AdmissionController(budget_bytes, bytes_per_token, policy=a.policy,
                                             route_above_tokens=a.route_above_tokens, queue_limit=a.queue_limit,
                                             queue_timeout=a.queue_timeout, clock=clock,
                                             session_check=self._session_check, block_tokens=block_tokens)
        d = config.degradation
        levels = list(Level)
        self.degradation = Degradation(
            thresholds=dict(zip(levels[1:], d.thresholds)), hysteresis=d.hysteresis,
            policies={level: dataclasses.replace(DEFAULT_POLICIES[level], max_tokens_factor=factor)
                      for level, factor in zip(levels, d.max_tokens_factors)})
        self.degradation.on_change.append(
            lambda old, new, pressure: _event("pressure_level", old=Level(old).label, new=Level(new).label,
                                              pressure=round(pressure, 4)))
        self.sessions.on_evict.append(lambda session, freed: _event("session_evicted", session=session,
                                                                     freed_bytes=freed))
        self.counts = {"rejected": 0, "routed": 0, "degraded": 0, "completed": 0, "cut_short": 0, "preempted": 0,
                       "overcommitted": 0}
        self.rejections: dict[str, int] = {}
        self._clock = clock
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._ready: dict[str, threading.Event] = {}  # queued request -> set when decided
        self._decided: dict[str, Decision] = {}
        self._running: dict[str, Ticket] = {}  # admitted tickets, for preemption by id
        self._flow = threading.Lock()  # one request at a time grows, preempts or finishes
        self._last_sweep = -math.inf

    # -- the request's way ----------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def _session_check(self, session_id, nbytes: int):
        verdict = self.sessions.can_reserve(session_id, nbytes)
        limit = self.sessions.per_session_limit if verdict.reason == "session_limit" else self.sessions.global_limit
        if not verdict.ok and limit >= self.budget_bytes:
            return True, ""  # a limit as large as the pool is the pool's: admission queues instead of refusing
        return verdict.ok, verdict.reason

    def pressure(self) -> float:
        """The KV the running requests hold (prompts and tokens so far) over the budget:
        what degradation reacts to; reservations that may never be used do not count."""
        return self.admission.used_bytes / self.budget_bytes

    def acquire(self, session_id: Optional[str], prompt_tokens: int, max_tokens: int, temperature: Optional[float] = None,
                top_p: Optional[float] = None) -> Ticket:
        """Admit one request or raise :class:`Rejected`; may wait in the queue. Without a
        ``session_id`` the request counts against no session."""
        # admit_all is the uncontrolled baseline: it never degrades or refuses either
        degrading = self.config.degradation.enabled and self.admission.policy != "admit_all"
        level = self.degradation.update(min(self.pressure(), 1.0) if degrading else 0.0)
        self._sweep_idle_sessions()
        sessions = self.sessions if session_id is not None else None
        new_session = sessions is None or sessions.get(session_id) is None
        if new_session and self.degradation.policy.refuse_new_sessions:
            self._count_rejection("new_session_under_pressure")
            raise Rejected(503, "new_session_under_pressure",
                           f"memory pressure is at level {level.label}: new sessions are refused for now", 1.0)
        applied = self.degradation.apply(max_tokens, temperature, top_p)
        request_id = self.new_request_id()
        if sessions is not None:
            sessions.begin_request(session_id, prompt_tokens)
        request = Request(request_id, prompt_tokens, applied.max_tokens, session_id=session_id)
        with self._lock:  # a finish() in between must find the waiter
            decision = self.admission.admit(request)
            if decision.verdict == "queue":
                self._ready[request_id] = threading.Event()
        if decision.verdict == "queue":
            _event("admission", request=request_id, session=session_id, decision="queue", reason=decision.reason,
                   needed_bytes=decision.needed_bytes, free_bytes=decision.free_bytes)
            decision = self._wait(request_id, decision)
        _event("admission", request=request_id, session=session_id, decision=decision.verdict,
               reason=decision.reason, prompt_tokens=prompt_tokens, max_tokens=decision.granted_max_tokens,
               needed_bytes=decision.needed_bytes, free_bytes=decision.free_bytes, level=applied.level)
        if decision.verdict == "route":
            if sessions is not None:
                sessions.end_request(session_id)
            self._count("routed")
            raise Routed(self.config.admission.upstream_url, decision)
        if not decision.admitted:
            if sessions is not None:
                sessions.end_request(session_id)
            self._count_rejection(decision.reason)
            status = 429 if decision.reason in _SESSION_REASONS else 503
            raise Rejected(status, decision.reason, _explain(decision, self.bytes_per_token), decision.retry_after)
        if sessions is not None:
            sessions.reserve(session_id, self.admission.reservation(request_id)[1])
        if applied.degraded or decision.verdict == "shrink":
            self._count("degraded")
        ticket = Ticket(request_id, session_id, prompt_tokens, decision, applied, self._clock())
        with self._lock:
            self._running[request_id] = ticket
        return ticket

    def _sweep_idle_sessions(self) -> None:
        """Evict the sessions idle past ``sessions.idle_timeout``, at most once a second
        (requests are what make time pass here)."""
        now = self._clock()
        with self._lock:
            if now - self._last_sweep < _SWEEP_INTERVAL:
                return
            self._last_sweep = now
        self.sessions.evict_idle(now)

    def _wait(self, request_id: str, decision: Decision) -> Decision:
        event = self._ready[request_id]
        deadline = self._clock() + self.config.admission.queue_timeout
        while not event.wait(timeout=0.05):
            if self._clock() >= deadline:
                self._publish(self.admission.expire_queue())
        with self._lock:
            self._ready.pop(request_id, None)
            return self._decided.pop(request_id)

    def _publish(self, decisions: list[Decision]) -> None:
        with self._lock:
            for d in decisions:
                if d.request_id in self._ready:
                    self._decided[d.request_id] = d
                    self._ready[d.request_id].set()

    def progress(self, ticket: Ticket, generated: int) -> str:
        """Report ``generated`` output tokens in all: :data:`CONTINUE`; :data:`STOP` when the
        request must end there (it alone outgrows the pool); :data:`PREEMPTED` when its
        memory was taken back -- drop its cache and call :meth:`resume`.

        When the pool runs out (a reservation that cannot grow, or under ``optimistic`` the
        pool's use past the budget) the newest running request is preempted, vLLM-style;
        that may be this one. Without ``can_preempt`` (a gateway: the engine behind it
        schedules its own KV) the reservation grows past the budget instead, counted in
        ``overcommitted_count``; a request that alone outgrows the pool stops either way."""
        with self._flow:
            return self._progress(ticket, generated)

    def _progress(self, ticket: Ticket, generated: int) -> str:
        if ticket.preempted:
            return PREEMPTED
        output = generated - ticket.resumed_from  # what the current admission has generated
        prompt = ticket.prompt_tokens + ticket.resumed_from
        granted, reserved, _ = self.admission.reservation(ticket.request_id)
        reserved_tokens = reserved // self.bytes_per_token
        if self.admission.policy in ("reserve", "memwarden") and prompt + max(output, 1) > reserved_tokens:
            while True:  # a step of output tokens, or what the pool has left, else make room
                room = self.admission.free_bytes // self.bytes_per_token
                more = min(_EXTEND_STEP, granted - (reserved_tokens - prompt), max(room, 1))
                if self.admission.extend(ticket.request_id, more):
                    break
                if not self.can_preempt and not self._alone(ticket):
                    # the engine that generates it schedules its KV itself (vLLM preempts by
                    # recompute): stopping the request here would cut its answer short
                    self.admission.extend(ticket.request_id, more, force=True)
                    self._count("overcommitted")
                    break
                verdict = self._preempt_newest(ticket)
                if verdict is not CONTINUE:
                    return verdict
            if ticket.session_id is not None:
                self.sessions.reserve(ticket.session_id, more * self.bytes_per_token)
        self.admission.on_tokens(ticket.request_id, output)
        ticket.generated = generated
        while self._overcommitted():
            verdict = self._preempt_newest(ticket)
            if verdict is not CONTINUE:
                return verdict
        return CONTINUE

    def _overcommitted(self) -> bool:
        """The pool's use is past the budget: ``optimistic`` admits into what is used now;
        ``lookahead`` trusts a projection that requests generating at their own pace (not
        in one batch) can outrun -- where they cannot be preempted, the engine's own
        scheduler has the last word."""
        policy = self.admission.policy
        if not self.can_preempt:
            return False
        if policy == "optimistic":
            return self.admission.reserved_bytes > self.budget_bytes
        return policy == "lookahead" and self.admission.used_bytes > self.budget_bytes

    def _stop(self, ticket: Ticket) -> str:
        self._count("cut_short")
        ticket.cut_short = True
        return STOP

    def _preemptable(self) -> list:
        with self._lock:  # a request admitted but not yet handed its ticket cannot be preempted yet
            return [rid for rid in self.admission.running_ids() if rid in self._running]

    def _alone(self, ticket: Ticket) -> bool:
        return self._preemptable() == [ticket.request_id]

    def _preempt_newest(self, ticket: Ticket) -> str:
        """Preempt the newest running request to make room for ``ticket``: CONTINUE when it
        was another, PREEMPTED when it was ``ticket``, STOP when ``ticket`` runs alone."""
        candidates = self._preemptable()
        if candidates == [ticket.request_id]:
            return self._stop(ticket)
        victim_id = candidates[-1]
        reserved = self.admission.reservation(victim_id)[1]
        self.admission.preempt(victim_id)
        with self._lock:
            victim = self._running.pop(victim_id)
            victim.preempted = True
            victim.preemptions += 1
            self.counts["preempted"] += 1
        if victim.session_id is not None:
            self.sessions.release(victim.session_id, min(reserved, self._session_bytes(victim.session_id)))
        _event("preemption", request=victim_id, session=victim.session_id, freed_bytes=reserved,
               generated=victim.generated, for_request=ticket.request_id)
        return PREEMPTED if victim is ticket else CONTINUE

    def resume(self, ticket: Ticket, generated: int) -> bool:
        """Admit a preempted request again, ahead of the queue, to recompute its prompt and
        the ``generated`` tokens it had and go on (blocking: it may wait). False when it
        cannot (queue timeout, or it no longer fits at all): it ends with what it has."""
        request = Request(ticket.request_id, ticket.prompt_tokens + generated, ticket.max_tokens - generated,
                          session_id=ticket.session_id)
        with self._lock:
            ticket.preempted = False
            decision = self.admission.resume(request)
            if decision.verdict == "queue":
                self._ready[ticket.request_id] = threading.Event()
        if decision.verdict == "queue":
            decision = self._wait(ticket.request_id, decision)
        _event("resume", request=ticket.request_id, decision=decision.verdict, reason=decision.reason,
               generated=generated, max_tokens=decision.granted_max_tokens)
        if not decision.admitted:
            self._stop(ticket)
            return False
        ticket.decision, ticket.resumed_from, ticket.generated = decision, generated, generated
        if ticket.session_id is not None:
            self.sessions.reserve(ticket.session_id, decision.reserved_bytes)
        with self._lock:
            self._running[ticket.request_id] = ticket
        return True

    def release(self, ticket: Ticket) -> None:
        """End a request: its bytes go back (when it holds any) and the queue's head may start."""
        with self._flow:
            with self._lock:
                held = self._running.pop(ticket.request_id, None) is not None
            reserved = self.admission.reservation(ticket.request_id)[1] if held else 0
            decisions = self.admission.finish(ticket.request_id) if held else []
        if ticket.session_id is not None:
            self.sessions.release(ticket.session_id, min(reserved, self._session_bytes(ticket.session_id)))
            self.sessions.end_request(ticket.session_id, ticket.generated)
        self._count("completed")
        self._publish(decisions)

    def _session_bytes(self, session_id: str) -> int:
        session = self.sessions.get(session_id)
        return session.kv_bytes if session is not None else 0

    def _count(self, name: str) -> None:
        with self._lock:  # requests run in several threads
            self.counts[name] += 1

    def _count_rejection(self, reason: str) -> None:
        with self._lock:
            self.counts["rejected"] += 1
            self.rejections[reason] = self.rejections.get(reason, 0) + 1

    # -- what is reported -------------------------------------------------------------------

    def memory_stats(self) -> dict:
        """The seed's ``/memory_stats`` keys for the KV pool (the server adds devices)."""
        sessions = self.sessions.stats()
        return {
            "active_sessions": sessions["active_sessions"],
            "total_kv_mb": sessions["total_kv_mb"],
            "kv_budget_mb": self.budget_bytes / 2**20,
            "kv_used_mb": self.admission.used_bytes / 2**20,
            "kv_reserved_mb": self.admission.reserved_bytes / 2**20,
            "kv_cache_usage_perc": self.pressure(),
            "pressure_level": self.degradation.level.label,
            "num_requests_running": len(self.admission.running_ids()),
            "num_requests_waiting": len(self.admission.queued_ids()),
            "session_details": sessions["session_details"],
            "rejected_count": self.counts["rejected"],
            "rejections_by_reason": dict(self.rejections),
            "routed_count": self.counts["routed"],
            "degraded_count": self.counts["degraded"],
            "completed_count": self.counts["completed"],
            "preempted_count": self.counts["preempted"],
            "cut_short_count": self.counts["cut_short"],
            "overcommitted_count": self.counts["overcommitted"],
            "admission_policy": self.admission.policy,
        }


def _event(kind: str, **fields) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps({"event": kind, "time": time.time(), **fields}))


def _explain(decision: Decision, bytes_per_token: int) -> str:
    need, free = decision.needed_bytes, decision.free_bytes
    return (f"request not admitted ({decision.reason}): it needs {need} bytes of KV cache "
            f"({need // max(bytes_per_token, 1)} tokens) and {free} bytes are free")
