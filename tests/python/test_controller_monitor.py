"""MemoryMonitor against fake memory sources: alerts, history, health, context sizing, the
sampling thread, plots; and the real readers (host, memwarden's allocator, CUDA and NVML
through fakes)."""
from __future__ import annotations

import sys
import threading
import types

import pytest
from hypothesis import given, settings, strategies as st

import memwarden.controller.monitor as monitor
from memwarden.controller.monitor import LEVELS, DeviceMemory, MemoryMonitor

GIB = 2**30


class FakeSource:
    """(used, total) with ``used`` set by the test; counts its reads."""

    def __init__(self, used: int = 0, total: int = 100) -> None:
        self.used, self.total, self.reads = used, total, 0

    def __call__(self) -> tuple[int, int]:
        self.reads += 1
        return self.used, self.total


def watched_by(source: FakeSource, **kwargs) -> tuple[MemoryMonitor, list]:
    mon = MemoryMonitor(sources=source, **kwargs)
    alerts: list = []
    mon.on_alert(lambda level, sample: alerts.append((level, sample.pressure)))
    return mon, alerts


def sample_at(mon: MemoryMonitor, source: FakeSource, used: int):
    source.used = used
    return mon.sample()


# ---- pressure, levels and alerts -----------------------------------------------------------

def test_pressure_is_used_over_total_without_a_budget():
    source = FakeSource(used=30, total=120)
    sample = MemoryMonitor(sources=source).sample()
    assert sample.pressure == 0.25 and sample.limit == 120 and sample.in_use == 30
    assert sample.level == "normal" and sample.watched.free == 90 and sample.headroom == 90


def test_pressure_is_measured_against_the_budget():
    source = FakeSource(used=30, total=1000)
    sample = MemoryMonitor(budget_bytes=40, sources=source).sample()
    assert sample.pressure == 0.75 and sample.level == "warning" and sample.headroom == 10


def test_budget_above_what_is_free_leaves_only_the_free_bytes():
    source = FakeSource(used=90, total=100)
    assert MemoryMonitor(budget_bytes=1000, sources=source).sample().headroom == 10


def test_a_threshold_crossed_once_alerts_once():
    source = FakeSource()
    mon, alerts = watched_by(source)
    for used in (50, 80, 81, 84, 79):  # into warning at 80, staying there
        sample_at(mon, source, used)
    assert alerts == [("warning", 0.80)]


def test_recrossing_after_dropping_below_alerts_again():
    source = FakeSource()
    mon, alerts = watched_by(source)
    for used in (76, 74, 75):  # no hysteresis: 74 is below 0.75, 75 crosses again
        sample_at(mon, source, used)
    assert alerts == [("warning", 0.76), ("warning", 0.75)]


def test_a_jump_alerts_each_threshold_crossed_lowest_first():
    source = FakeSource()
    mon, alerts = watched_by(source)
    sample_at(mon, source, 96)
    assert alerts == [("warning", 0.96), ("critical", 0.96), ("emergency", 0.96)]
    sample_at(mon, source, 90)  # down to critical: no alert
    sample_at(mon, source, 99)  # emergency again
    assert [level for level, _ in alerts] == ["warning", "critical", "emergency", "emergency"]


def test_a_failing_callback_does_not_silence_the_others(caplog):
    source = FakeSource()
    mon = MemoryMonitor(sources=source)
    heard = []
    mon.on_alert(lambda level, sample: 1 / 0)
    mon.on_alert(lambda level, sample: heard.append(level))
    sample_at(mon, source, 80)
    assert heard == ["warning"] and "alert callback" in caplog.text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=40))
