"""memwarden.controller.admission: hand-computed decisions for each policy, then a hypothesis
state machine that drives random request streams (admit, progress, extend, finish in any
order, preempt, queue timeouts) against a brute-force model that recomputes every sum from
scratch, checking the budget invariant, FIFO order, the queue bound and that every request
ends in exactly one terminal state."""
from __future__ import annotations

import math
import threading

import hypothesis.strategies as st
import pytest
from hypothesis import given as hypothesis_given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memwarden.controller import admission as admission_module
from memwarden.controller.admission import VERDICTS, AdmissionController, Decision, Request


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def controller(policy, budget=1000, per_token=10, **kwargs):
    return AdmissionController(budget, per_token, policy=policy, **kwargs)


def numbers(decision: Decision):
    return (decision.verdict, decision.reason, decision.granted_max_tokens, decision.needed_bytes,
            decision.free_bytes, decision.reserved_bytes)


# -- hand-computed: budget 1000 B, 10 B/token, so 100 tokens fit --------------------------

def test_the_same_50_plus_60_request_under_each_policy():
    request = Request("r", prompt_tokens=50, max_tokens=60)  # (50 + 60) * 10 = 1100 B > 1000
    assert numbers(controller("admit_all").admit(request)) == ("accept", "admit_all", 60, 1100, 1000, 1100)
    reserve = controller("reserve").admit(request)
    assert numbers(reserve) == ("reject", "exceeds_budget", 0, 1100, 1000, 0)
    assert reserve.retry_after is None  # it can never fit: retrying cannot help
    # optimistic pays the prompt and one token: (50 + 1) * 10
    assert numbers(controller("optimistic").admit(request)) == ("accept", "fits", 60, 510, 1000, 510)
    # memwarden has no samples yet, so it wants max_tokens; 100 - 50 = 50 output tokens fit
    assert numbers(controller("memwarden").admit(request)) == ("shrink", "shrunk_to_fit", 50, 1100, 1000, 1000)


def test_reserve_queues_what_fits_an_empty_pool_and_admits_it_on_finish():
    admission = controller("reserve")
    assert numbers(admission.admit(Request("a", 50, 40))) == ("accept", "fits", 40, 900, 1000, 900)
    queued = admission.admit(Request("b", 5, 10))  # 150 B > 100 B free
    assert numbers(queued) == ("queue", "pool_full", 0, 150, 100, 0)
    assert queued.retry_after == 30.0
    assert admission.queued_ids() == ["b"]
    [admitted] = admission.finish("a")
    assert numbers(admitted) == ("accept", "fits", 10, 150, 1000, 150)
    assert admission.reserved_bytes == 150 and admission.running_ids() == ["b"]


def test_reserve_rejects_a_prompt_that_cannot_fit_with_one_token():
    decision = controller("reserve").admit(Request("r", 100, 1))  # (100 + 1) * 10 = 1010 B
    assert numbers(decision) == ("reject", "prompt_too_long", 0, 1010, 1000, 0)


def test_check_admission_changes_nothing():
    admission = controller("reserve")
    assert admission.check_admission(Request("a", 50, 40)).verdict == "accept"
    assert admission.reserved_bytes == 0 and admission.running_ids() == []
    assert admission.decision_counts() == {}


def test_optimistic_admits_on_use_and_preempts_the_newest():
    admission = controller("optimistic")
    admission.admit(Request("a", 20, 100))  # uses 210 B
    admission.admit(Request("b", 20, 100))  # 420 B
    admission.on_tokens("a", 50)  # a now uses (20 + 50) * 10 = 700 B: 910 B in all
    assert admission.reserved_bytes == 910
    queued = admission.admit(Request("c", 20, 5))  # needs 210 B, 90 B free
    assert numbers(queued) == ("queue", "pool_full", 0, 210, 90, 0)
    admission.on_tokens("b", 40)  # 700 + 600: the running set outgrows the budget
    assert admission.reserved_bytes == 1300 and admission.free_bytes == 0
    assert admission.preempt() == "b"
    assert admission.reserved_bytes == 700 and admission.preemptions == 1
    assert admission.queued_ids() == ["c"]  # preemption does not drain the queue
    assert admission.preempt("a") == "a" and admission.preempt() is None


