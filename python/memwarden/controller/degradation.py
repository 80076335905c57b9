"""Degradation: discrete levels (normal, constrained, critical, ...) chosen from the memory
pressure the monitor reports, with hysteresis so a level does not flap; each level maps
to a policy (shorter contexts, INT8 KV, offload, refusing new sessions) that admission and
the offloader read. Pure policy: it reads measurements, it does not take them.

May import: the bottom layers only (``_units``, ``_devices``, ``_table``). Never
:mod:`memwarden.serve` or :mod:`memwarden.cli`.
"""
