"""``memwarden top``: a live terminal view of memory -- the devices (torch, NVML, the host,
as :class:`memwarden.controller.monitor.MemoryMonitor` reads them), memwarden's allocator
pools in this process, and, given the URL of a running ``memwarden serve``, its
``/memory_stats``: sessions, KV budget, pressure level, requests, admission counts.

The pieces, each testable alone:

* :func:`read` takes one :class:`Reading`: plain data per part, or a string saying why
  that part could not be read (``"unreachable: ..."`` for the server);
* :func:`sections` turns a reading into tables (title, header, rows, footer);
  :func:`text` is them as plain text (``--once``, or stdout not a terminal) and
  :func:`frame` as a rich renderable (the live view);
* :func:`watch` redraws every ``interval`` seconds until ``q`` arrives on a key stream
  (the terminal, in cbreak mode meanwhile; any file with a ``fileno`` in tests).

May import: the standard library; lazily, :mod:`memwarden.controller.monitor`,
:mod:`memwarden.alloc` (torch with them) and rich, so ``memwarden --help`` imports neither
torch nor rich. Never :mod:`memwarden.serve` (the server is read over HTTP) or
:mod:`memwarden.cli`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, TextIO, Union

from memwarden._devices import device_order
from memwarden._table import format_table
from memwarden._units import format_bytes

__all__ = ["Reading", "read", "sections", "text", "frame", "watch", "run", "server_url", "refresh_interval",
           "session_count"]

MiB = 2**20
HTTP_TIMEOUT = 2.0  # seconds: a server slower than this shows as unreachable instead of freezing the view
QUIT_KEYS = (b"q", b"Q")
# the /memory_stats keys the server panel shows; a reply without them is not memwarden's
SERVER_KEYS = ("active_sessions", "total_kv_mb", "kv_budget_mb", "kv_used_mb", "kv_reserved_mb",
               "kv_cache_usage_perc", "pressure_level", "num_requests_running", "num_requests_waiting",
               "session_details", "rejected_count", "rejections_by_reason", "routed_count", "degraded_count",
               "completed_count", "preempted_count", "cut_short_count", "admission_policy")

Section = tuple  # (title, header, rows, footer): the arguments of memwarden._table.format_table


@dataclass(frozen=True)
class Reading:
    """What one refresh read. ``devices``: device key -> the monitor's ``DeviceMemory``;
    ``pools``: device -> allocator figures (see :func:`read`); ``server``: the JSON of
    ``/memory_stats`` (None without a URL). A string in place of any of them says why it
    could not be read."""

    time: float
    devices: Union[Mapping[str, Any], str]
    pools: Union[Mapping[str, Mapping[str, Any]], str]
    server: Union[Mapping[str, Any], str, None] = None
    url: Optional[str] = None


# ---- arguments ----------------------------------------------------------------------------

def server_url(value: str) -> str:
    """``--url``: ``http(s)://HOST[:PORT]`` of a running ``memwarden serve`` (a trailing
    slash is dropped)."""
    url = value.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number in 1..65535
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT of a running memwarden serve, got {value!r}")
    return url


def refresh_interval(value: str) -> float:
    """``--interval``: seconds between refreshes, a positive finite number."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def session_count(value: str) -> int:
    """``--sessions``: how many sessions to list, an int >= 1."""
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return int(value)


# ---- reading ------------------------------------------------------------------------------

def _devices() -> Union[dict, str]:
    from memwarden.controller.monitor import MemoryMonitor

    try:
        return dict(MemoryMonitor(history=1).sample().devices)
    except RuntimeError as e:  # the host is unreadable without psutil; the monitor says so
        return str(e)


def _pools() -> Union[dict, str]:
    try:
        import memwarden.alloc as alloc
    except (ImportError, OSError) as e:
        return f"memwarden's extension is not loaded: {e}"
    import torch

    devices = ["cpu"]
    if alloc.cuda_built() and torch.cuda.is_available():
        # a GPU pool holds nothing until memwarden serves that GPU, and reading one that
        # does not could wake CUDA in a process that only watches
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count()) if alloc.is_installed(f"cuda:{i}")]
    pools = {}
    for device in devices:
        stats = alloc.memory_stats(device)
        pools[device] = {"installed": alloc.is_installed(device),
                         "allocated": stats["allocated_bytes.all.current"],
                         "reserved": stats["reserved_bytes.all.current"],
                         "peak": stats["allocated_bytes.all.peak"],
                         "limit": alloc.get_memory_limit(device),
                         "segments": stats["segment.all.current"],
                         "fragmentation": alloc.snapshot(device)["fragmentation"]}
    return pools


