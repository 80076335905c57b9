"""Plain-PyTorch references for the paged KV ops (per-token loops, no cleverness)."""
from __future__ import annotations

import torch

FLT_MIN = torch.finfo(torch.float32).tiny


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = sat(round_half_even(x * (1 / scale))), scale broadcast over heads ([1] or [H])."""
    s = scale.float().reshape(-1)
    inv = torch.where(s > 0, torch.reciprocal(s), torch.zeros_like(s))
    inv = inv.view(-1, 1) if inv.numel() > 1 else inv  # [H, 1] against [H, D]
    q = torch.round(x.float() * inv)
    q = torch.nan_to_num(q, nan=0.0)
    return q.clamp(-128, 127).to(torch.int8)


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [H, D] -> (q [H, D] int8, scale [H] fp32) with scale = finite absmax / 127 (at least FLT_MIN)."""
    xf = x.float()
    a = torch.where(torch.isfinite(xf), xf.abs(), torch.zeros_like(xf)).amax(dim=-1)
    scale = a / 127.0
    inv = torch.where(a > 0, torch.full_like(a, 127.0) / a, torch.zeros_like(a))  # true division, like the kernel
    # A step below FLT_MIN is raised to it (memwarden.quant's rule), so 1 / scale stays finite.
    tiny = (scale > 0) & (scale < FLT_MIN)
    scale = torch.where(tiny, FLT_MIN, scale)
    inv = torch.where(tiny, 1.0 / FLT_MIN, inv)
    q = torch.nan_to_num(torch.round(xf * inv.view(-1, 1)), nan=0.0).clamp(-128, 127).to(torch.int8)
    return q, scale


def write_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype="auto", k_scale=None, v_scale=None,
                k_scale_cache=None, v_scale_cache=None):
    """Per-token scatter into flash-layout caches (modified in place)."""
    block_size = key_cache.size(1)
    for t in range(slot_mapping.size(0)):
        slot = int(slot_mapping[t])
        if slot < 0:
            continue
        b, o = divmod(slot, block_size)
        for src, cache, scale, scale_cache in ((key, key_cache, k_scale, k_scale_cache),
                                               (value, value_cache, v_scale, v_scale_cache)):
            if kv_cache_dtype == "auto":
                cache[b, o] = src[t]
            elif kv_cache_dtype == "int8":
                cache[b, o] = quantize_static(src[t], scale)
            else:
                q, s = quantize_per_head(src[t])
                cache[b, o] = q
                scale_cache[b, o] = s


