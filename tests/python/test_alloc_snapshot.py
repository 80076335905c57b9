"""memwarden.alloc's history and snapshots in torch's format, read back by PyTorch's own
viewer code (torch.cuda._memory_viz), checked against memwarden's own snapshot and stats;
and the plots and notebook display of the allocator's state."""
from __future__ import annotations

import base64
import gc
import json
import pickle
import pickletools
import random
import re

import pytest
import torch
from torch.cuda import _memory_viz

import memwarden.alloc as ma
from memwarden import _C

KiB, MiB = 1024, 1024 * 1024

# The opcodes the unpickler of torch's viewer (torch/utils/viz/MemoryViz.js) reads.
VIEWER_OPCODES = {"PROTO", "FRAME", "STOP", "MARK", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "DICT", "LIST",
                  "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "SETITEM", "SETITEMS", "APPEND", "APPENDS", "MEMOIZE",
                  "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "BININT", "BININT1", "BININT2", "LONG1",
                  "NEWTRUE", "NEWFALSE", "NONE", "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE"}


pytestmark = pytest.mark.usefixtures("never_left_installed")


@pytest.fixture
def recorded():
    """memwarden's host allocator serving torch for the test, with a fresh trace and the
    stacks of tensor allocations recorded; everything off and given back afterwards."""
    ma.set_memory_limit("cpu", None)
    gc.collect()
    ma.empty_cache("cpu")
    ma.record_history("cpu", acquire_gil=True, clear_history=True)
    try:
        with ma.use("cpu"):
            yield "cpu"
    finally:
        ma.record_history("cpu", False, clear_history=True)
        ma.set_memory_limit("cpu", None)
        gc.collect()
        ma.empty_cache("cpu")


def blocks_of(snap):
    return {b["address"]: b for s in snap["segments"] for b in s["blocks"]}


def embedded_snapshot(html):
    """The snapshot torch's viewer page carries (base64 of the pickle in its script)."""
    files = json.loads(re.search(r"const local_files = (.*)\n", html).group(1))
    return pickle.loads(base64.b64decode(files[0]["base64"]))  # the padding after STOP is ignored


def test_dump_renders_with_torch_viewer(recorded, tmp_path):
    a = torch.empty(5000, dtype=torch.uint8)      # small pool: a 5120 B block
    b = torch.empty(3 * MiB, dtype=torch.uint8)   # large pool
    c = torch.empty(700, dtype=torch.uint8)
    del c
    path = tmp_path / "snap.pickle"
    ma.dump_snapshot(str(path))
    raw = path.read_bytes()
    data = pickle.loads(raw)
    assert set(data) == {"segments", "device_traces"}
    for op, arg, _ in pickletools.genops(raw):
        assert op.name in VIEWER_OPCODES, op.name
        if op.name == "LONG1":
            assert -2**63 <= arg < 2**63  # wider ints become BigInts there, which its size formatting rejects
    for html in (_memory_viz.segment_plot(data), _memory_viz.trace_plot(data),
                 _memory_viz.trace_plot(data, plot_segments=True)):
        shown = embedded_snapshot(html)
        assert shown == data
        blocks = blocks_of(shown)
        assert blocks[a.data_ptr()]["size"] == 5120 and blocks[a.data_ptr()]["requested_size"] == 5000
        assert blocks[b.data_ptr()]["size"] == 3 * MiB and blocks[b.data_ptr()]["state"] == "active_allocated"
        allocs = [e for e in shown["device_traces"][0] if e["action"] == "alloc"]
        assert (a.data_ptr(), 5000) in {(e["addr"], e["size"]) for e in allocs}
    # torch's text views, which check the segments' accounting themselves
    summary = _memory_viz.segsum(data)
    assert f"segments: {len(data['segments'])}" in summary
    assert f"{len(data['device_traces'][0])} entries" in _memory_viz.trace(data)


