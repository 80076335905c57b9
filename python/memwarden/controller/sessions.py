"""Sessions: state keyed by the ``X-Session-ID`` header, with a KV budget per session and a
global one, an idle timeout, and eviction of the least recently used sessions when the
global budget runs short.

The table only keeps the books: how many KV bytes each session holds, its requests and
tokens, when it was last used. It frees nothing itself; evicting a session calls every
``on_evict(session_id, freed_bytes)`` callback, and that is how the KV cache
(:mod:`memwarden.kv`) frees the session's pages. A session with a request in flight
(between :meth:`SessionTable.begin_request` and :meth:`SessionTable.end_request`) is never
evicted.

    table = SessionTable(per_session_limit="512MiB", global_limit="20GiB")
    table.begin_request("abc", tokens_in=812)
    verdict = table.reserve("abc", 64 * 2**20)    # Verdict(ok=True, reason='ok', ...)
    ...
    table.end_request("abc", tokens_out=120)

Thread-safe: the HTTP server calls it from several threads; one lock guards the state,
and callbacks run outside it (so they may call back into the table).

May import: the standard library and the bottom layers (``_units``, ``_checks``); it needs
nothing else, so importing it stays light (no torch). Never :mod:`memwarden.serve` or
:mod:`memwarden.cli`.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Union

from memwarden._checks import integer
from memwarden._units import format_bytes, parse_bytes

__all__ = ["Session", "Verdict", "SessionTable"]

MiB = 2**20


@dataclass
class Session:
    """One session's books. The table hands out copies, so changing one changes nothing."""

    session_id: str
    created: float
    last_used: float
    kv_bytes: int = 0
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    in_flight: int = 0  # requests begun and not yet ended


@dataclass(frozen=True)
class Verdict:
    """Whether ``nbytes`` more fit ``session_id``'s budget and the global one.

    ``reason`` is ``"ok"``, ``"session_limit"`` or ``"global_limit"``; the byte counts are
    those before the reservation.
    """

    ok: bool
    reason: str
    session_id: str
    nbytes: int
    session_bytes: int
    global_bytes: int
    per_session_limit: int
    global_limit: int

    @property
    def message(self) -> str:
        """One line for a log or an HTTP error body."""
        if self.reason == "session_limit":
            return (f"session {self.session_id!r} would hold {format_bytes(self.session_bytes + self.nbytes)}"
                    f" of KV, over its limit of {format_bytes(self.per_session_limit)}")
        if self.reason == "global_limit":
            return (f"all sessions would hold {format_bytes(self.global_bytes + self.nbytes)} of KV,"
                    f" over the global limit of {format_bytes(self.global_limit)}")
        return f"{format_bytes(self.nbytes)} for session {self.session_id!r} fits"


EvictCallback = Callable[[str, int], Any]


def _callbacks(value: Union[EvictCallback, Iterable[EvictCallback], None]) -> list[EvictCallback]:
    if value is None:
        return []
    return [value] if callable(value) else list(value)


