"""The overload trace (memwarden.serve.trace): deterministic, with the shape it promises
(Poisson arrivals, long-tailed lengths within their bounds, Zipf sessions), EOS biases
from the flat-logit formula, summaries against hand-computed numbers, and a short replay
against the real server on loopback in which every request ends in exactly one state and
none is lost."""
from __future__ import annotations

import math
import statistics

import pytest

from memwarden.serve.trace import Outcome, eos_bias, make_trace, prompt_text, summarize


def test_the_trace_is_deterministic_and_shaped_as_promised():
    trace = make_trace(400, rate=5.0, seed=3, prompt_median=100, prompt_max=600, output_median=30,
                       max_tokens=(64, 128), sessions=6)
    assert trace == make_trace(400, rate=5.0, seed=3, prompt_median=100, prompt_max=600, output_median=30,
                               max_tokens=(64, 128), sessions=6)
    assert trace != make_trace(400, rate=5.0, seed=4, prompt_median=100, prompt_max=600, output_median=30,
                               max_tokens=(64, 128), sessions=6)
    gaps = [b.arrival - a.arrival for a, b in zip(trace, trace[1:])]
    assert all(g >= 0 for g in gaps) and statistics.mean(gaps) == pytest.approx(1 / 5.0, rel=0.15)
    prompts = [r.prompt_tokens for r in trace]
    assert 8 <= min(prompts) and max(prompts) <= 600
    assert statistics.median(prompts) == pytest.approx(100, rel=0.2)
    assert max(prompts) > 3 * statistics.median(prompts)  # a long tail
    assert all(2 <= r.mean_output <= r.max_tokens and r.max_tokens in (64, 128) for r in trace)
    counts = [sum(r.session == f"session-{k}" for r in trace) for k in range(6)]
    assert counts[0] > counts[1] > counts[5]  # Zipf popularity
    assert [len(prompt_text(r)) + 1 for r in trace[:20]] == prompts[:20]  # + BOS


def test_eos_bias_gives_the_asked_mean_length_on_flat_logits():
    vocab = 259
    for mean in (5, 40, 200):
        b = eos_bias(mean, vocab)
        p_stop = math.exp(b) / (vocab - 1 + math.exp(b))
        assert 1 / p_stop == pytest.approx(mean, rel=1e-9)
    with pytest.raises(ValueError, match="count"):
        make_trace(0, rate=1.0)


def test_summary_against_hand_computed_figures():
    outcomes = [Outcome(0, "completed", 200, None, 0.0, 1.0, 10, "stop"),
                Outcome(1, "completed", 200, None, 0.5, 3.0, 30, "length", degraded=True),
                Outcome(2, "rejected", 429, "session_limit", 0.6, 0.01),
                Outcome(3, "rejected", 503, "pool_full", 0.7, 0.01),
                Outcome(4, "lost", 500, None, 0.8, 0.2)]
    s = summarize(outcomes, wall=8.0)
    assert (s["completed"], s["rejected"], s["lost"], s["degraded"]) == (2, 2, 1, 1)
    assert s["rejected_by_reason"] == {"session_limit": 1, "pool_full": 1}
    assert s["goodput_tok_s"] == 40 / 8.0
    assert s["latency_p50_s"] == 2.0 and s["latency_p99_s"] == 3.0  # nearest rank of two


def test_a_short_overload_replay_loses_nothing(tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from memwarden.controller.config import MemwardenConfig
    from memwarden.serve.server import Server
    from memwarden.serve.trace import replay

    # 512 B a token: a 64 KiB pool holds 128 tokens; twelve requests of up to 60 + 40 tokens
    # arriving within a second cannot all run at once, so they queue, grow and preempt
    config = MemwardenConfig.load(env={}, overrides={"server.port": 0, "server.max_memory": "64KiB",
                                                     "admission.policy": "memwarden", "server.max_concurrency": 4})
    server = Server(config)
    thread = server.start()
    try:
        trace = make_trace(12, rate=12.0, seed=1, prompt_median=30, prompt_max=60, output_median=15,
                           max_tokens=(40,), sessions=3)
        outcomes, wall = replay(f"http://127.0.0.1:{server.port}", server.engine.name, trace,
                                eos_token=server.engine.eos, vocab_size=server.engine.vocab_size, timeout=120)
        stats = server.controller.memory_stats()
    finally:
        server.stop(thread)
    assert [o.index for o in outcomes] == [r.index for r in trace]
    assert all(o.status in ("completed", "rejected") for o in outcomes)  # none lost
    summary = summarize(outcomes, wall)
    assert summary["completed"] + summary["rejected"] == 12 and summary["completed"] >= 1
    assert stats["completed_count"] == summary["completed"]  # the server's count of each ending agrees
    assert stats["rejected_count"] == summary["rejected"]
    assert stats["kv_reserved_mb"] == 0 and stats["num_requests_running"] == 0
    assert all(o.completion_tokens <= r.max_tokens for o, r in zip(outcomes, trace))


def test_replay_figure_draws_each_case_s_outcomes():
    pytest.importorskip("matplotlib")
    from memwarden.serve.trace import replay_figure

    def case(statuses, latencies):
        outcomes = [Outcome(i, s, 200, None, 0.0, t).to_dict() for i, (s, t) in enumerate(zip(statuses, latencies))]
        return {"requests": len(outcomes), "outcomes": outcomes}

    results = {"a": case(["completed", "completed", "lost"], [1.0, 2.0, 0.1]),
               "b": case(["completed", "rejected", "rejected"], [3.0, 0.0, 0.0])}
    latency, outcome = replay_figure(results).axes
    a_line = latency.get_lines()[0]
    assert list(a_line.get_xdata()) == [1.0, 2.0] and list(a_line.get_ydata()) == pytest.approx([1 / 3, 2 / 3])
    completed, rejected, lost = (list(bar.get_height() for bar in c) for c in outcome.containers)
    assert (completed, rejected, lost) == ([2, 1], [0, 2], [1, 0])