def test_memwarden_reserves_a_quantile_of_observed_outputs_and_extends():
    admission = controller("memwarden", budget=10_000, min_output_tokens=4, warmup_samples=10)
    for i, generated in enumerate(range(11, 21)):
        assert admission.output_estimate is None
        admission.admit(Request(f"warm{i}", 1, 30))
        admission.on_tokens(f"warm{i}", generated)
        admission.finish(f"warm{i}")
    assert admission.output_estimate == 19  # nearest rank: ceil(0.9 * 10) = 9th of 11..20
    decision = admission.admit(Request("a", 20, 200))  # reserves 20 + 19 tokens, grants 200
    assert numbers(decision) == ("accept", "fits", 200, 390, 10_000, 390)
    admission.admit(Request("b", 900, 300))  # reserves 900 + 19 tokens: 958 of 1000 in all
    admission.on_tokens("a", 19)
    with pytest.raises(ValueError, match="generated=20 .*extend"):
        admission.on_tokens("a", 20)
    assert admission.extend("a", 50) is False  # 1008 tokens > 1000
    assert admission.extend("a", 42) is True and admission.reserved_bytes == 10_000
    assert admission.reservation("a") == (200, 810, 19)
    with pytest.raises(ValueError, match="granted_max_tokens=200"):
        admission.extend("a", 140)  # 61 + 140 output tokens > 200


def test_memwarden_queues_rather_than_shrinking_below_min_output_tokens():
    admission = controller("memwarden")  # min_output_tokens=16
    admission.admit(Request("a", 50, 40))  # 900 B
    # 100 B free = 10 tokens, 5 of them for output: fewer than 16
    assert numbers(admission.admit(Request("b", 5, 20))) == ("queue", "pool_full", 0, 250, 100, 0)
    # c would fit, but b waits: FIFO, nobody overtakes
    assert numbers(admission.admit(Request("c", 1, 5))) == ("queue", "behind_queue", 0, 60, 100, 0)
    assert [d.request_id for d in admission.finish("a")] == ["b", "c"]


def test_memwarden_routes_long_prompts_and_what_can_never_fit():
    admission = controller("memwarden", route_above_tokens=100, budget=2000)
    assert numbers(admission.admit(Request("long", 150, 10))) == ("route", "too_large_routed", 0, 1600, 2000, 0)
    assert admission.admit(Request("ok", 100, 10)).verdict == "accept"
    small = controller("memwarden", route_above_tokens=500)
    assert small.admit(Request("huge", 99, 100)).verdict == "route"  # (99 + 16) * 10 > 1000


def test_route_above_tokens_belongs_to_memwarden():
    with pytest.raises(ValueError, match="route_above_tokens"):
        controller("reserve", route_above_tokens=10)


def test_queue_full_and_no_queue():
    admission = controller("reserve", queue_limit=1)
    admission.admit(Request("a", 50, 50))
    assert admission.admit(Request("b", 10, 10)).verdict == "queue"
    full = admission.admit(Request("c", 10, 10))
    assert numbers(full) == ("reject", "queue_full", 0, 200, 0, 0) and full.retry_after == 1.0
    unqueued = controller("reserve", queue_limit=0)
    unqueued.admit(Request("a", 50, 50))
    assert numbers(unqueued.admit(Request("b", 10, 10))) == ("reject", "pool_full", 0, 200, 0, 0)


def test_queue_timeout_and_retry_after_from_service_times():
    clock = FakeClock()
    admission = controller("reserve", queue_timeout=5.0, clock=clock)
    admission.admit(Request("a", 50, 50))
    admission.admit(Request("b", 10, 10))
    clock.now = 4.0
    admission.admit(Request("c", 10, 10))
    assert admission.expire_queue() == []
    clock.now = 5.0
    [expired] = admission.expire_queue()
    assert numbers(expired) == ("reject", "queue_timeout", 0, 200, 0, 0)
    assert admission.queued_ids() == ["c"]
    assert [d.reason for d in admission.expire_queue(now=9.0)] == ["queue_timeout"]
    # a ran 12 s: with nothing finished before, that is the retry hint
    clock.now = 12.0
    assert admission.finish("a") == []
    admission.admit(Request("d", 50, 50))
    unqueued = controller("reserve", queue_limit=0, clock=clock)
    unqueued.admit(Request("x", 50, 50))
    clock.now = 15.0
    unqueued.finish("x")  # 3 s
    unqueued.admit(Request("y", 50, 50))
    assert unqueued.admit(Request("z", 50, 50)).retry_after == 3.0


