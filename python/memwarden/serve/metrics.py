"""Prometheus metrics of the server (``/metrics``), named in the ``memwarden:`` style serving
engines use (vLLM's ``vllm:num_requests_running``): what the Kubernetes Gateway API
Inference Extension reads -- queue (``num_requests_waiting``), running requests and KV
utilisation (``kv_cache_usage_perc``) -- and the controller's own decisions. Gauges are
read from the controller at scrape time; counters follow its decisions. One registry per
server, so tests can run several.

May import: prometheus_client, :mod:`memwarden.controller` and the bottom layers.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

from memwarden.controller.traffic import TrafficController

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]


class Metrics:
    def __init__(self, controller: TrafficController):
        self.controller = controller
        self.registry = r = CollectorRegistry()
        self.kv_usage = Gauge("memwarden:kv_cache_usage_perc", "KV budget in use (reserved / budget), 0..1",
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
        self._counted = {"evictions": 0, "preemptions": 0}  # the controller's totals at the last scrape

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
        return generate_latest(self.registry)
