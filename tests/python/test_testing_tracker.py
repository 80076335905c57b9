"""MemoryTracker: samples, phases, trend detection, export and plot (host memory)."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from memwarden.testing import MemoryTracker, format_bytes, parse_bytes


def _loop(tracker, leak: bool, n: int = 10):
    keep = []
    for _ in range(n):
        with tracker.phase("step"):
            x = torch.ones(8 * 2**20, dtype=torch.uint8)   # 8 MiB, pages touched
            if leak:
                keep.append(x)
            del x
        tracker.step()
    return keep


def test_trend_flags_leaking_loop_not_flat(tmp_path):
    with MemoryTracker("cpu", interval=0.002) as leaky:
        kept = _loop(leaky, leak=True)
    with MemoryTracker("cpu", interval=0.002) as flat:
        _loop(flat, leak=False)
    del kept
    a, b = leaky.analyze(), flat.analyze()
    assert a.trend.leak_suspected, str(a)
    assert a.trend.slope == pytest.approx(8 * 2**20, rel=0.15)
    assert not b.trend.leak_suspected, str(b)
    assert abs(b.trend.slope) < 2**20
    assert "step" in a.phases and a.peak >= a.baseline
    assert len(leaky.samples) >= 12 and len(leaky.steps) == 10


def test_export_and_plot(tmp_path):
    assert "matplotlib" not in sys.modules or True  # import memwarden.testing stays light (see below)
    with MemoryTracker("cpu", interval=0.002) as tr:
        with tr.phase("prefill"):
            x = torch.ones(16 * 2**20, dtype=torch.uint8)
        with tr.phase("decode"):
            del x
        tr.step()
    j = json.loads(tr.to_json(tmp_path / "t.json").read_text())
    assert j["samples"] and [p["name"] for p in j["phases"]] == ["prefill", "decode"]
    assert "analysis" in j and j["analysis"]["metric"] == "host_rss"
    rows = list(csv.reader(tr.to_csv(tmp_path / "t.csv").open()))
    assert rows[0][:2] == ["t", "allocated"] and len(rows) == len(tr.samples) + 1
    png = tr.plot(tmp_path / "t.png")  # with a path: saved, and the path returned (the plugin's call)
    assert png.read_bytes()[:4] == b"\x89PNG"


def _tracked_run():
    with MemoryTracker("cpu", interval=0.002) as tr:
        with tr.phase("prefill"):
            x = torch.ones(16 * 2**20, dtype=torch.uint8)
            tr.step()
        with tr.phase("decode"):
            del x
            tr.step()
        tr.step()
    return tr


def test_plot_returns_the_timeline_with_phases_and_thresholds():
    pytest.importorskip("matplotlib")
    import io

    from matplotlib.figure import Figure

    tr = _tracked_run()
    data = tr.to_dict()
    an = data["analysis"]
    fig = tr.plot(data=data, limit="2 GiB")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    rss = lines["host_rss"]
    assert list(rss.get_xdata()) == [s["t"] for s in data["samples"]]
    assert list(rss.get_ydata()) == pytest.approx([s["host_rss"] / 2**20 for s in data["samples"]])
    assert lines["host_rss spike threshold"].get_ydata()[0] == pytest.approx(an["spike_threshold"] / 2**20)
    assert lines["limit 2.00 GiB"].get_ydata()[0] == 2048
    assert len(ax.patches) == len(data["phases"]) == 2  # one shaded span per phase
    assert "phase prefill" in lines and "phase decode" in lines
    vertical = [line.get_xdata()[0] for line in ax.get_lines()
                if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]]
    assert vertical == [s["t"] for s in data["steps"]]  # a tick per step
    assert any(f"peak {format_bytes(an['peak'], digits=1)}" == t.get_text() for t in ax.texts)
    fig.savefig(io.BytesIO(), format="png")


def test_tracker_and_analysis_show_their_figures():
    tr = _tracked_run()
    an = tr.analyze()
    peak = max(s.host_rss for s in tr.samples)
    assert an.peak == peak and an.spike_threshold >= an.baseline
    text = repr(tr)
    assert text.startswith("<MemoryTracker cpu, stopped: host_rss peak ") and len(text) < 200
    assert format_bytes(peak, digits=1) in text and f"{len(tr.samples)} samples" in text
    assert "3 steps, 2 phases>" in text
    html = tr._repr_html_()
    assert html.count("<table>") == 1 and f"peak {format_bytes(peak, digits=1)}" in html
    for name, phase in an.phases.items():  # one row per phase: its peak, its sample count
        assert (f'<td style="text-align:left">{name}</td><td style="text-align:right">'
                f'{format_bytes(phase["peak"], digits=1)}</td><td style="text-align:right">{phase["samples"]}</td>'
                ) in html
    assert f"final {format_bytes(an.final, digits=1)}" in html
    assert repr(an) == f"<Analysis {an}>" and an._repr_html_().count("<tr>") == 1 + len(an.phases)
    assert repr(MemoryTracker("cpu")) == "<MemoryTracker cpu, stopped: no samples>"
    assert "no samples" in MemoryTracker("cpu")._repr_html_()


def test_import_is_light():
    import subprocess
    code = ("import sys, memwarden.testing; "
            "assert 'matplotlib' not in sys.modules and 'pytest' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())


def _env():
    import os
    import memwarden
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(memwarden.__file__)),
                                         env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("text,value", [
    ("2 GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), (1024, 1024),
    ("100 kb", 100_000), ("3B", 3), ("0.5 KiB", 512), (2.0, 2)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "GiB", "-1 MiB", "2 GiBs", True, None, "1.2.3 MB", "3"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_format_bytes():
    # the package-wide formatter (memwarden._units), re-exported; reports use one decimal
    assert format_bytes(0) == "0 B" and format_bytes(3 * 2**20, digits=1) == "3.0 MiB"
    assert format_bytes(3 * 2**20) == "3.00 MiB"


def test_tracker_rejects_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        MemoryTracker("cpu", interval=0)
    with pytest.raises(ValueError, match="device"):
        MemoryTracker("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tracker_cuda_allocated():
    with MemoryTracker("cuda", interval=0.002) as tr:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        tr.step()
        del x
        tr.step()
    an = tr.analyze()
    assert an.metric == "allocated" and an.peak - an.baseline >= 64 * 2**20
