"""``memwarden serve``: an HTTP server that generates with transformers behind
OpenAI-compatible endpoints (``/v1/completions``, ``/v1/chat/completions``), under the
memory controller; plus ``/memory_stats``, ``/healthz`` and Prometheus ``/metrics``.

Pieces: :mod:`~memwarden.serve.app` (the FastAPI app), :mod:`~memwarden.serve.metrics`
(Prometheus metrics), :mod:`~memwarden.serve.schemas` (request schemas),
:mod:`~memwarden.serve.engine` (the model it generates with: the embedded tiny model or a
transformers checkpoint, into a PagedCache) and :mod:`~memwarden.serve.server` (uvicorn,
``memwarden serve``). fastapi, uvicorn and prometheus-client are the ``serve`` extra and
are imported only here. See docs/serve.md.

May import: :mod:`memwarden.controller` and everything below it. The controller never
imports this package; only :mod:`memwarden.cli` does.
"""
