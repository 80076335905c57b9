"""The TrafficController's preemption by recompute, against hand-computed pools: under
``optimistic`` the newest running request gives its memory back when the pool's use
passes the budget; under ``memwarden`` when a reservation cannot grow; a lone request
that outgrows the pool stops; a preempted request is admitted again ahead of the queue."""
from __future__ import annotations

import threading

import pytest

from memwarden.controller.admission import Request
from memwarden.controller.config import MemwardenConfig
from memwarden.controller.traffic import CONTINUE, PREEMPTED, STOP, TrafficController

PER_TOKEN = 100
BUDGET = 100 * PER_TOKEN  # a pool of 100 tokens


def controller(policy):
    config = MemwardenConfig.load(env={}, overrides={"admission.policy": policy})
    return TrafficController(config, BUDGET, PER_TOKEN)


def resume_in_thread(traffic, ticket, generated):
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(ok=traffic.resume(ticket, generated)))
    thread.start()
    return thread, outcome


def test_optimistic_preempts_the_newest_when_use_passes_the_budget():
    traffic = controller("optimistic")
    a = traffic.acquire(None, 40, 50)
    b = traffic.acquire(None, 40, 50)  # admitted on its prompt: 41 + 41 tokens reserved
    assert traffic.admission.reserved_bytes == 82 * PER_TOKEN
    assert traffic.progress(a, 10) == CONTINUE  # 50 + 41
    assert traffic.progress(b, 10) == CONTINUE  # 50 + 50 = the budget
    assert traffic.progress(a, 11) == CONTINUE  # 51 + 50 > 100: b, the newest, is preempted
    assert b.preempted and traffic.admission.running_ids() == [a.request_id]
    assert traffic.admission.reserved_bytes == 51 * PER_TOKEN
    assert traffic.memory_stats()["preempted_count"] == 1
    assert traffic.progress(b, 11) == PREEMPTED
    thread, outcome = resume_in_thread(traffic, b, 10)  # prompt 50 + 1 token does not fit beside a's 51
    thread.join(0.3)
    assert thread.is_alive() and traffic.admission.queued_ids() == [b.request_id]
    traffic.release(a)
    thread.join(5)
    assert outcome == {"ok": True} and not b.preempted
    assert b.resumed_from == 10 and b.max_tokens == 50
    assert traffic.progress(b, 11) == CONTINUE
    assert traffic.admission.reservation(b.request_id)[1] == (40 + 10 + 1) * PER_TOKEN
    traffic.release(b)
    assert traffic.admission.reserved_bytes == 0 and traffic.memory_stats()["completed_count"] == 2


def warm(traffic, output=2, count=32):
    """Finish ``count`` requests of ``output`` tokens: memwarden then reserves its 16-token minimum."""
    for i in range(count):
        traffic.admission.admit(Request(f"warm{i}", 1, output))
        traffic.admission.on_tokens(f"warm{i}", output)
        traffic.admission.finish(f"warm{i}")


def test_memwarden_preempts_the_newest_when_a_reservation_cannot_grow():
    traffic = controller("memwarden")
    warm(traffic)
    a = traffic.acquire(None, 30, 60)
    b = traffic.acquire(None, 30, 60)  # 30 + 16 tokens each
    assert traffic.admission.reserved_bytes == 92 * PER_TOKEN
    assert traffic.progress(a, 16) == CONTINUE  # within its reservation
    assert traffic.progress(a, 17) == CONTINUE  # grows by the 8 tokens left in the pool
    assert not b.preempted and traffic.admission.reservation(a.request_id)[1] == 54 * PER_TOKEN
    assert all(traffic.progress(a, n) == CONTINUE for n in range(18, 25))
    assert traffic.progress(a, 25) == CONTINUE  # the pool is full: b, the newest, goes and a grows by 16
    assert b.preempted and traffic.admission.reservation(a.request_id)[1] == 70 * PER_TOKEN
    assert traffic.progress(b, 5) == PREEMPTED
    traffic.release(b)  # the client gave up while preempted: nothing is held, nothing breaks
    traffic.release(a)
    assert traffic.admission.reserved_bytes == 0