def test_finish_cancels_a_queued_request_and_drains_behind_it():
    admission = controller("reserve")
    admission.admit(Request("a", 50, 30))  # 800 B
    admission.admit(Request("big", 50, 10))  # 600 B: queued
    admission.admit(Request("small", 5, 5))  # 100 B: queued behind big
    [decision] = admission.finish("big")
    assert decision.request_id == "small" and decision.verdict == "accept"


def test_session_check_refuses_with_its_reason():
    asked = []

    def session_check(session_id, nbytes):
        asked.append((session_id, nbytes))
        return (session_id != "greedy", "session_kv_limit")

    admission = controller("reserve", session_check=session_check)
    refused = admission.admit(Request("a", 10, 10, session_id="greedy"))
    assert numbers(refused) == ("reject", "session_kv_limit", 0, 200, 1000, 0)
    assert admission.admit(Request("b", 10, 10, session_id="polite")).verdict == "accept"
    assert admission.admit(Request("c", 10, 10)).verdict == "accept"  # no session: not asked
    assert asked == [("greedy", 200), ("polite", 200)]
    default = controller("reserve", session_check=lambda s, n: (False, ""))
    assert default.admit(Request("a", 1, 1, session_id=1)).reason == "session_limit"


def test_admit_all_counts_but_never_checks():
    admission = controller("admit_all")
    for i in range(3):
        assert admission.admit(Request(i, 50, 60)).verdict == "accept"
    assert admission.reserved_bytes == 3300 and admission.free_bytes == 0
    assert admission.decision_counts() == {("accept", "admit_all"): 3}


def test_counters_by_verdict_and_reason():
    admission = controller("reserve")
    admission.admit(Request("a", 50, 40))
    admission.admit(Request("b", 5, 10))
    admission.admit(Request("c", 100, 10))
    admission.finish("a")
    assert admission.decision_counts() == {("accept", "fits"): 2, ("queue", "pool_full"): 1,
                                           ("reject", "prompt_too_long"): 1}


