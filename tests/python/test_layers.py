"""The package's layers: modules import downward only (import-linter's ``layers`` contract in
pyproject.toml), and ``import memwarden`` stays free of torch and the extension."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import memwarden

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = str(Path(memwarden.__file__).resolve().parent.parent)  # python/ or site-packages
_LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _env(path: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
    return env


def _python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(PACKAGE_DIR),
                          capture_output=True, text=True, timeout=120)


def _lint(cwd: Path, path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LINT, "--no-cache", "--no-logo"], cwd=cwd,
                          env=_env(path), capture_output=True, text=True, timeout=300)


def test_imports_point_downward():
    pytest.importorskip("importlinter", reason="import-linter is not installed (pip install import-linter)")
    r = _lint(ROOT, PACKAGE_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "KEPT" in r.stdout and "BROKEN" not in r.stdout


def test_the_layers_contract_catches_an_upward_import(tmp_path):
    """The contract of pyproject.toml, run over a stub package with the same layers in which
    the bottom layer imports the top one, must report it."""
    pytest.importorskip("importlinter", reason="import-linter is not installed (pip install import-linter)")
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    layers = contract["layers"]
    package = tmp_path / "src" / "memwarden"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    names = [name.strip().strip("()") for layer in layers for name in layer.split("|")]
    for name in names:
        (package / f"{name.split('.', 1)[1]}.py").write_text("")
    bottom, top = names[-1], names[0]
    (package / f"{bottom.split('.', 1)[1]}.py").write_text(f"import {top}\n")
    quoted = ", ".join(f'"{layer}"' for layer in layers)
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.importlinter]\nroot_package = "memwarden"\n\n[[tool.importlinter.contracts]]\n'
        f'name = "{contract["name"]}"\ntype = "layers"\nlayers = [{quoted}]\n')
    r = _lint(tmp_path, str(tmp_path / "src"))
    assert r.returncode != 0, r.stdout + r.stderr
    assert f"{bottom} is not allowed to import {top}" in r.stdout, r.stdout + r.stderr


def test_import_memwarden_loads_neither_torch_nor_the_extension():
    r = _python("import sys, memwarden\n"
                "print(memwarden.__version__)\n"
                "assert 'torch' not in sys.modules, 'import memwarden imported torch'\n"
                "assert 'memwarden._C' not in sys.modules, 'import memwarden loaded the extension'\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == memwarden.__version__


def test_the_pytest_plugin_loads_no_torch():
    r = _python("import sys, memwarden.testing.plugin, memwarden.testing.pytest_entry\n"
                "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n")
    assert r.returncode == 0, r.stderr


def test_submodules_are_lazy_attributes_and_load_ops_registers_the_ops():
    r = _python("import sys, memwarden\n"
                "import torch\n"
                "assert not hasattr(torch.ops.memwarden, 'quantize_int8')\n"
                "x = torch.randn(4, 8)\n"
                "q, s, _ = memwarden.quant.quantize_int8(x)\n"
                "assert q.dtype == torch.int8 and 'memwarden.quant' in sys.modules\n"
                "assert memwarden.load_ops() is sys.modules['memwarden._C'] is memwarden.load_ops()\n"
                "assert callable(torch.ops.memwarden.scaled_int8_quant)\n"
                "assert memwarden.kv.BlockPool and memwarden.alloc.memory_stats('cpu')\n"
                "try:\n    memwarden.nope\nexcept AttributeError as e:\n    assert 'nope' in str(e)\n"
                "else:\n    raise SystemExit('memwarden.nope did not raise')\n")
    assert r.returncode == 0, r.stderr


def test_every_public_submodule_is_an_attribute_imported_on_first_use():
    r = _python("import sys, memwarden\n"
                "for name in ('plan', 'estimate', 'footprint', 'models', 'controller', 'serve', 'testing'):\n"
                "    assert f'memwarden.{name}' not in sys.modules, name\n"
                "assert 'torch' not in sys.modules\n"
                "assert memwarden.plan.plan and memwarden.estimate.estimate and memwarden.controller.__doc__\n"
                "assert 'memwarden.plan' in sys.modules and 'memwarden.serve' not in sys.modules\n"
                "assert {'plan', 'estimate', 'kv', 'serve'} <= set(dir(memwarden))\n")
    assert r.returncode == 0, r.stderr
