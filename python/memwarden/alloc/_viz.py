"""Displays of the allocator's state, each a pure function of data memwarden.alloc hands it:
the summary table (text, and HTML for notebooks), a fragmentation map of the segments and
the bytes allocated and reserved over a recorded trace (matplotlib Figures).

May import: the standard library and memwarden's bottom layer (matplotlib lazily, through
memwarden._plot.figure).
"""
from __future__ import annotations

from memwarden._plot import figure
from memwarden._table import format_table, html_table
from memwarden._units import byte_unit, format_bytes


# The states a snapshot gives blocks: handed out, freed but waiting for other streams, free.
STATE_COLORS = {"active_allocated": "#3b7dd8", "active_pending_free": "#e8a33d", "inactive": "#e6e6e6"}
STATE_LABELS = {"active_allocated": "allocated", "active_pending_free": "freed, awaiting streams",
                "inactive": "free (cached)"}

_METRICS = [("Allocated memory", "allocated_bytes", True), ("Active memory", "active_bytes", True),
            ("Requested memory", "requested_bytes", True), ("Reserved memory", "reserved_bytes", True),
            ("Non-releasable memory", "inactive_split_bytes", True), ("Allocations", "allocation", False),
            ("Active allocs", "active", False), ("Reserved segments", "segment", False),
            ("Non-releasable allocs", "inactive_split", False)]


class MemorySummary:
    """The allocator's statistics as ``torch.cuda.memory_summary()`` lays them out: ``str()``
    is the text table of :func:`memwarden.alloc.memory_summary`; in a notebook
    (``_repr_html_``) the same table as HTML, followed by one row per segment."""

    def __init__(self, device: str, stats: dict, snapshot: dict, installed: bool, abbreviated: bool = False):
        self.device, self.stats, self.snapshot = device, stats, snapshot
        self.installed, self.abbreviated = installed, abbreviated

    def stats_table(self) -> tuple:
        """(title, header, rows, footer) of the statistics."""
        st, snap = self.stats, self.snapshot
        pools = [("all", "")] if self.abbreviated else [("all", ""), ("large_pool", "  from large pool"),
                                                        ("small_pool", "  from small pool")]
        rows: list[list[str]] = []
        for title, key, is_bytes in _METRICS:
            if rows and not self.abbreviated:
                rows.append([])  # a blank line between metrics
            for pool_key, label in pools:
                values = [st[f"{key}.{pool_key}.{m}"] for m in ("current", "peak", "allocated", "freed")]
                rows.append([title if pool_key == "all" else label,
                             *(format_bytes(v) if is_bytes else str(v) for v in values)])
        limit = st.get("memory_limit", 0)
        footer = [f"Memory limit: {format_bytes(limit) if limit else 'none'}",
                  f"Fragmentation (1 - largest free / free): {snap['fragmentation']:.3f} "
                  f"(free {format_bytes(snap['free_bytes'])}, largest {format_bytes(snap['largest_free_block'])})",
                  f"Allocation retries: {st['num_alloc_retries']}   OOMs: {st['num_ooms']}   "
                  f"OOM callbacks run: {st['num_oom_callbacks']}",
                  f"Segment allocs/frees: {st['num_device_alloc']}/{st['num_device_free']}"]
        return (f"memwarden allocator summary, device {self.device}, installed: {self.installed}",
                ["Metric", "Cur Usage", "Peak Usage", "Tot Alloc", "Tot Freed"], rows, footer)

    def segment_table(self) -> tuple:
        """(title, header, rows, footer): one row per segment, by address."""
        rows = []
        for seg in sorted(self.snapshot["segments"], key=lambda s: s["address"]):
            free = [b["size"] for b in seg["blocks"] if b["state"] == "inactive"]
            rows.append([f"{seg['address']:#x}", seg["segment_type"], format_bytes(seg["total_size"]),
                         format_bytes(seg["allocated_size"]), format_bytes(seg["requested_size"]),
                         str(len(seg["blocks"])), str(len(free)), format_bytes(max(free, default=0))])
        return (f"{len(rows)} segments", ["segment", "pool", "size", "allocated", "requested", "blocks",
                                          "free blocks", "largest free"], rows, [])

    def __str__(self) -> str:
        return format_table(*self.stats_table())

    def __repr__(self) -> str:
        st = self.stats
        return (f"<MemorySummary {self.device}: {format_bytes(st['allocated_bytes.all.current'])} allocated, "
                f"{format_bytes(st['reserved_bytes.all.current'])} reserved in {len(self.snapshot['segments'])} "
                f"segments, fragmentation {self.snapshot['fragmentation']:.3f}>")

    def _repr_html_(self) -> str:
        return html_table(*self.stats_table()) + html_table(*self.segment_table())