def _server(url: str, timeout: float) -> Union[dict, str]:
    try:
        with urllib.request.urlopen(url + "/memory_stats", timeout=timeout) as reply:
            stats = json.loads(reply.read())
    except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors; ValueError: not JSON
        # a plain URLError wraps the socket's error; an HTTPError's own text has the status
        return f"unreachable: {e.reason if type(e) is urllib.error.URLError else e}"
    missing = [key for key in SERVER_KEYS if key not in stats] if isinstance(stats, dict) else list(SERVER_KEYS)
    if missing:
        return f"not a memwarden /memory_stats reply (no {', '.join(missing)})"
    return stats


def read(url: Optional[str] = None, timeout: float = HTTP_TIMEOUT) -> Reading:
    """Read everything now: the devices, this process's allocator pools and, with ``url``,
    the server. Pool figures per device: installed, allocated, reserved, peak (allocated),
    limit (None: none), segments and fragmentation (1 - largest free block / free bytes)."""
    return Reading(time=time.time(), devices=_devices(), pools=_pools(),
                   server=None if url is None else _server(url, timeout), url=url)


# ---- tables -------------------------------------------------------------------------------

def _percent(fraction: Optional[float]) -> str:
    return "n/a" if fraction is None else f"{fraction:.1%}"


def _mib(megabytes: float) -> str:
    return format_bytes(round(megabytes * MiB))


def _device_section(devices) -> Section:
    title = "devices"
    if isinstance(devices, str):
        return title, (), [], [devices]
    rows = [[key, format_bytes(d.used), format_bytes(d.total), _percent(d.used / d.total),
             format_bytes(d.process_used), format_bytes(d.allocated), format_bytes(d.reserved),
             _percent(d.utilization)]
            for key, d in sorted(devices.items(), key=lambda item: device_order(item[0]))]
    return (title, ("device", "used", "total", "used %", "this process", "allocated", "reserved", "utilization"),
            rows, [])


def _pool_section(pools) -> Section:
    title = "memwarden allocator pools (this process)"
    if isinstance(pools, str):
        return title, (), [], [pools]
    rows = [[device, "yes" if p["installed"] else "no", format_bytes(p["allocated"]), format_bytes(p["reserved"]),
             format_bytes(p["peak"]), format_bytes(p["limit"]) if p["limit"] else "none", str(p["segments"]),
             f"{p['fragmentation']:.3f}"]
            for device, p in pools.items()]
    return (title, ("pool", "installed", "allocated", "reserved", "peak", "limit", "segments", "fragmentation"),
            rows, [])


def _server_sections(server, url: str, session_limit: int) -> list[Section]:
    title = f"memwarden serve at {url}"
    if isinstance(server, str):
        return [(title, (), [], [server])]
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(server["rejections_by_reason"].items()))
    summary = [
        ["KV in use / budget", f"{_mib(server['kv_used_mb'])} / {_mib(server['kv_budget_mb'])} "
                               f"({_percent(server['kv_cache_usage_perc'])})"],
        ["KV reserved", _mib(server["kv_reserved_mb"])],
        ["KV held by sessions", _mib(server["total_kv_mb"])],
        ["pressure level", server["pressure_level"]],
        ["requests running / waiting", f"{server['num_requests_running']} / {server['num_requests_waiting']}"],
        ["admission policy", server["admission_policy"]],
        ["completed", str(server["completed_count"])],
        ["rejected", str(server["rejected_count"])],
        ["routed", str(server["routed_count"])],
        ["degraded", str(server["degraded_count"])],
        ["preempted", str(server["preempted_count"])],
        ["cut short", str(server["cut_short_count"])],
        ["rejections by reason", reasons or "none"],
        ["active sessions", str(server["active_sessions"])],
    ]
    # the largest KV holders first; among equals the most recently used
    ranked = sorted(server["session_details"].items(),
                    key=lambda item: (-item[1]["kv_bytes"], item[1]["idle_seconds"]))
    rows = [[session_id, format_bytes(s["kv_bytes"]), str(s["requests"]), str(s["in_flight"]), str(s["tokens_in"]),
             str(s["tokens_out"]), f"{s['idle_seconds']:.0f} s"]
            for session_id, s in ranked[:session_limit]]
    more = [f"... and {len(ranked) - session_limit} more"] if len(ranked) > session_limit else []
    return [(title, ("figure", "value"), summary, []),
            (f"sessions (top {session_limit} by KV)",
             ("session", "KV", "requests", "in flight", "tokens in", "tokens out", "idle"), rows, more)]