class SessionTable:
    """Sessions by id, in least-recently-used order, with KV byte budgets.

    ``per_session_limit`` and ``global_limit`` are sizes (``"512MiB"`` or a byte count),
    both positive; a global limit below the per-session one is allowed and then binds
    first. ``idle_timeout`` is in seconds of ``clock`` (``math.inf`` never times out).
    ``on_evict`` is a callable or a list of them; append to :attr:`on_evict` to add more.
    """

    def __init__(
        self,
        per_session_limit: int | float | str = "512MiB",
        global_limit: int | float | str = "20GiB",
        idle_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Union[EvictCallback, Iterable[EvictCallback], None] = None,
    ) -> None:
        self.per_session_limit = self._limit(per_session_limit, "per_session_limit")
        self.global_limit = self._limit(global_limit, "global_limit")
        if (isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float))
                or math.isnan(idle_timeout) or idle_timeout <= 0):
            raise ValueError(f"idle_timeout must be a positive number of seconds, got {idle_timeout!r}")
        self.idle_timeout = float(idle_timeout)
        if not callable(clock):
            raise ValueError(f"clock must be a callable returning seconds, got {clock!r}")
        self.clock = clock
        self.on_evict = _callbacks(on_evict)
        self.evictions = 0
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._total_bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _limit(value: int | float | str, name: str) -> int:
        nbytes = parse_bytes(value, name)
        if nbytes <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
        return nbytes

    @staticmethod
    def _check_id(session_id: Any) -> str:
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        return session_id

    # -- state, under the lock ------------------------------------------------------------

    def _use(self, session_id: str) -> Session:
        """The session, created if new, moved to the most recently used end."""
        now = self.clock()
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = Session(session_id, created=now, last_used=now)
        else:
            session.last_used = now
            self._sessions.move_to_end(session_id)
        return session

    def _existing(self, session_id: str, action: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise KeyError(f"{action}: no session {session_id!r}")
        return session

    def _verdict(self, session_id: str, nbytes: int) -> Verdict:
        session = self._sessions.get(session_id)
        held = session.kv_bytes if session is not None else 0
        if held + nbytes > self.per_session_limit:
            reason = "session_limit"
        elif self._total_bytes + nbytes > self.global_limit:
            reason = "global_limit"
        else:
            reason = "ok"
        return Verdict(reason == "ok", reason, session_id, nbytes, held, self._total_bytes,
                       self.per_session_limit, self.global_limit)

    def _set_bytes(self, session: Session, nbytes: int) -> None:
        self._total_bytes += nbytes - session.kv_bytes
        session.kv_bytes = nbytes

    def _remove(self, victims: list[Session]) -> list[tuple[str, int]]:
        for session in victims:
            del self._sessions[session.session_id]
            self._total_bytes -= session.kv_bytes
        self.evictions += len(victims)
        return [(session.session_id, session.kv_bytes) for session in victims]

    def _notify(self, evicted: list[tuple[str, int]]) -> list[str]:
        """Run every callback for every evicted session, outside the lock; a failing
        callback does not keep the others from freeing their pages (the first error is
        raised once all have run)."""
        first_error: BaseException | None = None
        for session_id, freed in evicted:
            for callback in list(self.on_evict):
                try:
                    callback(session_id, freed)
                except Exception as error:  # re-raised once every callback has run
                    first_error = first_error or error
        if first_error is not None:
            raise first_error
        return [session_id for session_id, _ in evicted]

    # -- public API -----------------------------------------------------------------------

    def touch(self, session_id: str) -> Session:
        """Create the session or mark it used; returns a copy of its books."""
        session_id = self._check_id(session_id)
        with self._lock:
            return dataclasses.replace(self._use(session_id))

    def get(self, session_id: str) -> Session | None:
        """A copy of the session's books, or ``None``; does not mark it used."""
        with self._lock:
            session = self._sessions.get(session_id)
            return dataclasses.replace(session) if session is not None else None

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    @property
    def total_bytes(self) -> int:
        """KV bytes held by all sessions."""
        return self._total_bytes

    def begin_request(self, session_id: str, tokens_in: int = 0) -> Session:
        """Count a request (and its prompt tokens) as in flight: the session cannot be
        evicted until the matching :meth:`end_request`."""
        session_id = self._check_id(session_id)
        tokens_in = integer(tokens_in, "tokens_in", minimum=0)
        with self._lock:
            session = self._use(session_id)
            session.requests += 1
            session.tokens_in += tokens_in
            session.in_flight += 1
            return dataclasses.replace(session)

    def end_request(self, session_id: str, tokens_out: int = 0) -> Session:
        """End a request begun with :meth:`begin_request`, counting its output tokens."""
        tokens_out = integer(tokens_out, "tokens_out", minimum=0)
        with self._lock:
            session = self._existing(session_id, "end_request")
            if session.in_flight == 0:
                raise ValueError(f"end_request: session {session_id!r} has no request in flight")
            session.in_flight -= 1
            session.tokens_out += tokens_out
            session.last_used = self.clock()
            self._sessions.move_to_end(session_id)
            return dataclasses.replace(session)

    def can_reserve(self, session_id: str, nbytes: int) -> Verdict:
        """Whether ``nbytes`` more KV fit both limits; changes nothing."""
        session_id = self._check_id(session_id)
        nbytes = integer(nbytes, "nbytes", minimum=0)
        with self._lock:
            return self._verdict(session_id, nbytes)

    def reserve(self, session_id: str, nbytes: int) -> Verdict:
        """Add ``nbytes`` to the session (created if new, marked used) if they fit both
        limits; otherwise change nothing. Returns the verdict either way."""
        session_id = self._check_id(session_id)
        nbytes = integer(nbytes, "nbytes", minimum=0)
        with self._lock:
            verdict = self._verdict(session_id, nbytes)
            if verdict.ok:
                session = self._use(session_id)
                self._set_bytes(session, session.kv_bytes + nbytes)
            return verdict

    def release(self, session_id: str, nbytes: int) -> int:
        """Take ``nbytes`` off the session; returns what it still holds. Releasing more
        than it holds is a ``ValueError`` (the books would go wrong, not negative)."""
        nbytes = integer(nbytes, "nbytes", minimum=0)
        with self._lock:
            session = self._existing(session_id, "release")
            if nbytes > session.kv_bytes:
                raise ValueError(f"release: nbytes={nbytes} is more than session {session_id!r} "
                                 f"holds ({session.kv_bytes} bytes)")
            self._set_bytes(session, session.kv_bytes - nbytes)
            return session.kv_bytes

    def set_usage(self, session_id: str, nbytes: int) -> None:
        """Record what the cache measured the session to hold (created if new, marked used).
        A measurement is not refused: it may take the totals past the limits, which
        :meth:`evict_lru` can then bring back."""
        session_id = self._check_id(session_id)
        nbytes = integer(nbytes, "nbytes", minimum=0)
        with self._lock:
            self._set_bytes(self._use(session_id), nbytes)

    def evict_idle(self, now: float | None = None) -> list[str]:
        """Evict sessions unused for longer than ``idle_timeout`` (and with no request in
        flight); returns their ids, least recently used first."""
        with self._lock:
            now = self.clock() if now is None else now
            victims = [session for session in self._sessions.values()
                       if session.in_flight == 0 and now - session.last_used > self.idle_timeout]
            evicted = self._remove(victims)
        return self._notify(evicted)

    def evict_lru(self, nbytes_needed: int) -> list[str]:
        """Evict least recently used sessions holding KV and no request in flight until at
        least ``nbytes_needed`` bytes are freed; returns their ids in eviction order.

        All or nothing: if evicting every such session would not free enough, none is
        evicted (and ``[]`` comes back), since losing them would not make room anyway.
        """
        nbytes_needed = integer(nbytes_needed, "nbytes_needed", minimum=0)
        with self._lock:
            victims, freed = [], 0
            for session in self._sessions.values():
                if freed >= nbytes_needed:
                    break
                if session.in_flight == 0 and session.kv_bytes > 0:
                    victims.append(session)
                    freed += session.kv_bytes
            evicted = self._remove(victims) if freed >= nbytes_needed else []
        return self._notify(evicted)

    def stats(self) -> dict[str, Any]:
        """Totals and per-session books, for ``/memory_stats`` and metrics."""
        with self._lock:
            now = self.clock()
            details = {
                session.session_id: {
                    "kv_bytes": session.kv_bytes,
                    "kv_mb": session.kv_bytes / MiB,
                    "requests": session.requests,
                    "tokens_in": session.tokens_in,
                    "tokens_out": session.tokens_out,
                    "in_flight": session.in_flight,
                    "created": session.created,
                    "last_used": session.last_used,
                    "idle_seconds": now - session.last_used,
                }
                for session in self._sessions.values()
            }
            return {
                "active_sessions": len(self._sessions),
                "total_kv_bytes": self._total_bytes,
                "total_kv_mb": self._total_bytes / MiB,
                "per_session_limit": self.per_session_limit,
                "global_limit": self.global_limit,
                "evictions": self.evictions,
                "session_details": details,
            }
