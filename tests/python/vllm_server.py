"""A real vLLM for tests: the CPU build in .venv-vllm (``scripts/setup-vllm.sh``), the
tiny model folders it writes under build/vllm-models, dummy weights, no tokenizer
(prompts are token-id lists).

* ``vllm_server``: an OpenAI-compatible server on a free loopback port, in its own
  process group (vLLM spawns an engine process and a worker), killed on exit however the
  test ends; about 30 s to start on 2 idle cores. The launcher itself is
  :mod:`memwarden.serve.vllm_process` (benchmarks start the same server); this file adds
  where the repository keeps vLLM and its models.

      with vllm_server(model_dir("llama-gqa"), kv_cache_bytes=10 * 2**20) as server:
          server.complete([1, 2, 3], max_tokens=4)
          server.get("/metrics")      # server.log(): what vLLM printed

* ``kv_capacity``: vLLM's KV sizing of several models from one process that builds each
  engine in-process (no server, no engine process), a few seconds a model once vLLM is
  imported. This file is that process's script: it imports only the standard library
  at the top, so either environment can load it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
VLLM_PYTHON = os.path.join(REPO, ".venv-vllm", "bin", "python")
MODELS_DIR = os.path.join(REPO, "build", "vllm-models")
MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT_S = 240   # about 30 s alone on 2 cores; more when the machine is busy
# model folders hold only a config.json: nothing to look up on the Hub (a lookup there
# waits for a network timeout); the same as memwarden.serve.vllm_process.OFFLINE_ENV
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def unavailable() -> str | None:
    """Why no vLLM server can start here (a reason for pytest.skip), or None."""
    if os.environ.get("MEMWARDEN_SKIP_VLLM") == "1":
        return "MEMWARDEN_SKIP_VLLM=1"
    if not os.path.isfile(VLLM_PYTHON):
        return f"no vLLM environment at {VLLM_PYTHON}: run scripts/setup-vllm.sh"
    if not os.path.isdir(MODELS_DIR):
        return f"no tiny models in {MODELS_DIR}: run scripts/setup-vllm.sh"
    return None


def model_dir(name: str) -> str:
    return os.path.join(MODELS_DIR, name)


@contextmanager
def vllm_server(model: str, kv_cache_bytes: int, *, max_model_len: int = MAX_MODEL_LEN,
                extra_args: tuple = (), timeout: float = STARTUP_TIMEOUT_S) -> Iterator:
    """A vLLM OpenAI-compatible server on ``model`` (a folder with a config.json) with
    ``kv_cache_bytes`` of KV cache, healthy when yielded and killed on exit: a
    :class:`memwarden.serve.vllm_process.VLLMServer`."""
    # imported here: kv_capacity runs this file in .venv-vllm, where memwarden is not installed
    from memwarden.serve import vllm_process

    with vllm_process.vllm_server(VLLM_PYTHON, model, kv_cache_bytes, max_model_len=max_model_len,
                                  extra_args=extra_args, timeout=timeout, cwd=REPO) as server:
        yield server


CAPACITY_MARK = "memwarden-kv-capacity "


def kv_capacity(models: list, kv_cache_bytes: int, *, max_model_len: int = MAX_MODEL_LEN,
                max_num_batched_tokens: int = 256, timeout: float | None = None) -> dict:
    """vLLM's KV sizing of each model folder, {folder: cache figures}: block_size,
    num_gpu_blocks, kv_cache_size_tokens and kv_cache_max_concurrency as its
    CacheConfig holds them (what /metrics shows as vllm:cache_config_info), with the
    settings ``vllm_server`` starts a server with (dummy weights, bfloat16, eager) and
    synchronous scheduling (one step in flight)."""
    command = [VLLM_PYTHON, os.path.abspath(__file__), str(kv_cache_bytes), str(max_model_len),
               str(max_num_batched_tokens), *models]
    # the engine in this process, its worker in-process too
    env = {**os.environ, **OFFLINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout or STARTUP_TIMEOUT_S + 60 * len(models))
    figures = [json.loads(line[len(CAPACITY_MARK):]) for line in done.stdout.splitlines()
               if line.startswith(CAPACITY_MARK)]
    if done.returncode or len(figures) != len(models):
        raise RuntimeError(f"vLLM's KV sizing failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return {f.pop("model"): f for f in figures}


def _print_kv_capacity(kv_cache_bytes: int, max_model_len: int, max_num_batched_tokens: int, models: list) -> None:
    """Runs in .venv-vllm: build each engine, print its cache figures as a marked JSON line."""
    import gc

    from vllm import LLM

    for model in models:
        llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
                  max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_bytes,
                  max_num_batched_tokens=max_num_batched_tokens, async_scheduling=False,
                  distributed_executor_backend="uni")
        cache = llm.llm_engine.vllm_config.cache_config
        print(CAPACITY_MARK + json.dumps(dict(
            model=model, block_size=cache.block_size, num_gpu_blocks=cache.num_gpu_blocks,
            kv_cache_size_tokens=cache.kv_cache_size_tokens, kv_cache_max_concurrency=cache.kv_cache_max_concurrency)),
            flush=True)
        del llm
        gc.collect()


if __name__ == "__main__":   # vLLM may spawn processes, which re-import the main module
    _print_kv_capacity(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