def test_alerts_are_exactly_the_upward_crossings(series):
    source = FakeSource()
    mon, alerts = watched_by(source)
    for used in series:
        sample_at(mon, source, used)
    expected, previous = [], 0
    for used in series:
        level = sum(used >= t for t in (75, 85, 95))
        expected += [(LEVELS[i], used / 100) for i in range(previous + 1, level + 1)]
        previous = level
    assert alerts == expected


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3, unique=True).map(sorted))
def test_any_increasing_thresholds_are_kept(thresholds):
    assert MemoryMonitor(thresholds=thresholds, sources=FakeSource()).thresholds == tuple(thresholds)


# ---- history -------------------------------------------------------------------------------

def test_history_keeps_the_latest_samples():
    source = FakeSource()
    mon = MemoryMonitor(history=3, sources=source)
    for used in range(5):
        sample_at(mon, source, used)
    assert [s.in_use for s in mon.history] == [2, 3, 4]
    assert mon.latest.in_use == 4


def test_samples_are_frozen():
    sample = MemoryMonitor(sources=FakeSource()).sample()
    with pytest.raises(AttributeError):
        sample.pressure = 0.5
    with pytest.raises(TypeError):
        sample.devices["cuda:0"] = sample.watched


# ---- health --------------------------------------------------------------------------------

@pytest.mark.parametrize("used,level,actions", [
    (10, "normal", []),
    (75, "warning", ["evict idle sessions"]),
    (85, "critical", ["evict idle sessions", "compress KV to INT8"]),
    (95, "emergency", ["evict idle sessions", "compress KV to INT8", "reject new sessions"]),
])
def test_health_actions_per_level(used, level, actions):
    health = MemoryMonitor(sources=FakeSource(used=used)).check_system_health()
    assert health["level"] == level and health["actions_needed"] == actions
    assert health["memory_pressure"] == used / 100 and health["gpu_utilization"] is None


def test_health_reports_registered_and_given_models():
    mon = MemoryMonitor(sources=FakeSource())
    mon.register_model("llama", "2GiB", "cpu", max_context=4096)
    mon.register_model("gone", 10, 0)
    mon.unregister_model("gone")
    states = mon.check_system_health({"draft": {"bytes": 5}})["model_states"]
    assert states == {"llama": {"bytes": 2 * GIB, "device": "cpu", "max_context": 4096},
                      "draft": {"bytes": 5}}
    with pytest.raises(KeyError, match="gone"):
        mon.unregister_model("gone")


# ---- context sizing ------------------------------------------------------------------------

def test_context_window_by_hand():
    # limit 1000 (total), in use 400: headroom 600, reserve 0.10 * 1000 = 100, usable 500;
    # 4 sequences at 10 B/token: 500 // 40 = 12 tokens, 12 * 40 = 480 bytes
    mon = MemoryMonitor(sources=FakeSource(used=400, total=1000))
    assert mon.adjust_context_window(4, None, 10) == {
        "optimal_context": 12, "memory_impact": 480, "performance_impact": 0.0, "usable_bytes": 500}


def test_context_window_capped_by_the_model():
    # budget 2000 on a 10000 device with 200 in use: headroom 1800, reserve 200, usable 1600;
    # one sequence at 1 B/token would get 1600, the model stops at 1024: 1 - 1024/1024 given up
    mon = MemoryMonitor(budget_bytes=2000, sources=FakeSource(used=200, total=10000))
    mon.register_model("small", 1, "cpu", max_context=1024)
    assert mon.adjust_context_window(1, "small", 1)["optimal_context"] == 1024
    # 3 sequences at 1 B/token: 1600 // 3 = 533 of a 2048 context: 1 - 533/2048 given up
    result = mon.adjust_context_window(3, 2048, 1)
    assert result["optimal_context"] == 533 and result["memory_impact"] == 1599
    assert result["performance_impact"] == pytest.approx(1 - 533 / 2048)


def test_context_window_is_zero_inside_the_spike_reserve():
    mon = MemoryMonitor(sources=FakeSource(used=95, total=100))
    assert mon.adjust_context_window(1, 100, 1)["optimal_context"] == 0


