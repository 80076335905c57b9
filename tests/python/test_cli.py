import json

import pytest

from memwarden import models as M
from memwarden.cli import main, parse_gpus

GIB = 2**30


def test_parse_gpus():
    assert parse_gpus("2x16GiB") == {0: 16 * GIB, 1: 16 * GIB}
    assert parse_gpus("24GiB,16GiB") == {0: 24 * GIB, 1: 16 * GIB}
    assert parse_gpus("2x24GiB,16GiB") == {0: 24 * GIB, 1: 24 * GIB, 2: 16 * GIB}
    for bad in ("0x16GiB", "2x0", "", "2xlots"):
        with pytest.raises(ValueError):
            parse_gpus(bad)


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in out} == set(M.EMBEDDED)


def test_plan_json(capsys):
    assert main(["plan", "mixtral-8x7b", "--gpus", "2x48GiB", "--reserve", "2GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feasible"] and out["imbalance"] <= 0.005
    assert [d["reserve"] for d in out["devices"]] == [2 * GIB] * 2
    assert out["device_map"]["lm_head"] == 1


def test_plan_table_and_infeasible(capsys):
    assert main(["plan", "llama-3.1-8b", "--gpus", "2x16GiB"]) == 0
    assert "imbalance" in capsys.readouterr().out
    assert main(["plan", "llama-3.1-70b", "--gpus", "2x16GiB"]) == 1
    assert "short by" in capsys.readouterr().out


def test_estimate_and_fit(capsys, tmp_path):
    assert main(["estimate", "llama-3.1-8b", "--context", "8192", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["kv_cache"] == 8192 * 32 * 8 * 128 * 2 * 2
    assert main(["fit", "llama-3.1-8b", "--gpus", "24GiB", "--json"]) == 0
    f = json.loads(capsys.readouterr().out)
    assert 0 < f["max_context"] < 131072 and f["estimate"]["fits"]
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(M.load_config("llama-3.1-8b")))
    assert main(["estimate", str(cfg), "--context", "8192", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache"] == e["kv_cache"]


def test_errors_exit_2(capsys):
    assert main(["plan", "nope", "--gpus", "2x16GiB"]) == 2
    assert "Embedded models" in capsys.readouterr().err
    assert main(["plan", "llama-3.1-8b", "--gpus", "16GiB", "--reserve", "20GiB"]) == 2
    assert "reserve" in capsys.readouterr().err
