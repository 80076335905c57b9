"""Request and response schemas (pydantic) of the OpenAI-compatible endpoints and of
``/memory_stats``; they check their fields and say which one is wrong, so a bad request
is a 400 naming the field, never a 500.

May import: pydantic, the public dataclasses of :mod:`memwarden.controller` and the bottom
layers. Never :mod:`memwarden.serve.app` or :mod:`memwarden.cli`.
"""
