"""SessionTable: hand-computed limit cases, LRU and idle eviction (fake clock), in-flight
protection, callbacks; and a hypothesis state machine against a brute-force model made of
plain dicts."""
from __future__ import annotations

import subprocess
import sys
import threading

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from memwarden.controller.sessions import Session, SessionTable, Verdict

MiB, GiB = 2**20, 2**30


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_table(**kwargs):
    clock = FakeClock()
    evicted = []
    table = SessionTable(clock=clock, on_evict=lambda sid, freed: evicted.append((sid, freed)), **kwargs)
    return table, clock, evicted


# -- limits -------------------------------------------------------------------------------


def test_limits_parse_sizes():
    table = SessionTable()
    assert (table.per_session_limit, table.global_limit) == (512 * MiB, 20 * GiB)
    assert SessionTable(per_session_limit=1000, global_limit="1 kB").global_limit == 1000


def test_hand_computed_limit_cases():
    table = SessionTable(per_session_limit=100, global_limit=250)
    assert table.reserve("a", 60) == Verdict(True, "ok", "a", 60, 0, 0, 100, 250)
    assert table.reserve("a", 40).ok  # exactly at the per-session limit
    refused = table.reserve("a", 1)
    assert refused == Verdict(False, "session_limit", "a", 1, 100, 100, 100, 250)
    assert "over its limit of 100 B" in refused.message
    assert table.reserve("b", 100).ok
    assert table.can_reserve("c", 50) == Verdict(True, "ok", "c", 50, 0, 200, 100, 250)
    full = table.can_reserve("c", 51)
    assert full == Verdict(False, "global_limit", "c", 51, 0, 200, 100, 250)
    assert "global limit of 250 B" in full.message
    assert "c" not in table  # can_reserve changes nothing
    assert not table.reserve("c", 51).ok and table.total_bytes == 200 and "c" not in table
    assert table.reserve("c", 50).ok and table.total_bytes == 250


def test_global_limit_below_per_session_limit_binds_first():
    table = SessionTable(per_session_limit="512MiB", global_limit="256MiB")
    verdict = table.can_reserve("a", 300 * MiB)
    assert verdict.reason == "global_limit"
    assert table.reserve("a", 256 * MiB).ok


def test_release_and_set_usage():
    table = SessionTable(per_session_limit=100, global_limit=1000)
    table.reserve("a", 70)
    assert table.release("a", 30) == 40
    with pytest.raises(ValueError, match=r"nbytes=41 is more than session 'a' holds \(40 bytes\)"):
        table.release("a", 41)
    assert table.get("a").kv_bytes == 40 and table.total_bytes == 40
    with pytest.raises(KeyError, match="release: no session 'zz'"):
        table.release("zz", 1)
    table.set_usage("a", 500)  # a measurement is recorded even past the limit
    table.set_usage("b", 20)
    assert table.total_bytes == 520
    table.set_usage("a", 0)
    assert table.total_bytes == 20


