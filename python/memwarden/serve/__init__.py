"""``memwarden serve``: an HTTP server that generates with transformers behind
OpenAI-compatible endpoints (``/v1/completions``, ``/v1/chat/completions``), under the
memory controller; plus ``/memory_stats``, ``/healthz`` and Prometheus ``/metrics``.

Pieces: :mod:`~memwarden.serve.app` (the FastAPI app), :mod:`~memwarden.serve.metrics`
(Prometheus metrics), :mod:`~memwarden.serve.schemas` (request and response schemas).
fastapi, uvicorn and prometheus-client are the ``serve`` extra and are imported only here.

May import: :mod:`memwarden.controller` and everything below it. The controller never
imports this package; only :mod:`memwarden.cli` does.
"""
