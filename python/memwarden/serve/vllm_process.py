"""A real vLLM OpenAI-compatible server as a child process on loopback, for the tests and
benchmarks that put memwarden in front of one (``tests/python/vllm_server.py``,
``benchmarks/bench_gateway.py``). vLLM lives in its own Python environment (it pins its
own torch), so it is started with that environment's interpreter: ``python``.

* :func:`vllm_server`: the server on a free port, in its own process group (vLLM spawns
  an engine process and a worker), healthy when yielded and killed on exit however the
  caller ends. Dummy weights, no tokenizer (prompts are token-id lists), eager, bfloat16.
* :class:`VLLMServer`: its address, its log, small blocking HTTP helpers and
  :meth:`~VLLMServer.metric_values` -- the samples of one metric on ``/metrics``, which is
  how callers read vLLM's own counters (``vllm:num_preemptions_total``) before and after
  a run.

May import: the standard library only (either environment can load it).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

__all__ = ["OFFLINE_ENV", "VLLMServer", "free_port", "vllm_server"]

STARTUP_TIMEOUT_S = 240  # about 30 s alone on 2 cores; more when the machine is busy
# model folders hold only a config.json: nothing to look up on the Hub (a lookup there
# waits for a network timeout)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_SAMPLE = re.compile(r"^([^\s{]+)(\{[^}]*\})?\s+(\S+)")


@dataclass
class VLLMServer:
    url: str  # http://127.0.0.1:PORT
    model: str  # the name it serves the model under: the folder as given
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read().decode()

    def post(self, path: str, body: dict, timeout: float = 60) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def complete(self, prompt_token_ids: list, max_tokens: int) -> dict:
        """/v1/completions of a token-id prompt (the server has no tokenizer)."""
        return self.post("/v1/completions", {"model": self.model, "prompt": prompt_token_ids,
                                             "max_tokens": max_tokens, "ignore_eos": True})

    def metric_labels(self, name: str) -> dict:
        """The labels of the first sample of ``name`` on /metrics (vllm:cache_config_info
        carries the cache configuration as labels)."""
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + "{"):
                return dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}")]))
        raise KeyError(f"{name} is not on {self.url}/metrics")

    def metric_values(self, *names: str) -> dict:
        """{name: the sum of its samples} for each of ``names`` on /metrics (a counter or a
        histogram's ``_sum`` / ``_count``); 0.0 for a name with no sample yet."""
        totals = dict.fromkeys(names, 0.0)
        for line in self.get("/metrics").splitlines():
            found = _SAMPLE.match(line)
            if found and found[1] in totals:
                totals[found[1]] += float(found[3])
        return totals


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(process: subprocess.Popen, server: VLLMServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {process.returncode} while starting:\n{server.log()[-4000:]}")
        try:
            server.get("/health", timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise TimeoutError(f"vLLM was not healthy within {timeout:.0f} s:\n{server.log()[-4000:]}")


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the server stops its engine), then SIGKILL
    to whatever of the group is left after 15 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@contextmanager
def vllm_server(python: str, model: str, kv_cache_bytes: int, *, max_model_len: int = 1024,
                extra_args: tuple = (), timeout: float = STARTUP_TIMEOUT_S,
                cwd: Optional[str] = None) -> Iterator[VLLMServer]:
    """A vLLM OpenAI-compatible server run by the interpreter ``python`` on ``model`` (a
    folder with a config.json) with ``kv_cache_bytes`` of KV cache, healthy when yielded
    and killed on exit."""
    port = free_port()
    log_file = tempfile.NamedTemporaryFile("w", prefix=f"vllm-{os.path.basename(model)}-", suffix=".log",
                                           delete=False)
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--load-format", "dummy", "--skip-tokenizer-init", "--enforce-eager", "--dtype", "bfloat16",
               "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", str(kv_cache_bytes),
               "--host", "127.0.0.1", "--port", str(port), *extra_args]
    # the `vllm` console script does not start on this CPU build; the module does
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               cwd=cwd, env={**os.environ, **OFFLINE_ENV}, start_new_session=True)
    log_file.close()
    server = VLLMServer(url=f"http://127.0.0.1:{port}", model=model, log_path=log_file.name)
    try:
        _wait_healthy(process, server, timeout)
        yield server
    finally:
        _kill_group(process)
        os.unlink(log_file.name)  # failures quote its tail