def sections(reading: Reading, session_limit: int = 5) -> list[Section]:
    """The tables of one reading: devices, allocator pools and, with a URL, the server's
    figures and its ``session_limit`` largest sessions."""
    tables = [_device_section(reading.devices), _pool_section(reading.pools)]
    if reading.url is not None:
        tables += _server_sections(reading.server, reading.url, session_limit)
    return tables


def _heading(reading: Reading, interval: Optional[float]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(reading.time))
    return f"memwarden top, {when}" + (f" (every {interval:g} s; q quits)" if interval else "")


def text(reading: Reading, session_limit: int = 5) -> str:
    """One frame as plain text: every table in full, nothing cut."""
    return "\n\n".join([_heading(reading, None), *(format_table(*s) for s in sections(reading, session_limit))])


def frame(reading: Reading, session_limit: int = 5, interval: Optional[float] = None):
    """One frame as a rich renderable: a panel per table (the text of
    :func:`memwarden._table.format_table`, which never cuts a cell)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    panels = [Panel(Text(format_table(None, header, rows, footer)), title=Text(title), title_align="left",
                    expand=False)
              for title, header, rows, footer in sections(reading, session_limit)]
    return Group(Text(_heading(reading, interval)), *panels)


# ---- the live loop ------------------------------------------------------------------------

@contextlib.contextmanager
def _cbreak(keys: Optional[TextIO]):
    """Keys arrive one by one, unechoed, while the block runs (a terminal only; Ctrl-C still
    interrupts); the terminal's settings come back afterwards, whatever ends the block."""
    if keys is None or not keys.isatty():
        yield
        return
    import termios
    import tty

    fd = keys.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def watch(draw: Callable[[], Any], keys: Optional[TextIO], interval: float) -> None:
    """Call ``draw()`` now and every ``interval`` seconds until ``q`` (or ``Q``) arrives on
    ``keys``; ``keys=None`` (or once it reaches its end): until Ctrl-C, which propagates."""
    with _cbreak(keys):
        while True:
            draw()
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                if keys is None:
                    time.sleep(left)
                    break
                # waiting for a key is the pause between frames: q quits at once
                if not select.select([keys], [], [], left)[0]:
                    break
                pressed = os.read(keys.fileno(), 64)  # the fd, not the file: its buffer would hide keys from select
                if any(key in pressed for key in QUIT_KEYS):
                    return
                if not pressed:
                    keys = None  # end of input: only Ctrl-C is left


def run(url: Optional[str] = None, interval: float = 1.0, once: bool = False, session_limit: int = 5) -> int:
    """``memwarden top``: one plain frame with ``once`` or when stdout is not a terminal,
    else the live view (rich) until ``q`` or Ctrl-C."""
    if once or not sys.stdout.isatty():
        print(text(read(url), session_limit), flush=True)
        return 0
    try:
        from rich.live import Live
    except ImportError:
        raise ValueError("the live view needs rich: pip install 'memwarden[cli]' (or use --once)") from None
    keys = sys.stdin if sys.stdin is not None and sys.stdin.isatty() else None
    with Live(auto_refresh=False, screen=True) as live:
        try:
            watch(lambda: live.update(frame(read(url), session_limit, interval), refresh=True), keys, interval)
        except KeyboardInterrupt:  # Ctrl-C quits like q
            pass
    return 0
