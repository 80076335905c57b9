"""The memory controller: decides what runs where, and what gives way under pressure.

The ``TrafficController`` facade (:mod:`~memwarden.controller.traffic`) composes the
pieces over one configuration (:class:`~memwarden.controller.config.MemwardenConfig`),
one module each:

* :mod:`~memwarden.controller.admission` -- accept, shrink ``max_tokens``, route elsewhere
  or reject a request;
* :mod:`~memwarden.controller.sessions` -- sessions keyed by ``X-Session-ID`` with
  per-session and global KV limits, idle timeout and LRU eviction;
* :mod:`~memwarden.controller.degradation` -- degradation levels by memory pressure;
* :mod:`~memwarden.controller.monitor` -- samples torch, NVML and host memory, with
  thresholds, history, alerts and plots;
* :mod:`~memwarden.controller.models` -- a registry of models with tiers and quotas,
  ``can_load_model`` (feasible, the bottleneck, ranked adjustments) and
  ``should_swap_models`` (size- and popularity-aware, anti-thrash);
* :mod:`~memwarden.controller.weight_cache` -- ``ModelWeightCache``, an LRU of module
  weights in host memory within a byte budget (optionally INT8);
* :mod:`~memwarden.controller.offload` -- moves modules between devices by pressure,
  with hysteresis; ``WeightSlots`` parks a module's weights in one flat host buffer.

Memory figures come from :mod:`memwarden.estimate` and :mod:`memwarden.footprint` (one
definition of each formula), never re-derived here.

May import: :mod:`memwarden.estimate`, :mod:`memwarden.plan`, :mod:`memwarden.footprint`,
:mod:`memwarden.models`, :mod:`memwarden.kv`, :mod:`memwarden.alloc`,
:mod:`memwarden.quant` and the bottom layers (``_native``, ``_units``, ``_devices``,
``_table``). Never :mod:`memwarden.serve` or :mod:`memwarden.cli` (they import the
controller, not the reverse), nor :mod:`memwarden.testing`.
"""
