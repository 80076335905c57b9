"""Model lifecycle: ``can_load_model`` (from :func:`memwarden.estimate.estimate`),
``adjust_context_window``, ``should_swap_models``, loading a model with a placement from
:mod:`memwarden.plan`, and an LRU cache of weights to swap models in and out.
transformers is imported lazily, inside the functions that load a model.

May import: :mod:`memwarden.estimate`, :mod:`memwarden.plan`, :mod:`memwarden.footprint`,
:mod:`memwarden.models`, :mod:`memwarden.alloc`, :mod:`memwarden.quant` and the bottom
layers. Never :mod:`memwarden.serve` or :mod:`memwarden.cli`.
"""