def segments_figure(snapshot: dict, device: str):
    """A fragmentation map of a memwarden-format snapshot: one row per segment (by address),
    each block a bar at its offset, coloured by state, free blocks as the pale gaps."""
    segments = sorted(snapshot["segments"], key=lambda s: s["address"])
    fig = figure(9, min(1.6 + 0.3 * max(len(segments), 1), 20))
    ax = fig.add_subplot(1, 1, 1)
    reserved = sum(s["total_size"] for s in segments)
    allocated = sum(s["allocated_size"] for s in segments)
    ax.set_title(f"memwarden segments, {device}: fragmentation {snapshot['fragmentation']:.3f}\n"
                 f"{len(segments)} segments, {format_bytes(reserved)} reserved, {format_bytes(allocated)} allocated",
                 fontsize=10)
    if not segments:
        ax.text(0.5, 0.5, "no segments reserved", ha="center", va="center", transform=ax.transAxes)
        return fig
    unit, unit_name = byte_unit(max(s["total_size"] for s in segments))
    blocks = [(row, seg, b) for row, seg in enumerate(segments) for b in seg["blocks"]]
    ax.barh([row for row, _, _ in blocks], [b["size"] / unit for _, _, b in blocks],
            left=[(b["address"] - seg["address"]) / unit for _, seg, b in blocks], height=0.8,
            color=[STATE_COLORS[b["state"]] for _, _, b in blocks], edgecolor="white", linewidth=0.5)
    ax.set_yticks(range(len(segments)),
                  [f"{s['address']:#x} {s['segment_type']} {format_bytes(s['total_size'])}" for s in segments],
                  fontsize=7)
    ax.invert_yaxis()  # the lowest address on top
    ax.set_xlabel(f"offset in segment ({unit_name})")
    from matplotlib.patches import Patch  # matplotlib is there: figure() imported it

    ax.legend(handles=[Patch(color=STATE_COLORS[s], label=STATE_LABELS[s]) for s in STATE_COLORS], fontsize=8,
              loc="lower right")
    return fig


def history_series(trace: list, allocated_now: int, reserved_now: int) -> tuple[list, list, list]:
    """(seconds since the first entry, allocated bytes, reserved bytes) after each entry of a
    trace in torch's format; the trace may start late (record_history turned on later, or a
    full ring), so the series are anchored on what is allocated and reserved now."""
    allocated_delta = {"alloc": 1, "free_requested": -1}
    reserved_delta = {"segment_alloc": 1, "segment_free": -1}
    allocated, reserved = [0], [0]
    for entry in trace:
        allocated.append(allocated[-1] + allocated_delta.get(entry["action"], 0) * entry["size"])
        reserved.append(reserved[-1] + reserved_delta.get(entry["action"], 0) * entry["size"])
    allocated = [a + allocated_now - allocated[-1] for a in allocated]
    reserved = [r + reserved_now - reserved[-1] for r in reserved]
    start = trace[0]["time_us"] if trace else 0
    seconds = [0.0] + [(entry["time_us"] - start) / 1e6 for entry in trace]
    return seconds, allocated, reserved


def history_figure(snapshot: dict, device_index: int, device: str):
    """Bytes allocated (as requested) and reserved after each entry of a torch-format
    snapshot's trace of ``device_index``, ending at the snapshot's state; out-of-memory
    errors as red lines."""
    trace = snapshot["device_traces"][device_index]
    segments = [s for s in snapshot["segments"] if s["device"] == device_index]
    allocated_now = sum(b["requested_size"] for s in segments for b in s["blocks"] if b["state"] == "active_allocated")
    seconds, allocated, reserved = history_series(trace, allocated_now, sum(s["total_size"] for s in segments))
    fig = figure(9, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(f"memwarden allocator history, {device}: {len(trace)} trace entries", fontsize=10)
    if not trace:
        ax.text(0.5, 0.5, "nothing recorded: call memwarden.alloc.record_history() first", ha="center",
                va="center", transform=ax.transAxes)
        return fig
    unit, unit_name = byte_unit(max(reserved + allocated))
    ax.plot(seconds, [r / unit for r in reserved], drawstyle="steps-post", label="reserved", color="#999999")
    ax.plot(seconds, [a / unit for a in allocated], drawstyle="steps-post", label="allocated (requested bytes)",
            color="#3b7dd8")
    ooms = [t for t, entry in zip(seconds[1:], trace) if entry["action"] == "oom"]
    for i, t in enumerate(ooms):
        ax.axvline(t, color="#d62728", linestyle="--", linewidth=0.8, label="out of memory" if i == 0 else None)
    ax.set_xlabel("seconds since the first entry")
    ax.set_ylabel(unit_name)
    ax.legend(fontsize=8)
    return fig