@pytest.mark.parametrize("kwargs,name", [
    ({"current_load": 0}, "current_load"), ({"bytes_per_token": 0}, "bytes_per_token"),
    ({"model": "unknown"}, "unknown"), ({"model": -1}, "model")])
def test_context_window_rejects(kwargs, name):
    args = {"current_load": 1, "model": None, "bytes_per_token": 1} | kwargs
    with pytest.raises(ValueError, match=name):
        MemoryMonitor(sources=FakeSource()).adjust_context_window(**args)


# ---- the sampling thread -------------------------------------------------------------------

def test_thread_samples_until_stopped():
    source = FakeSource(used=80)
    mon, alerts = watched_by(source, interval=0.005)
    heard = threading.Event()
    mon.on_alert(lambda level, sample: heard.set())
    assert mon.start() and not mon.start()
    try:
        assert heard.wait(5)
    finally:
        assert mon.stop()
    reads = source.reads
    assert not mon.running and not mon.stop() and reads >= 1
    assert source.reads == reads  # nothing samples after stop()
    assert alerts == [("warning", 0.80)]  # many samples, one crossing


def test_thread_survives_a_failing_reading(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("transient")
        return 10, 100

    with MemoryMonitor(sources=flaky, interval=0.005) as mon:
        for _ in range(500):
            if mon.latest is not None:
                break
            threading.Event().wait(0.01)
    assert mon.latest.in_use == 10 and "memory sample failed" in caplog.text


# ---- plots ---------------------------------------------------------------------------------

def test_plot_writes_the_history(tmp_path):
    pytest.importorskip("matplotlib")
    source = FakeSource()
    mon = MemoryMonitor(sources={"cpu": source, "cuda:0": FakeSource(5, 10)})
    with pytest.raises(ValueError, match="no samples"):
        mon.plot(tmp_path / "empty.png")
    for used in (10, 80, 90):
        sample_at(mon, source, used)
    path = mon.plot(tmp_path / "memory.png")  # with a path: saved, and the path returned
    assert path.read_bytes().startswith(b"\x89PNG")


def test_plot_returns_the_history_against_the_thresholds():
    pytest.importorskip("matplotlib")
    import io

    from matplotlib.figure import Figure

    source = FakeSource(total=8 * GIB)
    mon = MemoryMonitor(budget_bytes="4GiB", sources={"cpu": source, "cuda:0": FakeSource(GIB, 2 * GIB)},
                        thresholds=(0.5, 0.7, 0.9))
    for used in (1, 2, 3, 4):  # GiB: pressure 25%, 50%, 75%, 100% of the budget
        sample_at(mon, source, used * GIB)
    fig = mon.plot()
    assert isinstance(fig, Figure)
    pressure_axes, bytes_axes = fig.axes
    lines = {line.get_label(): line for line in pressure_axes.get_lines()}
    assert list(lines["cpu pressure"].get_ydata()) == [s.pressure for s in mon.history] == [0.25, 0.5, 0.75, 1.0]
    seconds = [s.time - mon.history[0].time for s in mon.history]
    assert list(lines["cpu pressure"].get_xdata()) == pytest.approx(seconds)
    for name, threshold in (("warning", 0.5), ("critical", 0.7), ("emergency", 0.9)):
        assert list(lines[f"{name} {threshold:.0%}"].get_ydata()) == [threshold, threshold]
    assert "emergency at 100.0%" in pressure_axes.get_title()
    lines = {line.get_label(): line for line in bytes_axes.get_lines()}
    assert list(lines["cpu used"].get_ydata()) == [1, 2, 3, 4]
    assert list(lines["cuda:0 used"].get_ydata()) == [1, 1, 1, 1]
    assert list(lines["budget 4.00 GiB"].get_ydata()) == [4, 4]
    fig.savefig(io.BytesIO(), format="png")


def test_repr_and_html_show_the_latest_pressure_first():
    source = FakeSource(total=8 * GIB)
    mon = MemoryMonitor(budget_bytes="4GiB", sources={"cpu": source, "cuda:0": FakeSource(GIB, 2 * GIB)})
    assert repr(mon) == "<MemoryMonitor cpu, budget 4.00 GiB, stopped: no samples>"
    assert "no samples" in mon._repr_html_() and "warning at 75%, critical at 85%, emergency at 95%" in mon._repr_html_()
    sample_at(mon, source, 3 * GIB + GIB // 2)
    sample_at(mon, source, 3 * GIB)
    assert repr(mon) == "<MemoryMonitor cpu: pressure 75.0% (warning), 3.00 GiB of 4.00 GiB budget in use, 2 samples, stopped>"
    html = mon._repr_html_()
    assert html.index("pressure 75.0% (warning)") < html.index("<table>") and html.count("<table>") == 1
    cell = '<td style="text-align:right">{}</td>'.format
    # cpu: 3 GiB used of 8, 5 free; a source's reading is all the process holds; no allocator figures
    assert ('<td style="text-align:left">cpu</td>' + cell("3.00 GiB") + cell("8.00 GiB") + cell("5.00 GiB")
            + cell("3.00 GiB") + cell("n/a") + cell("n/a")) in html
    assert '<td style="text-align:left">cuda:0</td>' + cell("1.00 GiB") + cell("2.00 GiB") + cell("1.00 GiB") in html
    assert "peak pressure 87.5% over the kept samples" in html and "2 samples kept, every 1s (stopped)" in html
    no_budget = MemoryMonitor(sources=FakeSource(30, 120))
    no_budget.sample()
    assert "30 B of 120 B total in use" in repr(no_budget)


# ---- arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    ({"thresholds": (0.9, 0.8, 0.95)}, "thresholds"), ({"thresholds": (0.5, 0.8, 1.2)}, "thresholds"),
    ({"thresholds": (0.5, 0.8)}, "thresholds"), ({"thresholds": "abc"}, "thresholds"),
    ({"interval": 0}, "interval"), ({"interval": float("inf")}, "interval"),
    ({"history": 0}, "history"), ({"spike_reserve": 1.0}, "spike_reserve"),
    ({"budget_bytes": 0}, "budget_bytes"), ({"budget_bytes": "12"}, "budget_bytes"),
    ({"device": "mps"}, "device"), ({"sources": {"cuda:0": FakeSource()}}, "sources"),
    ({"sources": {"cpu": 5}}, "sources"),
])
def test_arguments_are_checked(kwargs, name):
    args = {"sources": FakeSource()} | kwargs
    with pytest.raises(ValueError, match=name):
        MemoryMonitor(**args)


