"""Arguments that load memwarden's pytest plugin into a pytester run exactly once."""
from __future__ import annotations

import importlib.metadata
import os


def plugin_args() -> list[str]:
    """``-p memwarden.testing.plugin`` unless the installed entry point already loads it."""
    if not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        for ep in importlib.metadata.entry_points(group="pytest11"):
            if ep.value.split(":")[0] in ("memwarden.testing.plugin", "memwarden.testing.pytest_entry"):
                return []
    return ["-p", "memwarden.testing.plugin"]
