"""An overload trace and its replay: what ``benchmarks/bench_serve.py`` (and the gateway
benchmark) send to a server, and what became of each request.

:func:`make_trace` is deterministic for a seed: Poisson arrivals at ``rate`` requests a
second, long-tailed (log-normal) prompt and output lengths, and sessions of Zipf
popularity. Output lengths are steered, not cut: each request carries a ``logit_bias`` on
the end-of-sequence token, so with a random-weight model (near-flat logits over ``V``
tokens) the model ends each step with probability ``e^b / (V - 1 + e^b)`` and answers
``mean_output`` tokens on average (a geometric length), while ``max_tokens`` is what the
client asks for -- as real clients ask for far more than they get.

:func:`replay` has two switches for an engine without a tokenizer (vLLM with
``--skip-tokenizer-init``): ``prompt_ids=True`` sends each prompt as ``prompt_tokens``
token ids (:func:`prompt_token_ids`, drawn from the request's seed, none of them a special
token), and ``exact_lengths=True`` sends ``max_tokens`` = the request's output length
(``mean_output`` rounded) with ``ignore_eos`` and no ``seed``, so every request makes
exactly that many tokens unless the server shrinks it -- identical work whoever serves
it, where the EOS bias gives lengths that depend on the model's logits. (vLLM's CPU
build fails a seeded request whose prefill is split into chunks: "CPU Generator does not
use offset", and the engine dies.)

:func:`replay` sends the trace with the official ``openai`` client, one thread per
request at its arrival time, each with a timeout, and returns an :class:`Outcome` per
request: ``completed`` (an answer), ``rejected`` (429/503 with the server's reason) or
``lost`` (a 5xx other than 503, a timeout, a broken connection). :func:`summarize`
gives goodput (completion tokens of completed requests a second), p50/p99 latency and the
counts.

May import: the standard library (openai lazily).
"""
from __future__ import annotations

import math
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

__all__ = ["Outcome", "TraceRequest", "eos_bias", "exact_output", "make_trace", "prompt_text", "prompt_token_ids", "replay",
           "summarize"]

_SPECIAL_IDS = 3  # ids below this are a llama-style vocabulary's pad/BOS/EOS


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival: float  # seconds after the trace starts
    prompt_tokens: int  # the prompt's length in tokens of a byte-level tokenizer (BOS included)
    max_tokens: int
    mean_output: float  # the output length the request's EOS bias aims at
    session: str
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def make_trace(count: int, rate: float, seed: int = 0, *, prompt_median: float = 120, prompt_sigma: float = 0.8,
               prompt_max: int = 900, output_median: float = 40, output_sigma: float = 0.9,
               max_tokens: Sequence[int] = (128, 256), sessions: int = 8, zipf: float = 1.2) -> list[TraceRequest]:
    """``count`` requests arriving at ``rate`` a second (exponential gaps)."""
    if count < 1 or rate <= 0:
        raise ValueError(f"count must be >= 1 and rate > 0, got count={count!r}, rate={rate!r}")
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** zipf for k in range(sessions)]
    trace, now = [], 0.0
    for index in range(count):
        now += rng.expovariate(rate)
        limit = rng.choice(list(max_tokens))
        prompt = min(prompt_max, max(8, round(rng.lognormvariate(math.log(prompt_median), prompt_sigma))))
        output = min(limit, max(2.0, rng.lognormvariate(math.log(output_median), output_sigma)))
        session = f"session-{rng.choices(range(sessions), weights)[0]}"
        trace.append(TraceRequest(index, round(now, 6), prompt, limit, round(output, 3), session,
                                  rng.randrange(2**31)))
    return trace


def eos_bias(mean_output: float, vocab_size: int) -> float:
    """The logit bias on EOS that makes a flat-logit model stop after ``mean_output``
    tokens on average: p = 1 / mean_output = e^b / (V - 1 + e^b)."""
    return max(-100.0, min(100.0, math.log((vocab_size - 1) / max(mean_output - 1, 1e-6))))


def prompt_text(request: TraceRequest) -> str:
    """ASCII text of ``prompt_tokens - 1`` bytes (a byte-level tokenizer adds BOS)."""
    rng = random.Random(request.seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(request.prompt_tokens - 1))


def prompt_token_ids(request: TraceRequest, vocab_size: int) -> list[int]:
    """``prompt_tokens`` token ids in ``[3, vocab_size)`` (no BOS is added to an id prompt)."""
    rng = random.Random(request.seed)
    return [rng.randrange(_SPECIAL_IDS, vocab_size) for _ in range(request.prompt_tokens)]


def exact_output(request: TraceRequest) -> int:
    """The output length ``exact_lengths`` asks for: ``mean_output`` rounded, within ``max_tokens``."""
    return max(1, min(request.max_tokens, round(request.mean_output)))


@dataclass
class Outcome:
    index: int
    status: str  # "completed", "rejected" or "lost"
    http_status: Optional[int]
    reason: Optional[str]
    sent: float  # seconds after the trace started
    latency: float
    completion_tokens: int = 0
    finish_reason: Optional[str] = None
    degraded: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _error_code(error) -> Optional[str]:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner.get("code") or inner.get("type")
    return None


