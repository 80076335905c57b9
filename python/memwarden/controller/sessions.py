"""Sessions: state keyed by the ``X-Session-ID`` header, with a KV budget per session and a
global one, an idle timeout, and LRU eviction of the least recently used session when the
global budget is exceeded. Evicting a session frees its KV blocks through
:mod:`memwarden.kv`; every change is published as an event (created, touched, evicted)
that the monitor and metrics subscribe to.

May import: :mod:`memwarden.kv`, :mod:`memwarden.footprint` and the bottom layers. Never
:mod:`memwarden.serve` or :mod:`memwarden.cli`.
"""