def test_torch_format_agrees_with_memwarden_snapshot_and_stats(recorded):
    keep = [torch.empty(n, dtype=torch.uint8) for n in (100, 5000, 300 * KiB, 2 * MiB, 12 * MiB)]
    hole = torch.empty(4000, dtype=torch.uint8)
    after = torch.empty(4000, dtype=torch.uint8)
    del hole  # an inactive block between live ones
    torch_snap = ma.snapshot("cpu", format="torch")
    own = ma.snapshot("cpu")
    stats = ma.memory_stats("cpu")
    assert set(own) == {"segments", "free_bytes", "largest_free_block", "fragmentation"}  # the default is unchanged
    assert len(torch_snap["device_traces"]) == 1
    assert [s["device"] for s in torch_snap["segments"]] == [0] * len(own["segments"])
    assert [s["device"] for s in own["segments"]] == [-1] * len(own["segments"])
    assert [{**s, "device": None} for s in torch_snap["segments"]] == [{**s, "device": None} for s in own["segments"]]
    for seg in torch_snap["segments"]:
        assert {"device", "address", "total_size", "allocated_size", "active_size", "requested_size", "stream",
                "segment_type", "segment_pool_id", "is_expandable", "frames", "blocks"} <= set(seg)
        assert seg["segment_pool_id"] == (0, 0) and seg["is_expandable"] is False
        offset = seg["address"]
        for block in seg["blocks"]:  # the blocks tile their segment
            assert {"address", "size", "requested_size", "state", "frames"} <= set(block)
            assert block["address"] == offset
            offset += block["size"]
        assert offset == seg["address"] + seg["total_size"]
        live = [b for b in seg["blocks"] if b["state"] == "active_allocated"]
        assert seg["allocated_size"] == sum(b["size"] for b in live)
        assert seg["requested_size"] == sum(b["requested_size"] for b in live)
    segments = torch_snap["segments"]
    assert sum(s["total_size"] for s in segments) == stats["reserved_bytes.all.current"]
    assert sum(s["allocated_size"] for s in segments) == stats["allocated_bytes.all.current"]
    assert sum(s["requested_size"] for s in segments) == stats["requested_bytes.all.current"]
    assert len(segments) == stats["segment.all.current"]
    blocks = [b for s in segments for b in s["blocks"]]
    assert sum(b["state"] == "active_allocated" for b in blocks) == stats["allocation.all.current"]
    by_address = blocks_of(torch_snap)
    for t in keep + [after]:
        assert by_address[t.data_ptr()]["state"] == "active_allocated"
        assert by_address[t.data_ptr()]["requested_size"] == t.numel()
        names = [f["name"] for f in by_address[t.data_ptr()]["frames"]]
        assert "test_torch_format_agrees_with_memwarden_snapshot_and_stats" in names
    assert any(b["state"] == "inactive" for b in blocks)


def test_trace_lists_a_known_sequence_in_order(recorded):
    x = torch.empty(5000, dtype=torch.uint8)
    y = torch.empty(3 * MiB, dtype=torch.uint8)
    x_addr, y_addr = x.data_ptr(), y.data_ptr()
    del x
    del y
    ma.empty_cache("cpu")
    ma.set_memory_limit("cpu", "64 MiB")
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(100 * MiB, dtype=torch.uint8)
    trace = ma.snapshot("cpu", format="torch")["device_traces"][0]
    ours = [(e["action"], e["addr"], e["size"]) for e in trace
            if e["action"] in ("alloc", "free_requested", "free_completed") and e["addr"] in (x_addr, y_addr)]
    assert ours == [("alloc", x_addr, 5000), ("alloc", y_addr, 3 * MiB),
                    ("free_requested", x_addr, 5000), ("free_completed", x_addr, 5000),
                    ("free_requested", y_addr, 3 * MiB), ("free_completed", y_addr, 3 * MiB)]
    times = [e["time_us"] for e in trace]
    assert times == sorted(times)
    for e in trace:
        assert {"action", "size", "stream", "time_us", "frames"} <= set(e)
        assert e["stream"] == 0
    index = {(e["action"], e.get("addr")): i for i, e in enumerate(trace)}
    alloc_x = trace[index[("alloc", x_addr)]]
    assert "test_trace_lists_a_known_sequence_in_order" in [f["name"] for f in alloc_x["frames"]]
    # the segments the trace saw reserved hold their blocks and come before them; empty_cache gave them back
    for e in trace:
        if e["action"] != "segment_alloc":
            continue
        inside = [i for i, b in enumerate(trace)
                  if b["action"] == "alloc" and e["addr"] <= b["addr"] < e["addr"] + e["size"]]
        assert all(i > index[("segment_alloc", e["addr"])] for i in inside)
        assert index[("segment_free", e["addr"])] > max(inside, default=-1)
    oom = trace[-1]
    assert oom["action"] == "oom" and oom["size"] == 100 * MiB and "addr" not in oom
    assert 0 <= oom["device_free"] <= 64 * MiB
    assert "raise OutOfMemoryError" in _memory_viz.trace({"segments": [], "device_traces": [trace]})


