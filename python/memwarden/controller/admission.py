"""Admission: for each request, accept it, shrink its ``max_tokens``, route it to another
model or device, or reject it -- from the estimated memory of its prompt plus output
(KV from :mod:`memwarden.footprint`) against what the sessions and the degradation level
leave free. Returns a small decision dataclass (verdict, granted tokens, reason); it
never raises for a request that does not fit.

May import: :mod:`memwarden.controller.sessions`, :mod:`~memwarden.controller.degradation`,
:mod:`memwarden.estimate`, :mod:`memwarden.footprint` and the bottom layers. Never
:mod:`memwarden.serve` or :mod:`memwarden.cli`.
"""
