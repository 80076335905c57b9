"""Running the server: the engine, the controller over its KV budget and uvicorn, on
loopback unless the configuration allows more, optionally for a bounded number of
responses (tests, demos). With ``server.upstream`` it is the gateway instead
(:mod:`memwarden.serve.gateway`): the controller in front of an upstream engine.

May import: uvicorn, :mod:`memwarden.serve.app`, :mod:`memwarden.serve.engine`,
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


def build(config: MemwardenConfig, on_response: Optional[Callable[[], None]] = None):
    """(app, engine, controller) for ``config`` (its server.model, or the embedded model);
    with server.upstream, the gateway's (the engine is then the upstream's model)."""
    if config.server.upstream is not None:
        from memwarden.serve.gateway import build_gateway

        return build_gateway(config, on_response)
    from memwarden.serve.app import create_app
    from memwarden.serve.engine import load_engine

    engine = load_engine(config.server.model, max_concurrency=config.server.max_concurrency)
    budget = config.server.max_memory or DEFAULT_KV_BUDGET
    controller = TrafficController(config, budget, engine.bytes_per_token)
    return create_app(engine, controller, on_response), engine, controller


class Server:
    """uvicorn serving ``build(config)`` in this process; ``max_requests`` responses (None:
    no bound) end it. ``port=0`` picks a free port (see :attr:`port` once started)."""

    def __init__(self, config: MemwardenConfig, max_requests: Optional[int] = None):
        import uvicorn

        self._remaining = max_requests
        self._lock = threading.Lock()
        self.app, self.engine, self.controller = build(config, self._count)
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, host=config.server.host, port=config.server.port,
                                                      log_level="warning", lifespan="off"))
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
        via = f" from the upstream {self.upstream}" if self.upstream is not None else ""
        return (f"memwarden serving {self.engine.name} on http://{self._uvicorn.config.host}:{self.port}{via} "
                f"(KV budget {format_bytes(self.budget)}, {self.engine.bytes_per_token} B/token, "
                f"admission {self.controller.admission.policy})")

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
        if self.upstream is not None:
            self.engine.close()  # the gateway's metrics thread and client