@pytest.mark.parametrize("kwargs, name", [
    (dict(budget_bytes=0), "budget_bytes"), (dict(budget_bytes="12"), "budget_bytes"),
    (dict(bytes_per_token=0), "bytes_per_token"), (dict(bytes_per_token=1.5), "bytes_per_token"),
    (dict(policy="vllm"), "policy"), (dict(queue_limit=-1), "queue_limit"),
    (dict(queue_timeout=0), "queue_timeout"), (dict(queue_timeout=float("nan")), "queue_timeout"),
    (dict(min_output_tokens=0), "min_output_tokens"), (dict(clock=3), "clock"),
    (dict(session_check="yes"), "session_check"), (dict(output_quantile=0), "output_quantile"),
    (dict(warmup_samples=10_000), "warmup_samples"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    arguments = dict(budget_bytes="1 KiB", bytes_per_token=10) | kwargs
    with pytest.raises(ValueError, match=name):
        AdmissionController(**arguments)


def test_bad_requests_and_calls_name_their_argument():
    with pytest.raises(ValueError, match="prompt_tokens"):
        Request("r", 0, 5)
    with pytest.raises(ValueError, match="max_tokens"):
        Request("r", 5, True)
    with pytest.raises(ValueError, match="arrival"):
        Request("r", 5, 5, arrival=float("inf"))
    admission = controller("memwarden")
    with pytest.raises(ValueError, match="request must be a Request"):
        admission.admit(("r", 5, 5))
    admission.admit(Request("r", 5, 5))
    with pytest.raises(ValueError, match="already running"):
        admission.admit(Request("r", 5, 5))
    with pytest.raises(ValueError, match="generated"):
        admission.on_tokens("r", 6)
    with pytest.raises(ValueError, match="tokens"):
        admission.extend("r", 0)
    with pytest.raises(ValueError, match="request_id 'nope'"):
        admission.finish("nope")
    with pytest.raises(ValueError, match="request_id 'nope'"):
        admission.preempt("nope")
    with pytest.raises(ValueError, match="now"):
        admission.expire_queue(now="soon")


def test_budget_accepts_a_size_string():
    assert controller("reserve", budget="1 KiB").budget_bytes == 1024


def test_threads_keep_the_budget():
    admission = controller("memwarden", budget=100_000, queue_limit=10_000)
    peak = []

    def worker(offset):
        for i in range(300):
            request_id = offset + i
            decision = admission.admit(Request(request_id, 1 + i % 37, 1 + i % 91))
            peak.append(admission.reserved_bytes)
            if decision.admitted:
                admission.finish(request_id)

    threads = [threading.Thread(target=worker, args=(n * 1000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(peak) <= 100_000
    for request_id in admission.queued_ids():
        admission.finish(request_id)
    for request_id in admission.running_ids():
        admission.finish(request_id)
    assert admission.reserved_bytes == 0 and admission.queued_ids() == []


# -- brute-force model and state machine ---------------------------------------------------

BUDGET, PER_TOKEN, QUEUE_LIMIT, TIMEOUT, MIN_OUTPUT, WARMUP, QUANTILE = 2000, 10, 4, 5.0, 8, 3, 0.9
ROUTE_ABOVE = 150
TERMINAL = {"finished", "rejected", "routed", "expired"}  # a preempted request may be resumed


def model_session_check(session_id, nbytes):
    return (not (session_id == "capped" and nbytes > 600), "session_limit")


class Model:
    """Admission written the slow, obvious way: every sum recomputed from the lists."""

    def __init__(self, policy, route_above):
        self.policy, self.route_above = policy, route_above
        self.running = []  # dicts, in admission order
        self.queue = []  # (request, queued_at, needed), head first
        self.outputs = []

    def reserved_tokens(self):
        return sum(r["reserved"] for r in self.running)

    def estimate(self):
        window = sorted(self.outputs[-512:])
        return window[math.ceil(QUANTILE * len(window)) - 1] if len(window) >= WARMUP else None

    def decide(self, request, at_head):
        """(verdict, reason, granted, needed, free, reserved bytes), reserved tokens."""
        p, m = request.prompt_tokens, request.max_tokens
        free = max(0, BUDGET - self.reserved_tokens() * PER_TOKEN)
        if self.policy == "admit_all":
            if request.session_id is not None and not model_session_check(request.session_id, (p + m) * PER_TOKEN)[0]:
                return ("reject", "session_limit", 0, (p + m) * PER_TOKEN, free, 0), 0
            return ("accept", "admit_all", m, (p + m) * PER_TOKEN, free, (p + m) * PER_TOKEN), p + m
        estimate = self.estimate()
        fewest, output = {
            "reserve": (m, m),
            "optimistic": (1, 1),
            "memwarden": (min(MIN_OUTPUT, m), max(min(MIN_OUTPUT, m), min(m if estimate is None else estimate, m))),
        }[self.policy]
        needed = (p + output) * PER_TOKEN

        def outcome(verdict, reason):
            return (verdict, reason, 0, needed, free, 0), 0

        if self.route_above is not None and (p > self.route_above or (p + fewest) * PER_TOKEN > BUDGET):
            return outcome("route", "too_large_routed")
        if (p + 1) * PER_TOKEN > BUDGET:
            return outcome("reject", "prompt_too_long")
        if (p + fewest) * PER_TOKEN > BUDGET:
            return outcome("reject", "exceeds_budget")
        verdict, granted, reserved = None, 0, 0
        if not self.queue or at_head:
            if needed <= free:
                verdict, reason, granted, reserved = "accept", "fits", m, p + output
            elif self.policy == "memwarden" and free // PER_TOKEN - p >= fewest:
                granted = free // PER_TOKEN - p
                verdict, reason, reserved = "shrink", "shrunk_to_fit", p + granted
            else:
                reason = "pool_full"
        else:
            reason = "behind_queue"
        if verdict is None and not at_head and len(self.queue) >= QUEUE_LIMIT:
            return outcome("reject", "queue_full")
        asked = reserved * PER_TOKEN if verdict else needed
        if request.session_id is not None and not model_session_check(request.session_id, asked)[0]:
            return outcome("reject", "session_limit")
        if verdict is None:
            return outcome("queue", reason)
        return (verdict, reason, granted, needed, free, reserved * PER_TOKEN), reserved


class AdmissionMachine(RuleBasedStateMachine):
    policy = "memwarden"
    route_above = None

    def __init__(self):
        super().__init__()
        self.clock = FakeClock()
        self.admission = AdmissionController(
            BUDGET, PER_TOKEN, policy=self.policy, route_above_tokens=self.route_above,
            queue_limit=QUEUE_LIMIT, queue_timeout=TIMEOUT, min_output_tokens=MIN_OUTPUT,
            clock=self.clock, session_check=model_session_check, warmup_samples=WARMUP,
            output_quantile=QUANTILE)
        self.model = Model(self.policy, self.route_above)
        self.state = {}  # request id -> its state in the model
        self.preempted = {}  # request id -> its running entry when it was preempted
        self.next_id = 0

    def set_state(self, request_id, state):
        assert self.state.get(request_id) not in TERMINAL, f"{request_id} left a terminal state"
        self.state[request_id] = state

    def apply(self, request, outcome, reserved_tokens):
        verdict = outcome[0]
        if verdict in ("accept", "shrink"):
            self.model.running.append(dict(request=request, granted=outcome[2], reserved=reserved_tokens,
                                           generated=0))
            self.set_state(request.request_id, "running")
        elif verdict == "queue":
            self.set_state(request.request_id, "queued")
        else:
            self.set_state(request.request_id, "routed" if verdict == "route" else "rejected")

    def drain(self):
        """The decisions the model takes for its queue head (timeouts first, FIFO)."""
        taken = []
        free = max(0, BUDGET - self.model.reserved_tokens() * PER_TOKEN)
        for entry in [q for q in self.model.queue if self.clock.now - q[1] >= TIMEOUT]:  # anywhere in the queue
            request, _, needed = entry
            self.model.queue.remove(entry)
            self.set_state(request.request_id, "expired")
            taken.append((request.request_id, "reject", "queue_timeout", 0, needed, free, 0))
        while self.model.queue:
            request, queued_at, needed = self.model.queue[0]
            outcome, reserved = self.model.decide(request, at_head=True)
            if outcome[0] == "queue":
                break
            self.apply(request, outcome, reserved)
            self.model.queue.pop(0)
            taken.append((request.request_id,) + outcome)
        return taken

    @rule(prompt=st.integers(1, 220), max_tokens=st.integers(1, 120),
          session=st.sampled_from([None, None, "open", "capped"]))
    def admit(self, prompt, max_tokens, session):
        request = Request(self.next_id, prompt, max_tokens, session_id=session)
        self.next_id += 1
        expected, reserved = self.model.decide(request, at_head=False)
        assert numbers(self.admission.check_admission(request)) == expected
        decision = self.admission.admit(request)
        assert numbers(decision) == expected and decision.verdict in VERDICTS
        if decision.verdict == "queue":
            assert decision.retry_after == TIMEOUT
            self.model.queue.append((request, self.clock.now, decision.needed_bytes))
        self.apply(request, expected, reserved)

    @precondition(lambda self: self.model.running or self.model.queue)
    @rule(data=st.data())
    def finish(self, data):
        ids = [r["request"].request_id for r in self.model.running] + [q[0].request_id for q in self.model.queue]
        request_id = data.draw(st.sampled_from(ids))
        running = next((r for r in self.model.running if r["request"].request_id == request_id), None)
        if running is not None:
            self.model.running.remove(running)
            self.model.outputs.append(running["generated"])
            self.set_state(request_id, "finished")
        else:
            self.model.queue = [q for q in self.model.queue if q[0].request_id != request_id]
            self.set_state(request_id, "finished")  # cancelled while waiting
        expected = self.drain()
        assert [(d.request_id,) + numbers(d) for d in self.admission.finish(request_id)] == expected

    @precondition(lambda self: self.model.running)
    @rule(data=st.data())
    def progress(self, data):
        run = data.draw(st.sampled_from(self.model.running))
        prompt = run["request"].prompt_tokens
        bounded = self.policy in ("reserve", "memwarden")
        most = min(run["granted"], run["reserved"] - prompt) if bounded else run["granted"]
        generated = data.draw(st.integers(0, most))
        self.admission.on_tokens(run["request"].request_id, generated)
        run["generated"] = generated
        if self.policy == "optimistic":
            run["reserved"] = prompt + max(generated, 1)

    @precondition(lambda self: self.model.running)
    @rule(data=st.data())
    def extend(self, data):
        run = data.draw(st.sampled_from(self.model.running))
        room = run["granted"] - (run["reserved"] - run["request"].prompt_tokens)
        if room < 1:
            return
        tokens = data.draw(st.integers(1, room))
        fits = self.model.reserved_tokens() + tokens <= BUDGET // PER_TOKEN
        bounded = self.policy in ("reserve", "memwarden")
        assert self.admission.extend(run["request"].request_id, tokens) == (fits or not bounded)
        if bounded and fits:
            run["reserved"] += tokens

    @precondition(lambda self: self.model.running)
    @rule()
    def preempt(self):
        newest = self.model.running.pop()
        assert self.admission.preempt() == newest["request"].request_id
        self.set_state(newest["request"].request_id, "preempted")
        self.preempted[newest["request"].request_id] = newest

    @precondition(lambda self: any(state == "preempted" for state in self.state.values()))
    @rule(data=st.data())
    def resume(self, data):
        """A preempted request comes back with what it generated as prompt, ahead of the queue."""
        request_id = data.draw(st.sampled_from(sorted(r for r, state in self.state.items() if state == "preempted")))
        before = self.preempted[request_id]
        generated = data.draw(st.integers(0, max(0, before["granted"] - 1)))
        request = Request(request_id, before["request"].prompt_tokens + generated, before["granted"] - generated,
                          session_id=before["request"].session_id)
        expected, reserved = self.model.decide(request, at_head=True)
        decision = self.admission.resume(request)
        assert numbers(decision) == expected
        if decision.verdict == "queue":
            self.model.queue.insert(0, (request, self.clock.now, decision.needed_bytes))
        self.state[request_id] = "resuming"  # leaves "preempted" (not terminal) for apply
        self.apply(request, expected, reserved)

    @rule(seconds=st.sampled_from([0.5, 2.0, 6.0]))
    def wait(self, seconds):
        self.clock.now += seconds
        expected = self.drain()
        assert [(d.request_id,) + numbers(d) for d in self.admission.expire_queue()] == expected

    @invariant()
    def matches_the_model(self):
        assert self.admission.running_ids() == [r["request"].request_id for r in self.model.running]
        assert self.admission.queued_ids() == [q[0].request_id for q in self.model.queue]  # FIFO
        assert self.admission.reserved_bytes == self.model.reserved_tokens() * PER_TOKEN
        held = sum(r["request"].prompt_tokens + r["generated"] for r in self.model.running)
        assert self.admission.used_bytes == held * PER_TOKEN
        assert self.admission.output_estimate == self.model.estimate()

    @invariant()
    def reservations_stay_within_the_budget(self):
        if self.policy in ("reserve", "memwarden"):
            assert self.admission.reserved_bytes <= BUDGET

    @invariant()
    def queue_is_bounded(self):
        # resumed requests wait at the head beyond the limit: only newcomers meet it
        assert len([r for r in self.admission.queued_ids() if r not in self.preempted]) <= QUEUE_LIMIT

    @invariant()
    def every_request_is_in_exactly_one_state(self):
        running, queued = set(self.admission.running_ids()), set(self.admission.queued_ids())
        assert not running & queued
        for request_id, state in self.state.items():
            assert (request_id in running) == (state == "running")
            assert (request_id in queued) == (state == "queued")

    def teardown(self):
        # finishing what runs (admitting what waits) empties the controller
        while self.admission.running_ids() or self.admission.queued_ids():
            self.admission.finish((self.admission.running_ids() or self.admission.queued_ids())[0])
        assert self.admission.reserved_bytes == 0


MACHINE_SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None)


def machine_for(policy, route_above=None):
    return type(f"{policy}Machine", (AdmissionMachine,), {"policy": policy, "route_above": route_above})


TestAdmitAll = MACHINE_SETTINGS(machine_for("admit_all")).TestCase
TestReserve = MACHINE_SETTINGS(machine_for("reserve")).TestCase
TestOptimistic = MACHINE_SETTINGS(machine_for("optimistic")).TestCase
TestMemwarden = MACHINE_SETTINGS(machine_for("memwarden")).TestCase
TestMemwardenRouting = MACHINE_SETTINGS(machine_for("memwarden", ROUTE_ABOVE)).TestCase



# -- lookahead: the projected peak, by hand and against a simulated batching engine -------

def test_lookahead_admits_what_the_peak_leaves_room_for_and_reserve_does_not():
    # budget 1000 tokens (1 B each). a: 400 prompt + 100 out; b: 100 prompt + 450 out.
    # reserve: 500 + 550 > 1000. lookahead: a grows to 500 and leaves at t = 100, when b
    # holds 200: U(100) = 700; then b alone grows to 550. Peak 700.
    reserve, lookahead = controller("reserve", per_token=1), controller("lookahead", per_token=1)
    for admission in (reserve, lookahead):
        assert admission.admit(Request("a", 400, 100)).verdict == "accept"
    assert numbers(reserve.admit(Request("b", 100, 450))) == ("queue", "pool_full", 0, 550, 500, 0)
    # free: the budget less a's own peak (500)
    assert numbers(lookahead.admit(Request("b", 100, 450))) == ("accept", "fits", 450, 550, 500, 550)
    assert lookahead.reserved_bytes == 1050  # reservations may sum past the budget; the peak may not
    # c would hold 301 at t = 100 beside a's 500 and b's 200: 1001; one token of prompt less fits
    assert lookahead.check_admission(Request("c", 201, 300)).verdict == "queue"
    assert lookahead.check_admission(Request("c", 200, 300)).verdict == "accept"
    # in blocks of 128: a's 500 take 4 blocks (512); at t = 100 b's 200 take 2 (256): 768
    blocks = controller("lookahead", per_token=1, block_tokens=128)
    blocks.admit(Request("a", 400, 100))
    assert numbers(blocks.admit(Request("b", 100, 450))) == ("accept", "fits", 450, 550, 488, 550)
    tight = controller("lookahead", budget=767, per_token=1, block_tokens=128)
    tight.admit(Request("a", 400, 100))
    assert tight.admit(Request("b", 100, 450)).verdict == "queue"  # 768 > 767
    with pytest.raises(ValueError, match="block_tokens"):
        controller("lookahead", block_tokens=0)


def test_lookahead_rejects_like_reserve():
    admission = controller("lookahead")
    assert numbers(admission.admit(Request("r", 50, 60))) == ("reject", "exceeds_budget", 0, 1100, 1000, 0)
    assert admission.admit(Request("p", 100, 1)).reason == "prompt_too_long"


@settings(max_examples=200, deadline=None)
@pytest.mark.parametrize("block,exact_up_to", [(1, 64), (16, 64), (16, 0)])
@hypothesis_given(requests=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300), st.integers(0, 3)),
                                    min_size=1, max_size=40))
def test_lookahead_never_overfills_an_engine_that_advances_every_request_together(block, exact_up_to, requests):
    """A brute-force engine: each step admits arrivals (FIFO), gives every running request
    one token, and ends those at their max_tokens. What it holds -- every running request's
    prompt and output, in whole blocks -- is summed from scratch each step and must never
    pass the budget (so the engine would never preempt), and every request must end."""
    budget = 1024
    exact = admission_module._EXACT_BLOCKS_UP_TO
    admission_module._EXACT_BLOCKS_UP_TO = exact_up_to  # 0: the B - 1 bound throughout
    try:
        simulate_batching_engine(block, requests, budget)
    finally:
        admission_module._EXACT_BLOCKS_UP_TO = exact


def simulate_batching_engine(block, requests, budget):
    admission = AdmissionController(budget, 1, policy="lookahead", queue_limit=len(requests), queue_timeout=1e9,
                                    block_tokens=block)
    arrivals = {}  # step -> requests arriving then
    for index, (prompt, output, gap) in enumerate(requests):
        arrivals.setdefault(index + gap, []).append(Request(index, prompt, output))
    running, ended = {}, set()  # id -> [prompt, max_tokens, generated]
    for step in range(10_000):
        for request in arrivals.get(step, []):
            decision = admission.admit(request)
            if decision.admitted:
                running[request.request_id] = [request.prompt_tokens, request.max_tokens, 0]
            elif decision.verdict == "reject":
                ended.add(request.request_id)
                assert request.prompt_tokens + request.max_tokens > budget
        for request_id, run in running.items():
            run[2] += 1
            admission.on_tokens(request_id, run[2])
        held = sum(-(-(prompt + generated) // block) * block for prompt, _, generated in running.values())
        assert held <= budget
        for request_id in [rid for rid, run in running.items() if run[2] == run[1]]:
            del running[request_id]
            ended.add(request_id)
            for decision in admission.finish(request_id):
                assert decision.admitted
                request_id = decision.request_id
                prompt, output = requests[request_id][:2]
                running[request_id] = [prompt, output, 0]
        if len(ended) == len(requests):
            break
    assert len(ended) == len(requests) and not admission.running_ids() and not admission.queued_ids()
