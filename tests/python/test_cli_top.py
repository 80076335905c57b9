"""memwarden top: ``--once`` against a real ``memwarden serve`` on loopback (the frame shows
the numbers of its /memory_stats), without a URL (the allocator figures are those of
memwarden.alloc.memory_stats), with an unreachable URL, argparse errors for a bad --url or
--interval, the tables and the rich frame of a hand-made reading, the key loop (q from a
pipe or a pseudo-terminal ends it, the terminal's settings come back, Ctrl-C too), and the
live view itself in a pseudo-terminal.
"""
from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import urllib.request

import pytest

from memwarden import top
from memwarden._units import format_bytes
from memwarden.cli import main

MiB = 2**20


def section(out: str, title: str) -> str:
    """The block of the plain frame that starts with ``title``."""
    return next(block for block in out.split("\n\n") if block.startswith(title))


def value(block: str, label: str) -> str:
    """The value column of a (figure, value) row."""
    return re.search(rf"^  {re.escape(label)}  +(.+)$", block, re.M).group(1)


def cells(block: str, first: str) -> list[str]:
    """The cells of the row whose first cell is ``first`` (cells are 2+ spaces apart)."""
    line = next(line for line in block.splitlines() if line.split()[:1] == [first])
    return re.split(r"\s{2,}", line.strip())


def megabytes(mb: float) -> str:
    return format_bytes(round(mb * MiB))


# ---- against a running server -------------------------------------------------------------

def test_once_shows_the_numbers_of_memory_stats(capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    pytest.importorskip("transformers")
    from memwarden.controller.config import MemwardenConfig
    from memwarden.serve.server import Server

    # 512 B a token: the 16 KiB session limit holds 32 tokens, the 64 KiB pool 128
    config = MemwardenConfig.load(env={}, overrides={"server.port": 0, "server.max_memory": "64KiB",
                                                     "sessions.per_session_limit": "16KiB",
                                                     "admission.policy": "reserve"})
    server = Server(config)
    thread = server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        for _ in range(2):
            client.completions.create(model=server.engine.name, prompt="abc", max_tokens=3,
                                      extra_headers={"X-Session-ID": "tenant-7"})
        with pytest.raises(openai.RateLimitError):  # 40 tokens: over the session limit
            client.completions.create(model=server.engine.name, prompt="a" * 20, max_tokens=20,
                                      extra_headers={"X-Session-ID": "s1"})
        assert main(["top", "--once", "--url", base + "/"]) == 0
        out = capsys.readouterr().out
        with urllib.request.urlopen(base + "/memory_stats", timeout=30) as reply:
            stats = json.loads(reply.read())
    finally:
        server.stop(thread)

    assert stats["completed_count"] == 2 and stats["rejected_count"] == 1
    served = section(out, f"memwarden serve at {base}")
    assert value(served, "KV in use / budget") == (f"{megabytes(stats['kv_used_mb'])} / "
                                                   f"{megabytes(stats['kv_budget_mb'])} "
                                                   f"({stats['kv_cache_usage_perc']:.1%})")
    assert value(served, "KV reserved") == megabytes(stats["kv_reserved_mb"])
    assert value(served, "KV held by sessions") == megabytes(stats["total_kv_mb"])
    assert value(served, "pressure level") == stats["pressure_level"]
    assert value(served, "requests running / waiting") == (f"{stats['num_requests_running']} / "
                                                           f"{stats['num_requests_waiting']}")
    assert value(served, "admission policy") == stats["admission_policy"] == "reserve"
    for label, key in [("completed", "completed_count"), ("rejected", "rejected_count"),
                       ("routed", "routed_count"), ("degraded", "degraded_count"),
                       ("preempted", "preempted_count"), ("cut short", "cut_short_count"),
                       ("active sessions", "active_sessions")]:
        assert value(served, label) == str(stats[key]), label
    assert value(served, "rejections by reason") == "session_limit 1" and stats["rejections_by_reason"] == {
        "session_limit": 1}
    sessions = section(out, "sessions (top 5 by KV)")
    detail = stats["session_details"]["tenant-7"]
    assert cells(sessions, "tenant-7")[:6] == ["tenant-7", format_bytes(detail["kv_bytes"]), "2",
                                               str(detail["in_flight"]), str(detail["tokens_in"]),
                                               str(detail["tokens_out"])]


def test_an_unreachable_url_is_shown_in_its_panel(capsys):
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["top", "--once", "--url", f"http://127.0.0.1:{port}"]) == 0
    served = section(capsys.readouterr().out, f"memwarden serve at http://127.0.0.1:{port}")
    assert re.search(r"^  unreachable: .*refused", served, re.M | re.I)


