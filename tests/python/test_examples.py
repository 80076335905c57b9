"""The examples must keep running and saying the right things: the README's first command
(examples/demo.py), the other scripts, and the tour notebook (stored stripped, run with nbmake)."""
import json
import os
import pathlib
import re
import runpy
import subprocess
import sys
import time

import pytest

DEMO = pathlib.Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def test_demo_runs_and_reports_expected_figures(capsys):
    runpy.run_path(str(DEMO), run_name="__main__")
    out = capsys.readouterr().out
    # Four requests share a 48-token system prompt: 3 full blocks found by the three later ones.
    assert re.findall(r"(\d+) found in the prefix cache", out) == ["0", "48", "48", "48"]
    assert "blocks in use 11 of 64 (without sharing: 20); prefix hit rate 53%" in out
    steps = float(re.search(r"within ([0-9.]+) quantization steps", out).group(1))
    assert steps <= 0.5 + 1e-6
    # The OOM callback freed one 64 MiB page and the 100 MiB allocation then fit under 256 MiB.
    assert "out of memory for 100 MiB" in out and "allocated 228 MiB" in out and "2 pages kept" in out
    assert "plan for mixtral-8x7b (bfloat16): fits" in out
    # generate inside a quarter of the K/V it needs: pages were compressed and offloaded,
    # and the next-token choices stayed those of DynamicCache.
    paged = re.search(r"PagedCache\(kv_dtype='int8', offload='host'\), attn_implementation='memwarden_paged': "
                      r"(\d+) tokens: (\d+) pages resident, (\d+) compressed, (\d+) offloaded", out)
    assert paged and int(paged.group(1)) == 95 and int(paged.group(3)) > 0 and int(paged.group(4)) > 0, out
    assert float(re.search(r"choices equal to DynamicCache's: (\d+)%", out).group(1)) >= 95
    # the server: one request served in a session, one refused by the session limit (429)
    assert re.search(r"POST /v1/completions \(session alice\): 200, \d+ tokens", out), out
    assert "POST /v1/completions (session bob, 400 tokens): 429 session_limit" in out
    assert re.search(r"/memory_stats: active_sessions 2, rejected_count 1", out)


def test_estimate_any_model_example_prices_a_config_json_and_a_gguf_header(capsys):
    example = DEMO.parent / "estimate_any_model.py"
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert "OLMoE-1B-7B from its config.json: 6.92B parameters (64 experts, top 8)" in out
    assert "describing 8.03B parameters in Q4_K_M" in out
    assert "llama.cpp gpu_layers=16" in out and "fits" in out


TOUR = DEMO.parent / "memwarden_tour.ipynb"


def test_tour_notebook_is_stored_without_outputs():
    # the repository keeps the notebook stripped: no outputs, no execution counts, minimal metadata
    notebook = json.loads(TOUR.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, "the tour has no code cells"
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, "".join(cell["source"])[:80]
    for cell in notebook["cells"]:
        assert cell["metadata"] == {}, cell["metadata"]
    assert set(notebook["metadata"]) <= {"kernelspec", "language_info"}, notebook["metadata"]


def test_tour_notebook_runs_on_the_cpu_within_two_minutes(tmp_path):
    # nbmake runs every cell in a kernel; PYTHONPATH points it at the memwarden this test imports
    # (python/ with PYTHONPATH=python, or the installed build), so the notebook tests this tree;
    # TMPDIR keeps the files it writes (the snapshot, PyTorch's segment page) in tmp_path
    pytest.importorskip("nbmake")
    import memwarden

    package_root = str(pathlib.Path(memwarden.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
               TMPDIR=str(tmp_path))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "--nbmake", "--nbmake-timeout=120", str(TOUR),
                             "-q", "-p", "no:cacheprovider"], cwd=TOUR.parents[1], env=env,
                            capture_output=True, text=True, timeout=180)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout, result.stdout[-3000:]
    assert seconds < 120, f"the tour took {seconds:.0f}s"
    pages = list(tmp_path.glob("memwarden-tour-*/segments.html"))
    assert len(pages) == 1 and "<html" in pages[0].read_text().lower(), pages
