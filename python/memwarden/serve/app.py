"""The FastAPI app: builds a ``TrafficController`` (:mod:`memwarden.controller`) and routes
each request through its admission and sessions (``X-Session-ID`` header) before
generating; OpenAI-compatible endpoints, ``/memory_stats``, ``/healthz`` and ``/metrics``.
Tests drive it on loopback with the official ``openai`` client.

May import: fastapi, uvicorn, :mod:`memwarden.controller`, :mod:`memwarden.serve.metrics`,
:mod:`memwarden.serve.schemas` and the layers below the controller. Never
:mod:`memwarden.cli`.
"""