def flash_to_legacy(key_flash: torch.Tensor, value_flash: torch.Tensor):
    """Flash-layout caches -> legacy layout (key [nb, H, D/x, bs, x], value [nb, H, D, bs])."""
    nb, bs, h, d = key_flash.shape
    x = 16 // key_flash.element_size()
    key = key_flash.view(nb, bs, h, d // x, x).permute(0, 2, 3, 1, 4).contiguous()
    value = value_flash.permute(0, 2, 3, 1).contiguous()
    return key, value


def gather(key_cache, value_cache, block_table, seq_lens, kv_cache_dtype="auto", out_dtype=None, k_scale=None,
           v_scale=None, k_scale_cache=None, v_scale_cache=None):
    """Per-token gather of each sequence's pages into contiguous [sum(seq_lens), H, D]."""
    block_size = key_cache.size(1)
    out_dtype = out_dtype or key_cache.dtype
    keys, values = [], []
    for s in range(block_table.size(0)):
        for t in range(int(seq_lens[s])):
            b, o = int(block_table[s, t // block_size]), t % block_size
            for cache, scale, scale_cache, out in ((key_cache, k_scale, k_scale_cache, keys),
                                                   (value_cache, v_scale, v_scale_cache, values)):
                row = cache[b, o]
                if kv_cache_dtype == "int8":
                    sc = scale.float().reshape(-1)
                    row = row.float() * (sc.view(-1, 1) if sc.numel() > 1 else sc)
                elif kv_cache_dtype == "int8_per_token_head":
                    row = row.float() * scale_cache[b, o].view(-1, 1)
                out.append(row.to(out_dtype))
    h, d = key_cache.shape[2:]
    if not keys:
        return (torch.empty(0, h, d, dtype=out_dtype), torch.empty(0, h, d, dtype=out_dtype))
    return torch.stack(keys), torch.stack(values)


def legacy_to_flash(key_legacy: torch.Tensor, value_legacy: torch.Tensor):
    """Legacy-layout caches -> flash layout [nb, bs, H, D] (the inverse of flash_to_legacy)."""
    nb, h, dx, bs, x = key_legacy.shape
    key = key_legacy.permute(0, 3, 1, 2, 4).reshape(nb, bs, h, dx * x)
    value = value_legacy.permute(0, 3, 1, 2).contiguous()
    return key, value


def dequantized_context(cache, table_row, seq_len, kv_cache_dtype="auto", scale=None, scale_cache=None):
    """The first seq_len tokens of one sequence's pages as float32 [seq_len, H, D]."""
    block_size = cache.size(1)
    blocks = table_row[: (seq_len + block_size - 1) // block_size].long()
    rows = cache[blocks].reshape(-1, cache.size(2), cache.size(3))[:seq_len].float()
    if kv_cache_dtype == "int8":
        sc = scale.float().reshape(-1)
        rows = rows * (sc.view(1, -1, 1) if sc.numel() > 1 else sc)
    elif kv_cache_dtype == "int8_per_token_head":
        rows = rows * scale_cache[blocks].reshape(-1, cache.size(2))[:seq_len].unsqueeze(-1)
    return rows


def paged_attention(query, key_cache, value_cache, block_tables, seq_lens, scale=None, query_start_loc=None,
                    kv_cache_dtype="auto", k_scale=None, v_scale=None, k_scale_cache=None, v_scale_cache=None,
                    sliding_window=None, softcap=None, sinks=None, kv_start=None, causal=True):
    """Brute-force attention per sequence over its dequantized context, in float64:
    (out in query's dtype, lse float32); a row that sees no key gives 0 and -inf (or the
    sink's logit)."""
    num_tokens, num_heads, head_size = query.shape
    group = num_heads // key_cache.size(2)
    scale = head_size ** -0.5 if scale is None else scale
    starts = query_start_loc.tolist() if query_start_loc is not None else list(range(block_tables.size(0) + 1))
    out = torch.zeros(num_tokens, num_heads, head_size, dtype=torch.float64)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float64)
    for s in range(block_tables.size(0)):
        q0, q1, seq_len = starts[s], starts[s + 1], int(seq_lens[s])
        if q1 == q0:
            continue
        k = dequantized_context(key_cache, block_tables[s], seq_len, kv_cache_dtype, k_scale, k_scale_cache)
        v = dequantized_context(value_cache, block_tables[s], seq_len, kv_cache_dtype, v_scale, v_scale_cache)
        k = k.double().repeat_interleave(group, dim=1)
        v = v.double().repeat_interleave(group, dim=1)
        q = query[q0:q1].double()
        logits = torch.einsum("qhd,khd->hqk", q, k) * scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        q_len = q1 - q0
        pos = torch.arange(seq_len - q_len, seq_len) if causal else torch.full((q_len,), seq_len - 1)
        keys = torch.arange(seq_len)
        allowed = (keys[None, :] >= (int(kv_start[s]) if kv_start is not None else 0)).expand(q_len, seq_len)
        if causal:
            allowed = allowed & (keys[None, :] <= pos[:, None])
        if sliding_window:
            allowed = allowed & (keys[None, :] > pos[:, None] - sliding_window)
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        if sinks is not None:
            logits = torch.cat([logits, sinks.double().view(-1, 1, 1).expand(-1, q_len, 1)], dim=-1)
        row_lse = torch.logsumexp(logits, dim=-1)  # [H, q_len]
        weights = torch.exp(logits - row_lse.unsqueeze(-1)).nan_to_num(0.0)
        if sinks is not None:
            weights = weights[..., :-1]
        out[q0:q1] = torch.einsum("hqk,khd->qhd", weights, v)
        lse[q0:q1] = row_lse.T
    return out.to(query.dtype), lse.float()