def replay_backwards(snap, device=0):
    """Walk the trace from the snapshot's state back to its first entry, as the segment view
    of torch's viewer does (MemoryViz.js, simulate_memory): each step must find what it
    undoes, and every live block must lie inside a live segment. Returns the steps taken."""
    segments = {s["address"]: s["total_size"] for s in snap["segments"] if s["device"] == device}
    blocks = {b["address"]: b["size"] for s in snap["segments"] if s["device"] == device for b in s["blocks"]
              if b["state"] != "inactive"}

    def check():
        for addr, size in blocks.items():
            assert any(start <= addr and addr + size <= start + n for start, n in segments.items()), hex(addr)

    check()
    trace = snap["device_traces"][device]
    for e in reversed(trace):
        action = e["action"]
        if action == "free_completed":
            blocks[e["addr"]] = e["size"]
        elif action == "free_requested":
            assert e["addr"] in blocks
        elif action == "alloc":
            del blocks[e["addr"]]
        elif action == "segment_free":
            segments[e["addr"]] = e["size"]
        elif action == "segment_alloc":
            del segments[e["addr"]]
        check()
    return len(trace)


def test_trace_replays_backwards_like_torch_viewer(recorded):
    rng = random.Random(5)
    live = []
    for step in range(300):
        if live and rng.random() < 0.45:
            live.pop(rng.randrange(len(live)))
        else:
            live.append(torch.empty(rng.choice([rng.randint(1, 8 * KiB), rng.randint(8 * KiB, MiB),
                                                rng.randint(MiB, 12 * MiB)]), dtype=torch.uint8))
        if step == 150:
            ma.empty_cache("cpu")
    ma.set_memory_limit("cpu", ma.memory_reserved("cpu") + 4 * MiB)
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(64 * MiB, dtype=torch.uint8)
    snap = ma.snapshot("cpu", format="torch")
    actions = {e["action"] for e in snap["device_traces"][0]}
    assert actions == {"alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "oom"}
    assert replay_backwards(snap) == len(snap["device_traces"][0])
    del live


def test_ring_size_and_recording_switch():
    ma.record_history("cpu", max_entries=4, clear_history=True)
    try:
        addrs = [_C.alloc.raw_alloc("cpu", 1000) for _ in range(6)]
        trace = ma.snapshot("cpu", format="torch")["device_traces"][0]
        assert [(e["action"], e["addr"]) for e in trace] == [("alloc", a) for a in addrs[-4:]]
        ma.record_history("cpu", False)  # off: recorded entries stay, nothing new comes
        for a in addrs:
            _C.alloc.raw_free("cpu", a)
        assert ma.snapshot("cpu", format="torch")["device_traces"][0] == trace
        ma.record_history("cpu", False, clear_history=True)
        assert ma.snapshot("cpu", format="torch")["device_traces"] == [[]]
        with pytest.raises(ValueError, match="max_entries"):
            ma.record_history("cpu", max_entries=0)
        with pytest.raises(ValueError, match="format"):
            ma.snapshot("cpu", format="json")
    finally:
        ma.record_history("cpu", False, clear_history=True)
        ma.empty_cache("cpu")


def test_plot_segments_draws_one_bar_per_block(recorded):
    pytest.importorskip("matplotlib")
    from memwarden.alloc._viz import STATE_COLORS
    from matplotlib.colors import to_rgba

    live = [torch.empty(n, dtype=torch.uint8) for n in (4000, 4000, 4000, 3 * MiB)]
    hole = live.pop(1)
    hole_addr = hole.data_ptr()
    del hole
    snap = ma.snapshot("cpu")
    fig = ma.plot_segments("cpu")
    ax = fig.axes[0]
    blocks = [(s, b) for s in sorted(snap["segments"], key=lambda s: s["address"]) for b in s["blocks"]]
    assert len(ax.patches) == len(blocks)
    bars = sorted(ax.patches, key=lambda r: (r.get_y(), r.get_x()))
    rows = {s["address"]: row for row, s in enumerate(sorted(snap["segments"], key=lambda s: s["address"]))}
    expected = sorted(blocks, key=lambda sb: (rows[sb[0]["address"]], sb[1]["address"]))
    for bar, (seg, block) in zip(bars, expected):
        assert bar.get_x() == pytest.approx((block["address"] - seg["address"]) / MiB)
        assert bar.get_width() == pytest.approx(block["size"] / MiB)
        assert bar.get_facecolor() == pytest.approx(to_rgba(STATE_COLORS[block["state"]]))
    free_bar = next(bar for bar, (seg, block) in zip(bars, expected) if block["address"] == hole_addr)
    assert free_bar.get_facecolor() == pytest.approx(to_rgba(STATE_COLORS["inactive"]))
    assert f"fragmentation {snap['fragmentation']:.3f}" in ax.get_title()
    assert len(ax.get_yticklabels()) == len(snap["segments"])
    del live


def test_plot_history_ends_at_the_current_state(recorded):
    pytest.importorskip("matplotlib")
    x = torch.empty(2 * MiB, dtype=torch.uint8)
    y = torch.empty(5000, dtype=torch.uint8)
    del x
    trace = ma.snapshot("cpu", format="torch")["device_traces"][0]
    fig = ma.plot_history("cpu")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    allocated, reserved = lines["allocated (requested bytes)"], lines["reserved"]
    unit = {"MiB": MiB, "GiB": 1024 * MiB}[ax.get_ylabel()]
    assert len(allocated.get_ydata()) == len(trace) + 1
    stats = ma.memory_stats("cpu")
    assert allocated.get_ydata()[-1] * unit == pytest.approx(stats["requested_bytes.all.current"])
    assert reserved.get_ydata()[-1] * unit == pytest.approx(stats["reserved_bytes.all.current"])
    steps = [round((after - before) * unit) for before, after in zip(allocated.get_ydata(), allocated.get_ydata()[1:])]
    sizes = [e["size"] * {"alloc": 1, "free_requested": -1}.get(e["action"], 0) for e in trace]
    assert steps == sizes
    assert 2 * MiB in steps and 5000 in steps and -2 * MiB in steps
    assert str(len(trace)) in ax.get_title()
    del y


def test_summary_displays_in_notebooks(recorded):
    t = torch.empty(5000, dtype=torch.uint8)
    s = ma.summary("cpu")
    assert isinstance(s, ma.MemorySummary)
    assert str(s) == ma.memory_summary("cpu")
    html = s._repr_html_()
    assert html.count("<table>") == 2
    assert "Allocated memory" in html and "from small pool" in html
    segment = next(seg for seg in ma.snapshot("cpu")["segments"]
                   if seg["address"] <= t.data_ptr() < seg["address"] + seg["total_size"])
    assert f"{segment['address']:#x}" in html
    assert "MemorySummary cpu" in repr(s) and "fragmentation" in repr(s)
    assert len(ma.summary("cpu", abbreviated=True)._repr_html_()) < len(html)
    del t