@pytest.mark.parametrize("kwargs,match", [
    ({"per_session_limit": 0}, "per_session_limit must be positive"),
    ({"global_limit": "0GiB"}, "global_limit must be positive"),
    ({"global_limit": "20"}, "global_limit"),
    ({"per_session_limit": -5}, "per_session_limit"),
    ({"idle_timeout": 0}, "idle_timeout"),
    ({"idle_timeout": float("nan")}, "idle_timeout"),
    ({"idle_timeout": "300"}, "idle_timeout"),
    ({"clock": 5}, "clock"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SessionTable(**kwargs)


@pytest.mark.parametrize("call,match", [
    (lambda t: t.reserve("a", -1), "nbytes"),
    (lambda t: t.reserve("a", 1.5), "nbytes"),
    (lambda t: t.can_reserve("a", "1MiB"), "nbytes"),
    (lambda t: t.set_usage("a", -2), "nbytes"),
    (lambda t: t.evict_lru(-1), "nbytes_needed"),
    (lambda t: t.touch(""), "session_id"),
    (lambda t: t.touch(None), "session_id"),
    (lambda t: t.begin_request("a", tokens_in=-1), "tokens_in"),
    (lambda t: t.end_request("a", tokens_out=-1), "tokens_out"),
])
def test_bad_calls_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(SessionTable())


# -- requests and books -------------------------------------------------------------------


def test_touch_and_request_books():
    table, clock, _ = make_table()
    first = table.touch("a")
    assert first == Session("a", created=1000.0, last_used=1000.0)
    clock.now = 1005.0
    table.begin_request("a", tokens_in=12)
    clock.now = 1010.0
    session = table.end_request("a", tokens_out=30)
    assert (session.requests, session.tokens_in, session.tokens_out, session.in_flight) == (1, 12, 30, 0)
    assert (session.created, session.last_used) == (1000.0, 1010.0)
    session.kv_bytes = 10**9  # a copy: the table's books do not change
    assert table.get("a").kv_bytes == 0 and table.total_bytes == 0
    with pytest.raises(ValueError, match="no request in flight"):
        table.end_request("a")
    with pytest.raises(KeyError, match="end_request: no session 'b'"):
        table.end_request("b")


def test_stats():
    table, clock, _ = make_table(per_session_limit="1MiB", global_limit="4MiB")
    table.reserve("a", MiB // 2)
    table.begin_request("b", tokens_in=5)
    table.reserve("b", MiB)
    clock.now += 7
    stats = table.stats()
    assert stats["active_sessions"] == 2
    assert stats["total_kv_bytes"] == 3 * MiB // 2 and stats["total_kv_mb"] == 1.5
    assert stats["session_details"]["a"]["kv_mb"] == 0.5
    assert stats["session_details"]["a"]["idle_seconds"] == 7
    assert stats["session_details"]["b"]["in_flight"] == 1
    assert (stats["per_session_limit"], stats["global_limit"], stats["evictions"]) == (MiB, 4 * MiB, 0)


# -- eviction -----------------------------------------------------------------------------


def test_lru_eviction_order_and_callbacks():
    table, _, evicted = make_table(per_session_limit=100, global_limit=1000)
    for sid, nbytes in (("a", 10), ("b", 20), ("c", 30), ("d", 40)):
        table.reserve(sid, nbytes)
    table.touch("a")  # order now b, c, d, a
    assert table.evict_lru(45) == ["b", "c"]  # 20 + 30 >= 45
    assert evicted == [("b", 20), ("c", 30)]
    assert table.total_bytes == 50 and table.evictions == 2 and len(table) == 2
    assert table.evict_lru(0) == []


def test_lru_eviction_skips_in_flight_and_empty_sessions():
    table, _, evicted = make_table(per_session_limit=100, global_limit=1000)
    table.reserve("busy", 90)
    table.begin_request("busy")
    table.touch("empty")
    table.reserve("idle", 30)
    table.touch("busy")  # "busy" is not the oldest anymore, but still in flight
    assert table.evict_lru(25) == ["idle"]
    assert "busy" in table and "empty" in table
    assert evicted == [("idle", 30)]


def test_lru_eviction_is_all_or_nothing():
    table, _, evicted = make_table(per_session_limit=100, global_limit=1000)
    table.reserve("a", 10)
    table.reserve("b", 50)
    table.begin_request("b")
    assert table.evict_lru(11) == []  # only "a" (10 bytes) may go, and that is not enough
    assert evicted == [] and len(table) == 2 and table.evictions == 0
    table.end_request("b")
    assert table.evict_lru(11) == ["a", "b"]


def test_idle_eviction_with_a_fake_clock():
    table, clock, evicted = make_table(per_session_limit=100, global_limit=1000, idle_timeout=60)
    table.reserve("old", 10)
    clock.now += 30
    table.reserve("young", 20)
    table.begin_request("working")
    table.reserve("working", 5)
    clock.now += 30  # "old" idle exactly 60 s: not longer than the timeout
    assert table.evict_idle() == []
    clock.now += 1
    assert table.evict_idle() == ["old"]
    assert table.evict_idle(now=clock.now + 1000) == ["young"]  # "working" is in flight
    assert evicted == [("old", 10), ("young", 20)]
    assert list(table.stats()["session_details"]) == ["working"]
    table.end_request("working")
    assert table.evict_idle(now=clock.now + 61) == ["working"]
    assert table.evictions == 3 and table.total_bytes == 0


def test_callbacks_may_call_back_and_one_failure_does_not_stop_the_others():
    table = SessionTable(per_session_limit=100, global_limit=1000)
    seen = []

    def failing(sid, freed):
        raise RuntimeError(f"cache could not free {sid}")

    table.on_evict.append(failing)
    table.on_evict.append(lambda sid, freed: seen.append((sid, freed, table.stats()["active_sessions"])))
    table.reserve("a", 10)
    table.reserve("b", 10)
    with pytest.raises(RuntimeError, match="could not free a"):
        table.evict_lru(20)
    assert seen == [("a", 10, 0), ("b", 10, 0)]  # both freed, books already updated
    assert table.evictions == 2


def test_threads_keep_the_books():
    table = SessionTable(per_session_limit=10**6, global_limit=10**9)

    def work(sid):
        for _ in range(500):
            table.begin_request(sid)
            table.reserve(sid, 3)
            table.release(sid, 1)
            table.end_request(sid, tokens_out=1)

    threads = [threading.Thread(target=work, args=(f"s{i % 4}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = table.stats()
    assert stats["total_kv_bytes"] == 8 * 500 * 2
    assert sum(d["tokens_out"] for d in stats["session_details"].values()) == 8 * 500
    assert all(d["in_flight"] == 0 for d in stats["session_details"].values())


def test_import_stays_light():
    code = "import sys, memwarden.controller.sessions; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# -- state machine against a brute-force model --------------------------------------------

PER_SESSION, GLOBAL, IDLE = 100, 250, 50.0
ids = st.sampled_from(["a", "b", "c", "d", "e"])
sizes = st.integers(0, 120)


class SessionMachine(RuleBasedStateMachine):
    """The model: plain dicts of bytes, in-flight counts and last use, and a list for the
    LRU order (oldest first)."""

    def __init__(self):
        super().__init__()
        self.clock = FakeClock(0.0)
        self.evicted: list[tuple[str, int]] = []
        self.table = SessionTable(PER_SESSION, GLOBAL, IDLE, clock=self.clock,
                                  on_evict=lambda sid, freed: self.evicted.append((sid, freed)))
        self.bytes: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.last_used: dict[str, float] = {}
        self.order: list[str] = []
        self.evictions = 0

    def use(self, sid):
        if sid not in self.bytes:
            self.bytes[sid], self.in_flight[sid] = 0, 0
        else:
            self.order.remove(sid)
        self.order.append(sid)
        self.last_used[sid] = self.clock.now

    def drop(self, victims):
        for sid in victims:
            self.order.remove(sid)
            del self.bytes[sid], self.in_flight[sid], self.last_used[sid]
        self.evictions += len(victims)

    def check_evicted(self, got, victims, freed):
        assert got == victims
        assert self.evicted == list(zip(victims, freed))
        self.evicted.clear()

    @rule(sid=ids)
    def touch(self, sid):
        self.table.touch(sid)
        self.use(sid)

    @rule(seconds=st.sampled_from([1.0, 20.0, 60.0]))
    def advance(self, seconds):
        self.clock.now += seconds

    @rule(sid=ids)
    def begin_request(self, sid):
        self.table.begin_request(sid)
        self.use(sid)
        self.in_flight[sid] += 1

    @rule(sid=ids)
    def end_request(self, sid):
        if self.in_flight.get(sid, 0) == 0:
            with pytest.raises((KeyError, ValueError)):
                self.table.end_request(sid)
            return
        self.table.end_request(sid)
        self.use(sid)
        self.in_flight[sid] -= 1

    @rule(sid=ids, nbytes=sizes)
    def reserve(self, sid, nbytes):
        held, total = self.bytes.get(sid, 0), sum(self.bytes.values())
        expected = ("session_limit" if held + nbytes > PER_SESSION
                    else "global_limit" if total + nbytes > GLOBAL else "ok")
        assert self.table.can_reserve(sid, nbytes).reason == expected
        verdict = self.table.reserve(sid, nbytes)
        assert (verdict.reason, verdict.session_bytes, verdict.global_bytes) == (expected, held, total)
        if verdict.ok:
            self.use(sid)
            self.bytes[sid] += nbytes
            assert self.table.total_bytes <= GLOBAL  # reserve never takes it over the limit
            assert self.bytes[sid] <= PER_SESSION

    @rule(sid=ids, nbytes=sizes)
    def release(self, sid, nbytes):
        if sid not in self.bytes:
            with pytest.raises(KeyError):
                self.table.release(sid, nbytes)
        elif nbytes > self.bytes[sid]:
            with pytest.raises(ValueError, match="nbytes"):
                self.table.release(sid, nbytes)
        else:
            self.bytes[sid] -= nbytes
            assert self.table.release(sid, nbytes) == self.bytes[sid]

    @rule(sid=ids, nbytes=sizes)
    def set_usage(self, sid, nbytes):
        self.table.set_usage(sid, nbytes)
        self.use(sid)
        self.bytes[sid] = nbytes

    @rule(nbytes=st.integers(0, 300))
    def evict_lru(self, nbytes):
        candidates = [sid for sid in self.order if self.in_flight[sid] == 0 and self.bytes[sid] > 0]
        victims, freed = [], 0
        for sid in candidates:
            if freed >= nbytes:
                break
            victims.append(sid)
            freed += self.bytes[sid]
        if freed < nbytes:
            victims = []
        freed_each = [self.bytes[sid] for sid in victims]
        got = self.table.evict_lru(nbytes)
        self.drop(victims)
        self.check_evicted(got, victims, freed_each)
        assert sum(freed_each) >= nbytes or not victims

    @rule()
    def evict_idle(self):
        victims = [sid for sid in self.order
                   if self.in_flight[sid] == 0 and self.clock.now - self.last_used[sid] > IDLE]
        freed_each = [self.bytes[sid] for sid in victims]
        got = self.table.evict_idle()
        self.drop(victims)
        self.check_evicted(got, victims, freed_each)

    @invariant()
    def books_match_the_model(self):
        stats = self.table.stats()
        details = stats["session_details"]
        assert list(details) == self.order  # least recently used first
        assert {sid: d["kv_bytes"] for sid, d in details.items()} == self.bytes
        assert {sid: d["in_flight"] for sid, d in details.items()} == self.in_flight
        assert stats["total_kv_bytes"] == sum(self.bytes.values()) == self.table.total_bytes
        assert stats["active_sessions"] == len(self.bytes)
        assert stats["evictions"] == self.evictions


SessionMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
TestSessionMachine = SessionMachine.TestCase
