"""memwarden's vLLM-style KV sizing against a real vLLM (the CPU build that
``scripts/setup-vllm.sh`` installs in .venv-vllm, on the tiny models it writes): for the
same config, KV budget, dtype, block size and scheduler settings, ``footprint.kv_pool``
must give the blocks, the "KV cache size" in tokens and the maximum concurrency that vLLM
computes. Every model's engine is built in one vLLM process (``vllm_server.kv_capacity``);
one real server checks that /metrics and the log report those same figures. Skipped
without .venv-vllm or with MEMWARDEN_SKIP_VLLM=1."""
import functools
import re

import pytest

from memwarden import footprint as F
from memwarden import models as M

import vllm_server as V

UNAVAILABLE = V.unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))

KV_BUDGET = 11_000_000       # not a power of two: every division rounds
CONTEXT = 1000               # not a whole number of blocks
# chunked prefill of 256 tokens a step, one step in flight: the tokens a sliding layer
# holds beyond its window (vLLM's max_in_flight_tokens)
BATCHED_TOKENS = 256
MODELS = ("llama-gqa", "qwen3", "gemma3-hybrid", "gemma3-padded", "mistral-sliding", "qwen3-moe",
          "deepseek-v2-mla", "qwen3-next")
CAPACITY_LOG = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: "
                          r"([\d.]+)x")


@functools.cache
def vllm_figures() -> dict:
    return V.kv_capacity([V.model_dir(name) for name in MODELS], KV_BUDGET, max_model_len=CONTEXT,
                         max_num_batched_tokens=BATCHED_TOKENS)


def memwarden_pool(name: str, block_size: int) -> F.KVPool:
    return F.kv_pool(M.model_spec(V.model_dir(name)), KV_BUDGET, CONTEXT, block_size=block_size,
                     kv_dtype="bfloat16", in_flight_tokens=BATCHED_TOKENS)


@pytest.mark.parametrize("name", MODELS)
def test_kv_sizing_matches_vllm(name):
    vllm = vllm_figures()[V.model_dir(name)]
    pool = memwarden_pool(name, vllm["block_size"])
    assert (pool.num_blocks, pool.tokens, pool.max_concurrency) == (
        vllm["num_gpu_blocks"], vllm["kv_cache_size_tokens"], vllm["kv_cache_max_concurrency"])
    spec = M.model_spec(V.model_dir(name))
    assert F.kv_blocks(spec, KV_BUDGET, pool.block_size, "bfloat16") == pool.num_blocks
    assert F.max_concurrent_sequences(spec, KV_BUDGET, CONTEXT, pool.block_size, "bfloat16",
                                      in_flight_tokens=BATCHED_TOKENS) == int(pool.max_concurrency)


def test_a_server_serves_and_reports_the_same_sizing_on_metrics_and_in_its_log():
    name = "gemma3-hybrid"
    args = ("--max-num-batched-tokens", str(BATCHED_TOKENS), "--no-async-scheduling")
    with V.vllm_server(V.model_dir(name), KV_BUDGET, max_model_len=CONTEXT, extra_args=args) as server:
        cache = server.metric_labels("vllm:cache_config_info")
        logged = CAPACITY_LOG.search(server.log())
        # and it serves (not a 3-token prompt: vLLM 0.32's CPU worker dies of SIGILL on
        # one on this AVX-512 + AMX machine; 20 tokens and more are fine)
        completion = server.complete(list(range(1, 33)), max_tokens=4)
    assert completion["usage"]["prompt_tokens"] == 32 and completion["usage"]["completion_tokens"] == 4
    assert cache["kv_cache_memory_bytes"] == str(KV_BUDGET)
    pool = memwarden_pool(name, int(cache["block_size"]))
    assert pool.num_blocks == int(cache["num_gpu_blocks"])
    assert pool.tokens == int(cache["kv_cache_size_tokens"])
    assert pool.max_concurrency == float(cache["kv_cache_max_concurrency"])
    assert logged, "vLLM logged no KV cache size"
    assert (logged[1], logged[2], logged[3]) == (f"{pool.tokens:,}", f"{CONTEXT:,}", f"{pool.max_concurrency:.2f}")