@pytest.mark.parametrize("reading", [(5,), (-1, 10), (11, 10), (1.5, 10), "x"])
def test_bad_source_readings_name_the_source(reading):
    with pytest.raises(ValueError, match=r"sources\['cpu'\]"):
        MemoryMonitor(sources=lambda: reading).sample()


# ---- the real readers ----------------------------------------------------------------------

@pytest.fixture
def no_cuda(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_host_reading_matches_psutil(no_cuda):
    psutil = pytest.importorskip("psutil")
    sample = MemoryMonitor().sample()
    assert set(sample.devices) == {"cpu"}
    assert sample.watched.total == psutil.virtual_memory().total
    assert 0 < sample.watched.process_used < sample.watched.total


def test_host_reading_includes_memwarden_allocator(no_cuda):
    pytest.importorskip("psutil")
    try:
        import memwarden.alloc as alloc
    except (ImportError, OSError) as exc:
        pytest.skip(f"memwarden's extension does not load: {exc}")
    import torch
    with alloc.use("cpu"):
        block = torch.empty(2**20, dtype=torch.uint8)
        watched = MemoryMonitor().sample().watched
        assert watched.allocated >= 2**20 and watched.peak_allocated >= watched.allocated
        del block


class FakeNvml(types.SimpleNamespace):
    """pynvml's calls the monitor makes, for two GPUs in PCI order."""

    def __init__(self):
        super().__init__(handles=[])

    def nvmlDeviceGetHandleByIndex(self, index):
        self.handles.append(("index", index))
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.handles.append(("uuid", uuid))
        return 1

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        self.handles.append(("pci", bus_id))
        return 0

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=(handle + 1) * GIB, total=8 * GIB)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=40 + handle)


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two CUDA devices that are available but not initialised, and fake NVML."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNvml()
    monkeypatch.setattr(monitor, "_nvml", lambda: nvml)
    return nvml