@pytest.mark.parametrize("policy", ["memwarden", "optimistic"])
def test_without_preemption_a_reservation_overcommits_rather_than_cutting_the_answer_short(policy):
    """In front of an engine that schedules its own KV (the gateway: can_preempt=False), the
    same growth that preempts b above overcommits the pool, and both answers go on."""
    config = MemwardenConfig.load(env={}, overrides={"admission.policy": policy})
    traffic = TrafficController(config, BUDGET, PER_TOKEN, can_preempt=False)
    warm(traffic)
    a = traffic.acquire(None, 30, 60)
    b = traffic.acquire(None, 30, 60)
    assert all(traffic.progress(a, n) == CONTINUE for n in range(1, 61))
    assert all(traffic.progress(b, n) == CONTINUE for n in range(1, 61))
    assert not (a.preempted or b.preempted or a.cut_short or b.cut_short)
    assert traffic.admission.used_bytes == 180 * PER_TOKEN > BUDGET  # 30 + 60 each, past the pool's 100
    stats = traffic.memory_stats()
    assert stats["preempted_count"] == 0 and stats["cut_short_count"] == 0
    assert (stats["overcommitted_count"] > 0) == (policy == "memwarden")  # optimistic reserves as it goes
    traffic.release(a)
    traffic.release(b)
    assert traffic.admission.reserved_bytes == 0


def test_a_request_that_alone_outgrows_the_pool_stops():
    traffic = controller("memwarden")
    warm(traffic)
    a = traffic.acquire(None, 30, 90)  # may ask for 90 tokens; the pool holds 70 beside its prompt
    verdicts = [traffic.progress(a, n) for n in range(1, 72)]  # the generating loop ends at STOP
    assert verdicts == [CONTINUE] * 70 + [STOP]
    assert a.cut_short and traffic.memory_stats()["cut_short_count"] == 1
    traffic.release(a)


def test_the_newest_preempts_itself_and_comes_back_ahead_of_newcomers():
    traffic = controller("optimistic")
    a = traffic.acquire(None, 45, 50)
    b = traffic.acquire(None, 45, 50)
    assert traffic.progress(a, 5) == CONTINUE  # 50 + 46
    assert traffic.progress(b, 5) == CONTINUE  # 50 + 50: the budget
    assert traffic.progress(b, 6) == PREEMPTED  # 50 + 51: b is the newest, it goes itself
    c = traffic.acquire(None, 10, 5)  # 11 tokens fit beside a's 50
    thread, outcome = resume_in_thread(traffic, b, 6)  # 51 + 1 tokens do not: b waits
    thread.join(0.3)
    d_thread = threading.Thread(target=lambda: outcome.update(d=traffic.acquire(None, 1, 1)))
    d_thread.start()  # a newcomer queues behind b
    d_thread.join(0.3)
    assert traffic.admission.queued_ids() == [b.request_id, "req-3"]
    traffic.release(a)
    thread.join(5)
    d_thread.join(5)
    assert outcome["ok"] is True and traffic.admission.running_ids() == [c.request_id, b.request_id, "req-3"]
    for ticket in (b, c, outcome["d"]):
        traffic.release(ticket)
    assert traffic.admission.reserved_bytes == 0


@pytest.mark.parametrize("policy", ["reserve", "admit_all"])
def test_policies_without_preemption_never_preempt(policy):
    traffic = controller(policy)
    tickets = [traffic.acquire(None, 40, 10) for _ in range(2)]
    assert all(traffic.progress(t, n) == CONTINUE for t in tickets for n in range(1, 11))
    assert traffic.memory_stats()["preempted_count"] == 0
    for t in tickets:
        traffic.release(t)


def test_degradation_off_serves_every_request_as_asked():
    config = MemwardenConfig.load(env={}, overrides={"admission.policy": "reserve", "degradation.enabled": "false"})
    traffic = TrafficController(config, BUDGET, PER_TOKEN)
    first = traffic.acquire(None, 45, 50)  # 95 of the 100 tokens reserved; 45 held
    assert traffic.progress(first, 50) == CONTINUE  # 95 held: emergency pressure
    second = traffic.acquire("new-session", 1, 4, temperature=1.0, top_p=1.0)
    assert not second.applied.degraded and second.max_tokens == 4 and second.applied.level == "low"
    for ticket in (first, second):
        traffic.release(ticket)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_idle_sessions_are_evicted_as_requests_come():
    clock = FakeClock()
    config = MemwardenConfig.load(env={}, overrides={"sessions.idle_timeout": 10})
    traffic = TrafficController(config, BUDGET, PER_TOKEN, clock=clock)
    traffic.release(traffic.acquire("alice", 5, 5))
    clock.now = 5.0
    traffic.release(traffic.acquire("bob", 5, 5))
    clock.now = 12.0  # alice idle for 12 s, bob for 7
    traffic.release(traffic.acquire("carol", 5, 5))
    assert traffic.sessions.get("alice") is None and traffic.sessions.get("bob") is not None
    assert traffic.sessions.evictions == 1