@pytest.mark.parametrize("args,option", [
    (["--url", "localhost:8000"], "--url"),
    (["--url", "ftp://127.0.0.1:8000"], "--url"),
    (["--url", "http://127.0.0.1:99999"], "--url"),
    (["--interval", "0"], "--interval"),
    (["--interval", "-1"], "--interval"),
    (["--interval", "nan"], "--interval"),
    (["--interval", "soon"], "--interval"),
    (["--sessions", "0"], "--sessions"),
])
def test_bad_arguments_are_argparse_errors(capsys, args, option):
    with pytest.raises(SystemExit) as exit_:
        main(["top", "--once", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected" in err and args[1] in err


# ---- this process's allocator -------------------------------------------------------------

def test_once_without_url_shows_the_allocator_pools(capsys):
    alloc = pytest.importorskip("memwarden.alloc")
    import torch

    with alloc.use("cpu", memory_limit="64MiB"):
        kept = torch.empty(MiB, dtype=torch.uint8)  # noqa: F841 (held while top reads the pool)
        assert main(["top", "--once"]) == 0
        stats, snapshot = alloc.memory_stats("cpu"), alloc.snapshot("cpu")
        pools = top.read().pools
    out = capsys.readouterr().out
    assert "memwarden serve" not in out
    assert pools["cpu"] == {"installed": True, "allocated": stats["allocated_bytes.all.current"],
                            "reserved": stats["reserved_bytes.all.current"],
                            "peak": stats["allocated_bytes.all.peak"], "limit": 64 * MiB,
                            "segments": stats["segment.all.current"],
                            "fragmentation": snapshot["fragmentation"]}
    assert stats["allocated_bytes.all.current"] >= MiB
    assert cells(section(out, "memwarden allocator pools"), "cpu") == [
        "cpu", "yes", format_bytes(stats["allocated_bytes.all.current"]),
        format_bytes(stats["reserved_bytes.all.current"]), format_bytes(stats["allocated_bytes.all.peak"]),
        "64.00 MiB", str(stats["segment.all.current"]), f"{snapshot['fragmentation']:.3f}"]
    assert cells(section(out, "devices"), "cpu")[0] == "cpu"


# ---- tables and the rich frame from plain data --------------------------------------------

def hand_made_reading(**server_fields) -> top.Reading:
    from memwarden.controller.monitor import DeviceMemory

    def session(kv_bytes, idle):
        return {"kv_bytes": kv_bytes, "kv_mb": kv_bytes / MiB, "requests": 1, "tokens_in": 4, "tokens_out": 2,
                "in_flight": 1, "created": 0.0, "last_used": 0.0, "idle_seconds": idle}

    server = {"active_sessions": 4, "total_kv_mb": 0.5, "kv_budget_mb": 2.0, "kv_used_mb": 1.0, "kv_reserved_mb": 1.5,
              "kv_cache_usage_perc": 0.5, "pressure_level": "warning", "num_requests_running": 3,
              "num_requests_waiting": 1, "rejected_count": 2, "rejections_by_reason": {"pool_full": 1,
                                                                                        "global_limit": 1},
              "routed_count": 0, "degraded_count": 5, "completed_count": 9, "preempted_count": 2,
              "cut_short_count": 0, "admission_policy": "memwarden",
              "session_details": {"small": session(1024, 1), "big": session(4096, 9),
                                  "tie-old": session(2048, 30), "tie-new": session(2048, 2)},
              **server_fields}
    return top.Reading(time=0.0, url="http://127.0.0.1:8000",
                       devices={"cpu": DeviceMemory(used=3 * MiB, total=4 * MiB, process_used=MiB),
                                "cuda:0": DeviceMemory(used=MiB, total=8 * MiB, process_used=MiB,
                                                       allocated=MiB // 2, reserved=MiB, utilization=0.25)},
                       pools={"cpu": {"installed": False, "allocated": 0, "reserved": 0, "peak": 512,
                                      "limit": None, "segments": 0, "fragmentation": 0.0}},
                       server=server)


def test_sections_rank_sessions_by_kv_and_keep_gpus_first():
    devices, pools, summary, sessions = top.sections(hand_made_reading(), session_limit=3)
    assert [row[0] for row in devices[2]] == ["cuda:0", "cpu"]
    assert devices[2][0][1:] == ["1.00 MiB", "8.00 MiB", "12.5%", "1.00 MiB", "512.00 KiB", "1.00 MiB", "25.0%"]
    assert devices[2][1][5:] == ["n/a", "n/a", "n/a"]
    assert pools[2] == [["cpu", "no", "0 B", "0 B", "512 B", "none", "0", "0.000"]]
    assert dict(summary[2])["KV in use / budget"] == "1.00 MiB / 2.00 MiB (50.0%)"
    assert dict(summary[2])["KV reserved"] == "1.50 MiB"
    assert dict(summary[2])["rejections by reason"] == "global_limit 1, pool_full 1"
    assert sessions[0] == "sessions (top 3 by KV)"
    assert [row[0] for row in sessions[2]] == ["big", "tie-new", "tie-old"]  # equal KV: most recent first
    assert sessions[3] == ["... and 1 more"]


def test_unreadable_parts_say_why():
    reading = top.Reading(time=0.0, devices="install psutil to read host memory", pools="no extension",
                          server="unreachable: timed out", url="http://127.0.0.1:1")
    out = top.text(reading)
    for why in ("install psutil to read host memory", "no extension", "unreachable: timed out"):
        assert f"\n  {why}" in out


def test_the_rich_frame_holds_the_same_tables():
    from rich.console import Console

    reading = hand_made_reading()
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(top.frame(reading, interval=1))
    shown = console.file.getvalue()
    assert "(every 1 s; q quits)" in shown
    for title, header, rows, footer in top.sections(reading):
        assert title in shown
        for row in rows:
            assert re.search(r"\s{2,}".join(map(re.escape, row)), shown), row


# ---- the key loop -------------------------------------------------------------------------

def run_bounded(target, seconds=10.0):
    """Run ``target`` in a thread; fail instead of hanging if it does not return in time."""
    errors = []

    def body():
        try:
            target()
        except BaseException as e:  # noqa: B902 (KeyboardInterrupt included: the tests raise it)
            errors.append(e)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "watch did not return"
    return errors


def test_q_on_a_key_stream_ends_the_loop_other_keys_do_not():
    read_end, write_end = os.pipe()
    draws = []

    def draw():
        draws.append(1)
        os.write(write_end, b"x" if len(draws) == 2 else b"q" if len(draws) == 3 else b"")

    with open(read_end, "rb", buffering=0) as keys:
        assert run_bounded(lambda: top.watch(draw, keys, interval=0.01)) == []
    os.close(write_end)
    assert len(draws) == 3


def test_end_of_input_leaves_ctrl_c():
    read_end, write_end = os.pipe()
    os.close(write_end)  # the stream ends at once: no q can come
    draws = []

    def draw():
        draws.append(1)
        if len(draws) == 4:
            raise KeyboardInterrupt

    with open(read_end, "rb", buffering=0) as keys:
        errors = run_bounded(lambda: top.watch(draw, keys, interval=0.01))
    assert len(draws) == 4 and [type(e) for e in errors] == [KeyboardInterrupt]


@pytest.mark.parametrize("ending", ["q", "ctrl-c"])
def test_a_terminal_is_in_cbreak_mode_while_watched_and_restored_after(ending):
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON
        seen = []

        def draw():
            seen.append(termios.tcgetattr(slave)[3] & (termios.ICANON | termios.ECHO))
            if ending == "ctrl-c":
                raise KeyboardInterrupt
            os.write(master, b"q")

        with open(slave, "rb", buffering=0, closefd=False) as keys:
            errors = run_bounded(lambda: top.watch(draw, keys, interval=5))
        assert seen == [0]  # keys one by one, unechoed
        assert [type(e) for e in errors] == ([KeyboardInterrupt] if ending == "ctrl-c" else [])
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("ending", ["q", "ctrl-c"])
def test_the_live_view_in_a_pseudo_terminal_quits_cleanly(ending):
    pytest.importorskip("rich")
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    # the child imports the memwarden these tests import (installed or the source tree)
    source = os.path.dirname(os.path.dirname(os.path.abspath(top.__file__)))
    env = dict(os.environ, TERM="xterm", COLUMNS="120", LINES="50",
               PYTHONPATH=os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-m", "memwarden.cli", "top", "--interval", "0.2"],
                             stdin=slave, stdout=slave, stderr=slave, env=env)
    shown = b""
    try:
        deadline = time.monotonic() + 120
        while shown.count(b"memwarden top,") < 2 and time.monotonic() < deadline:  # two frames: it refreshes
            if select.select([master], [], [], 0.2)[0]:
                shown += os.read(master, 65536)
        assert shown.count(b"memwarden top,") >= 2, shown.decode(errors="replace")
        if ending == "q":
            os.write(master, b"q")
        else:
            child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while child.poll() is None and time.monotonic() < deadline:  # keep reading: a full pty blocks the child
            if select.select([master], [], [], 0.2)[0]:
                os.read(master, 65536)
        assert child.wait(1) == 0
        assert termios.tcgetattr(slave) == before
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
        os.close(slave)
