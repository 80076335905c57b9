import json
import os
import subprocess
import sys

import pytest

import memwarden
from memwarden import models as M
from memwarden.cli import main, parse_gpus

GIB = 2**30
LLAMA_KV_TOKEN = 32 * 8 * 128 * 2 * 2
# child processes import the memwarden these tests import (installed or the source tree)
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
    os.path.dirname(os.path.dirname(os.path.abspath(memwarden.__file__))), os.environ.get("PYTHONPATH")])))


def test_parse_gpus():
    assert parse_gpus("2x16GiB") == {0: 16 * GIB, 1: 16 * GIB}
    assert parse_gpus("24GiB,16GiB") == {0: 24 * GIB, 1: 16 * GIB}
    assert parse_gpus("2x24GiB,16GiB") == {0: 24 * GIB, 1: 24 * GIB, 2: 16 * GIB}
    for bad in ("0x16GiB", "2x0GiB", "", "2xlots", "48"):
        with pytest.raises(ValueError):
            parse_gpus(bad)


def test_a_size_without_unit_is_rejected_showing_the_form(capsys):
    assert main(["fit", "llama-3.1-8b", "--gpus", "48"]) == 2
    assert "48GiB" in capsys.readouterr().err


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in out} == set(M.EMBEDDED)


def test_help_version_and_models_do_not_import_torch():
    code = ("import sys\nfrom memwarden.cli import main\n"
            "assert main(['models']) == 0\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
            "for flag in ('--version', '--help'):\n    try:\n        main([flag])\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "mixtral-8x7b" in r.stdout and "memwarden 0." in r.stdout and "usage: memwarden" in r.stdout


def test_json_into_a_closed_pipe_ends_quietly():
    cmd = (f"{sys.executable} -m memwarden.cli estimate deepseek-v3 --gpus 8x80GiB --json | head -c 10")
    r = subprocess.run(cmd, shell=True, env=ENV, capture_output=True, text=True, timeout=180)
    assert r.stdout.startswith("{") and r.stderr == "", r.stderr


def test_plan_json(capsys):
    assert main(["plan", "mixtral-8x7b", "--gpus", "2x48GiB", "--reserve", "2GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feasible"] and out["imbalance"] <= 0.005
    assert [d["reserve"] for d in out["devices"]] == [2 * GIB] * 2
    assert out["device_map"]["lm_head"] == 1


def test_plan_table_auto_reserve_and_infeasible(capsys):
    assert main(["plan", "llama-3.1-8b", "--gpus", "2x16GiB", "--reserve", "auto"]) == 0
    out = capsys.readouterr().out
    assert "imbalance" in out and "reserve auto: context 4096 x batch 1" in out
    assert main(["plan", "llama-3.1-70b", "--gpus", "2x16GiB"]) == 1
    assert "short by" in capsys.readouterr().out


def test_estimate_and_fit(capsys, tmp_path):
    assert main(["estimate", "llama-3.1-8b", "--context", "8192", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["kv_cache"] == 8192 * LLAMA_KV_TOKEN
    assert main(["fit", "llama-3.1-8b", "--gpus", "24GiB", "--json"]) == 0
    f = json.loads(capsys.readouterr().out)
    assert 0 < f["max_context"] < 131072 and f["estimate"]["fits"] and not f["stopped_at_model_maximum"]
    assert main(["fit", "llama-3.1-8b", "--gpus", "80GiB"]) == 0
    assert "the model's maximum, max_position_embeddings=131072" in capsys.readouterr().out
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(M.load_config("llama-3.1-8b")))
    assert main(["estimate", str(cfg), "--context", "8192", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache"] == e["kv_cache"]
    assert main(["estimate", "llama-3.1-8b", "--context", "200000"]) == 0
    assert "above the model's max_position_embeddings" in capsys.readouterr().out


def test_fit_with_host_memory_keeps_the_kv_on_the_gpu(capsys):
    assert main(["fit", "llama-3.1-8b", "--gpus", "8GiB", "--cpu", "64GiB", "--json"]) == 0
    f = json.loads(capsys.readouterr().out)
    assert 0 < f["max_context"] < 131072
    gpu, cpu = f["estimate"]["devices"]
    assert cpu["context"] == 0 and gpu["context"] == f["estimate"]["kv_cache"]
    assert main(["fit", "llama-3.1-8b", "--gpus", "8GiB", "--cpu", "64GiB", "--gpu-layers", "16", "--json"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert g["estimate"]["placement"] == "llama.cpp gpu_layers=16"


def test_errors_exit_2(capsys):
    assert main(["plan", "nope", "--gpus", "2x16GiB"]) == 2
    assert "Embedded models" in capsys.readouterr().err
    assert main(["plan", "llama-3.1-8b", "--gpus", "16GiB", "--reserve", "20GiB"]) == 2
    assert "reserve" in capsys.readouterr().err
    assert main(["estimate", "llama-3.1-8b", "--kv-dtype", "int3"]) == 2
    assert "kv_dtype" in capsys.readouterr().err