def test_nvml_reads_gpus_without_initialising_cuda(fake_gpus):
    mon = MemoryMonitor(device="cuda:1")
    sample = mon.sample()
    assert sample.watched == DeviceMemory(used=2 * GIB, total=8 * GIB, process_used=2 * GIB,
                                          utilization=0.41)
    assert sample.pressure == 0.25 and sample.gpu_utilization == 0.41
    assert mon.check_system_health()["gpu_utilization"] == 0.41


def test_nvml_follows_cuda_visible_devices(fake_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-abc")
    MemoryMonitor(device="cpu").sample()
    assert fake_gpus.handles == [("index", 3), ("uuid", "GPU-abc")]


def test_without_nvml_or_cuda_a_gpu_cannot_be_watched(fake_gpus, monkeypatch):
    monkeypatch.setattr(monitor, "_nvml", lambda: None)
    with pytest.raises(RuntimeError, match="cuda:0"):
        MemoryMonitor(device=0).sample()


def test_initialised_cuda_reads_torch(monkeypatch):
    import torch
    fake = {"is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 1,
            "mem_get_info": lambda i: (6 * GIB, 8 * GIB), "memory_allocated": lambda i: GIB,
            "memory_reserved": lambda i: GIB + 1, "max_memory_allocated": lambda i: 3 * GIB}
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(monitor, "_nvml", lambda: None)
    monkeypatch.setattr(monitor, "_allocator", lambda: None)
    sample = MemoryMonitor(budget_bytes=4 * GIB, device="cuda:0").sample()
    assert sample.watched == DeviceMemory(used=2 * GIB, total=8 * GIB, process_used=GIB + 1,
                                          allocated=GIB, reserved=GIB + 1, peak_allocated=3 * GIB)
    assert sample.in_use == GIB + 1 and sample.pressure == (GIB + 1) / (4 * GIB)


def test_initialised_cuda_matches_nvml_by_pci_bus_id(monkeypatch):
    import torch
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0xDC, pci_device_id=0)
    fake = {"is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 1,
            "mem_get_info": lambda i: (6 * GIB, 8 * GIB), "memory_allocated": lambda i: 0,
            "memory_reserved": lambda i: 0, "max_memory_allocated": lambda i: 0,
            "get_device_properties": lambda i: props}
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value)
    nvml = FakeNvml()
    monkeypatch.setattr(monitor, "_nvml", lambda: nvml)
    monkeypatch.setattr(monitor, "_allocator", lambda: None)
    watched = MemoryMonitor(device="cuda:0").sample().watched
    assert nvml.handles == [("pci", "00000000:dc:00.0")]
    assert watched.used == 2 * GIB and watched.utilization == 0.40  # torch's used, NVML's utilisation


@pytest.mark.parametrize("pynvml", [None, types.SimpleNamespace(nvmlInit=lambda: 1 / 0)],
                         ids=["absent", "no driver"])
def test_missing_or_failing_pynvml_means_no_nvml(monkeypatch, pynvml):
    monkeypatch.setitem(sys.modules, "pynvml", pynvml)  # None makes the import fail
    monitor._nvml.cache_clear()
    try:
        assert monitor._nvml() is None
    finally:
        monitor._nvml.cache_clear()
