"""Prometheus metrics of the server (``/metrics``), named in the ``memwarden:`` style serving
engines use (vLLM's ``vllm:num_requests_running``): what the Kubernetes Gateway API
Inference Extension reads -- queue (``num_requests_waiting``), running requests and KV
utilisation (``kv_cache_usage_perc``) -- and the controller's own decisions. Gauges are
read from the controller at scrape time; counters follow its decisions. Per model (the
:class:`~memwarden.serve.pool.ModelPool`): ``model_state`` (0 unloaded, 1 offloaded, 2 loaded,
3 loading), ``model_swaps_total`` (``direction`` in: onto the device, out: off it) and
``offloaded_bytes`` (weights parked in host memory). One registry per server, so tests
can run several.

May import: prometheus_client, :mod:`memwarden.controller`, :mod:`memwarden.serve.pool`
and the bottom layers.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

from typing import TYPE_CHECKING, Optional

from memwarden.controller.traffic import TrafficController

if TYPE_CHECKING:  # the pool imports torch; the gateway's metrics have no pool
    from memwarden.serve.pool import ModelPool

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]


class Metrics:
    def __init__(self, controller: TrafficController, pool: Optional["ModelPool"] = None):
        self.controller, self.pool = controller, pool
        self.registry = r = CollectorRegistry()
        self.kv_usage = Gauge("memwarden:kv_cache_usage_perc", "KV budget in use (held by running requests / budget), 0..1",
                              registry=r)
        self.running = Gauge("memwarden:num_requests_running", "Requests generating now", registry=r)
        self.waiting = Gauge("memwarden:num_requests_waiting", "Requests in the admission queue", registry=r)
        self.pressure_level = Gauge("memwarden:memory_pressure_level",
                                    "Degradation level: 0 low, 1 medium, 2 high, 3 critical, 4 emergency", registry=r)
        self.sessions = Gauge("memwarden:sessions_active", "Sessions holding state", registry=r)
        self.decisions = Counter("memwarden:admission_decisions", "Admission decisions", ["decision", "reason"],
                                 registry=r)
        self.degradations = Counter("memwarden:degradations", "Responses degraded, by level", ["level"], registry=r)
        self.evictions = Counter("memwarden:session_evictions", "Sessions evicted (idle or LRU)", registry=r)
        self.preemptions = Counter("memwarden:preemptions", "Running requests preempted", registry=r)
        self.model_state = Gauge("memwarden:model_state", "Model state: 0 unloaded, 1 offloaded, 2 loaded, 3 loading",
                                 ["model"], registry=r)
        self.model_swaps = Counter("memwarden:model_swaps", "Models moved onto (in) or off (out) the device",
                                   ["model", "direction"], registry=r)
        self.offloaded = Gauge("memwarden:offloaded_bytes", "Weights parked in host memory", ["model"], registry=r)
        self._counted = {"evictions": 0, "preemptions": 0}  # the controller's totals at the last scrape
        self._swaps_counted: dict = {}  # (model, direction) -> the pool's total at the last scrape

    def observe(self, decision: str, reason: str, degraded_level: str | None = None) -> None:
        self.decisions.labels(decision=decision, reason=reason).inc()
        if degraded_level is not None:
            self.degradations.labels(level=degraded_level).inc()

    def render(self) -> bytes:
        c = self.controller
        self.kv_usage.set(c.pressure())
        self.running.set(len(c.admission.running_ids()))
        self.waiting.set(len(c.admission.queued_ids()))
        self.pressure_level.set(int(c.degradation.level))
        stats = c.sessions.stats()
        self.sessions.set(stats["active_sessions"])
        for name, counter, total in (("evictions", self.evictions, stats["evictions"]),
                                     ("preemptions", self.preemptions, c.admission.preemptions)):
            counter.inc(total - self._counted[name])
            self._counted[name] = total
        if self.pool is not None:
            self._render_models()
        return generate_latest(self.registry)

    def _render_models(self) -> None:
        from memwarden.serve.pool import MODEL_STATES

        for model, books in self.pool.stats()["models"].items():
            self.model_state.labels(model=model).set(MODEL_STATES[books["state"]])
            self.offloaded.labels(model=model).set(books["offloaded_bytes"])
            for direction in ("in", "out"):
                total = books[f"swaps_{direction}"]
                self.model_swaps.labels(model=model, direction=direction).inc(
                    total - self._swaps_counted.get((model, direction), 0))
                self._swaps_counted[model, direction] = total
