"""Running the server: the model pool, the controller over its KV budget and uvicorn, on
loopback unless the configuration allows more, optionally for a bounded number of
responses (tests, demos). With one model ``server.max_memory`` is the KV budget; with
several it is the device budget of their weights, and ``server.kv_memory`` the KV budget.
With ``server.upstream`` it is the gateway instead (:mod:`memwarden.serve.gateway`): the
controller in front of an upstream engine.

May import: uvicorn, :mod:`memwarden.serve.app`, :mod:`memwarden.serve.pool`,
:mod:`memwarden.serve.gateway`, :mod:`memwarden.controller` and the bottom layers.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

from memwarden._units import format_bytes, parse_bytes
from memwarden.controller.config import MemwardenConfig
from memwarden.controller.traffic import TrafficController

__all__ = ["DEFAULT_KV_BUDGET", "Server", "build"]

DEFAULT_KV_BUDGET = parse_bytes("512MiB")


# An idle connection stays open this long (uvicorn's default is 5 s). Clients keep idle
# connections for reuse -- httpx, and so the openai client, for 5 s -- and a request sent
# on one the server is closing at that moment fails without an answer ("Server
# disconnected"): the server must wait longer than its clients do.
_KEEP_ALIVE_S = 75.0


def build(config: MemwardenConfig, on_response: Optional[Callable[[], None]] = None):
    """(app, engine, controller) for ``config``: its server.models (or server.model, or the
    embedded model); the engine is the first model's, the pool ``app.state.pool``. With
    server.upstream, the gateway's (the engine is then the upstream's model)."""
    if config.server.upstream is not None:
        from memwarden.serve.gateway import build_gateway

        return build_gateway(config, on_response)
    from memwarden.serve.app import create_app
    from memwarden.serve.pool import ModelPool

    pool = ModelPool.from_config(config)
    budget = (config.server.kv_memory if len(pool.names) > 1 else config.server.max_memory) or DEFAULT_KV_BUDGET
    controller = TrafficController(config, budget, pool.bytes_per_token)
    # the degradation level's batch size: fewer requests generate at once under pressure
    controller.degradation.on_change.append(lambda *_: [
        pool.engine(name).set_concurrency(controller.degradation.policy.max_batch_size(config.server.max_concurrency))
        for name in pool.names])
    app = create_app(pool, controller, on_response)
    return app, app.state.engine, controller


class Server:
    """uvicorn serving ``build(config)`` in this process; ``max_requests`` responses (None:
    no bound) end it. ``port=0`` picks a free port (see :attr:`port` once started)."""

    def __init__(self, config: MemwardenConfig, max_requests: Optional[int] = None):
        import uvicorn

        self._remaining = max_requests
        self._lock = threading.Lock()
        self.app, self.engine, self.controller = build(config, self._count)
        self.pool = getattr(self.app.state, "pool", None)  # the gateway has none
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, host=config.server.host, port=config.server.port,
                                                      log_level="warning", lifespan="off",
                                                      timeout_keep_alive=_KEEP_ALIVE_S))
        self.budget = self.controller.budget_bytes
        self.upstream = config.server.upstream

    def _count(self) -> None:
        with self._lock:
            if self._remaining is None:
                return
            self._remaining -= 1
            if self._remaining <= 0:
                self._uvicorn.should_exit = True

    @property
    def started(self) -> bool:
        return self._uvicorn.started

    @property
    def port(self) -> int:
        return self._uvicorn.servers[0].sockets[0].getsockname()[1]

    def describe(self) -> str:
        served = self.engine.name if self.pool is None else ", ".join(self.pool.names)
        via = f" from the upstream {self.upstream}" if self.upstream is not None else ""
        return (f"memwarden serving {served} on http://{self._uvicorn.config.host}:{self.port}{via} "
                f"(KV budget {format_bytes(self.budget)}, {self.engine.bytes_per_token} B/token, "
                f"admission {self.controller.admission.policy}{self._describe_pool()})")

    def _describe_pool(self) -> str:
        if self.pool is None or len(self.pool.names) == 1:
            return ""
        budget = self.pool.stats()["weights_budget_bytes"]
        return (f"; weights budget {format_bytes(budget) if budget is not None else 'unbounded'}, "
                f"swap policy {self.pool.policy_name}")

    def run(self) -> None:
        """Serve until stopped (or ``max_requests`` responses)."""
        self._uvicorn.run()

    def start(self) -> threading.Thread:
        """Serve from a daemon thread; returns once it listens."""
        thread = threading.Thread(target=self.run, daemon=True, name="memwarden-serve")
        thread.start()
        while not self._uvicorn.started:
            if not thread.is_alive():
                raise RuntimeError("memwarden serve: the server stopped before it listened")
            thread.join(0.02)
        return thread

    def stop(self, thread: Optional[threading.Thread] = None, timeout: float = 10.0) -> None:
        self._uvicorn.should_exit = True
        if thread is not None:
            thread.join(timeout)
        if self.pool is None:
            self.engine.close()  # the gateway's metrics thread and client
        else:
            self.pool.close()
            for upstream in self.app.state.routes.values():  # clients of the pools it routed to
                upstream.close()