def replay(base_url: str, model: str, trace: Sequence[TraceRequest], *, eos_token: Optional[int] = None,
           vocab_size: int, timeout: float = 120.0, stream: bool = False, prompt_ids: bool = False,
           exact_lengths: bool = False) -> tuple[list[Outcome], float]:
    """Send every request at its arrival time; returns the outcomes (trace order) and the
    wall time from the first send to the last answer. ``eos_token`` is needed unless
    ``exact_lengths`` (see the module doc for both switches)."""
    import openai

    if eos_token is None and not exact_lengths:
        raise ValueError("replay: eos_token is needed to steer output lengths (or pass exact_lengths=True)")

    client = openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=timeout)
    outcomes: list[Optional[Outcome]] = [None] * len(trace)
    start = time.perf_counter()

    def send(request: TraceRequest) -> None:
        delay = request.arrival - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        kwargs = dict(model=model, temperature=1.0, extra_headers={"X-Session-ID": request.session},
                      prompt=prompt_token_ids(request, vocab_size) if prompt_ids else prompt_text(request))
        if exact_lengths:  # no seed: the length does not depend on what is sampled
            kwargs.update(max_tokens=exact_output(request), extra_body={"ignore_eos": True})
        else:
            kwargs.update(max_tokens=request.max_tokens, seed=request.seed,
                          logit_bias={str(eos_token): eos_bias(request.mean_output, vocab_size)})
        outcome = Outcome(request.index, "lost", None, None, sent - start, 0.0)
        try:
            if stream:
                tokens, finish, info = 0, None, {}
                for chunk in client.completions.create(stream=True, **kwargs):
                    choice = chunk.choices[0]
                    tokens += bool(choice.text)
                    finish = choice.finish_reason or finish
                    info = (chunk.model_extra or {}).get("memwarden", info)
            else:
                answer = client.completions.create(**kwargs)
                tokens, finish = answer.usage.completion_tokens, answer.choices[0].finish_reason
                info = (answer.model_extra or {}).get("memwarden") or {}
            outcome.status, outcome.http_status = "completed", 200
            outcome.completion_tokens, outcome.finish_reason = tokens, finish
            outcome.degraded = bool(info.get("degraded"))
        except openai.APIStatusError as e:
            outcome.http_status, outcome.reason = e.status_code, _error_code(e)
            outcome.status = "rejected" if e.status_code in (429, 503) else "lost"
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            # the transport's own error says how the connection broke
            outcome.reason = type(e).__name__ + (f" ({type(e.__cause__).__name__}: {e.__cause__})"
                                                 if e.__cause__ is not None else "")
        outcome.latency = time.perf_counter() - sent
        outcomes[request.index - trace[0].index] = outcome

    threads = [threading.Thread(target=send, args=(r,), daemon=True) for r in trace]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + trace[-1].arrival + 5)
    wall = time.perf_counter() - start - trace[0].arrival
    return [o if o is not None else Outcome(r.index, "lost", None, "no_answer", 0.0, 0.0)
            for o, r in zip(outcomes, trace)], wall


def _quantile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]  # nearest rank


def summarize(outcomes: Sequence[Outcome], wall: float) -> dict:
    """Goodput, latency quantiles of completed requests, and counts by status and reason."""
    done = [o for o in outcomes if o.status == "completed"]
    latencies = [o.latency for o in done]
    rejected: dict[str, int] = {}
    for o in outcomes:
        if o.status == "rejected":
            rejected[o.reason or str(o.http_status)] = rejected.get(o.reason or str(o.http_status), 0) + 1
    tokens = sum(o.completion_tokens for o in done)
    return {
        "requests": len(outcomes), "completed": len(done), "lost": sum(o.status == "lost" for o in outcomes),
        "rejected": sum(rejected.values()), "rejected_by_reason": rejected,
        "degraded": sum(o.degraded for o in done),
        "completion_tokens": tokens, "wall_s": wall, "goodput_tok_s": tokens / wall if wall > 0 else 0.0,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": _quantile(latencies, 0.99),
    }


def replay_figure(results: dict):
    """A matplotlib Figure of replays, ``{case: summary with "requests" and "outcomes"}``:
    the completed requests by latency, and each case's outcomes as stacked bars (the
    second axes, for the caller's own annotations)."""
    from memwarden._plot import figure

    fig = figure(10, 3.6)
    latency, outcome = fig.subplots(1, 2)
    for case, r in results.items():
        done = sorted(o["latency"] for o in r["outcomes"] if o["status"] == "completed")
        if done:
            latency.step(done, [(i + 1) / r["requests"] for i in range(len(done))], where="post", label=case)
    latency.set(xlabel="latency of completed requests (s)", ylabel="fraction of all requests",
                title="completed by latency")
    latency.legend()
    names = list(results)
    bottom = [0] * len(names)
    for status, color in (("completed", "tab:green"), ("rejected", "tab:orange"), ("lost", "tab:red")):
        counts = [sum(o["status"] == status for o in results[c]["outcomes"]) for c in names]
        outcome.bar(names, counts, bottom=bottom, color=color, label=status)
        bottom = [b + c for b, c in zip(bottom, counts)]
    outcome.set(ylabel="requests")
    return fig
