"""Monitor: samples memory from torch (``torch.cuda.memory_stats`` / ``mem_get_info``),
NVML when ``pynvml`` is present, memwarden's allocator (:mod:`memwarden.alloc`) and the
host; keeps a bounded history, compares against thresholds, raises alerts, and draws plots
(matplotlib imported lazily). Optional dependencies are imported inside the functions that
need them.

May import: :mod:`memwarden.alloc` and the bottom layers. Never :mod:`memwarden.serve`,
:mod:`memwarden.cli` or :mod:`memwarden.testing`.
"""
