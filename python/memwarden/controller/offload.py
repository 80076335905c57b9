"""Offload: moves modules (and KV pages, through :mod:`memwarden.kv`) between devices as
memory pressure rises and falls, with hysteresis (an upper threshold to offload, a lower
one to bring back) and an order from :mod:`memwarden.plan`'s placement. Device names go
through :mod:`memwarden._devices`.

May import: :mod:`memwarden.plan`, :mod:`memwarden.kv`, :mod:`memwarden.alloc` and the
bottom layers. Never :mod:`memwarden.serve` or :mod:`memwarden.cli`.
"""
