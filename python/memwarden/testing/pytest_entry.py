"""Target of the ``pytest11`` entry point (``memwarden = "memwarden.testing.pytest_entry"``).

It only names the real plugin, so that ``-p memwarden.testing.plugin`` or
``pytest_plugins = ["memwarden.testing.plugin"]`` in a conftest still work when the
package is installed (pytest would refuse the same module under two plugin names).
Disable with ``-p no:memwarden``.
"""
pytest_plugins = ["memwarden.testing.plugin"]
