"""apply(): split fused experts across planned devices (all mapped to the CPU here)."""
import copy

import pytest
import torch

from memwarden import models as M
from memwarden import plan as P

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "mixtral": {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
                "num_experts_per_tok": 2, "vocab_size": 64, "max_position_embeddings": 128},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 24,
                  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                  "num_experts": 12, "num_experts_per_tok": 3, "vocab_size": 64, "max_position_embeddings": 128},
    "gpt_oss": {"model_type": "gpt_oss", "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 3,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_local_experts": 8,
                "num_experts_per_tok": 2, "vocab_size": 64, "max_position_embeddings": 128,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "sliding_window": 4},
    # experts under feed_forward (not mlp), and a dense layer between MoE layers
    "jamba": {"model_type": "jamba", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 12, "num_experts_per_tok": 2,
              "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 2, "attn_layer_offset": 0,
              "mamba_d_state": 8, "mamba_dt_rank": 4, "mamba_expand": 2, "vocab_size": 64,
              "use_mamba_kernels": False},
    # a router bias kept as a buffer: a device_map key that is a tensor, not a module
    "deepseek_v3": {"model_type": "deepseek_v3", "hidden_size": 32, "intermediate_size": 48,
                    "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1,
                    "topk_group": 1, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16,
                    "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
                    "vocab_size": 64, "max_position_embeddings": 128},
}


def _model(cfg):
    torch.manual_seed(0)
    conf = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(conf).to(torch.float32).eval()
    with torch.no_grad():  # gpt-oss initialises some expert tensors to zero
        for n, p in model.named_parameters():
            if "experts" in n or "router" in n or "gate" in n:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("ndev", [2, 3])
def test_split_model_equals_unsplit(kind, ndev):
    cfg = CONFIGS[kind]
    model = _model(cfg)
    ref = copy.deepcopy(model)
    total = M.describe(cfg, "float32").bytes
    plan = P.plan(cfg, {i: total // ndev + total // 20 for i in range(ndev)}, "float32")
    assert plan.split_layers(), "the test needs experts split across devices"
    P.apply(model, plan, devices={i: "cpu" for i in range(ndev)})
    split = [m for m in model.modules() if isinstance(m, P._apply.SplitExperts)]
    experts_path = {p.layer: p.modules[0] for p in plan.parts if p.kind == "expert"}
    assert len(split) == len(experts_path) == len(plan.expert_devices)
    for layer, devs in plan.expert_devices.items():
        sizes = sorted(s.num_experts for s in model.get_submodule(experts_path[layer]).shards)
        assert sizes == sorted(devs.count(d) for d in set(devs))
    ids = torch.randint(0, cfg["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ref(ids).logits
        b = model(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    # and the shards really hold the planned experts' weights
    layer = plan.split_layers()[0]
    orig = ref.get_submodule(experts_path[layer]).gate_up_proj
    se = model.get_submodule(experts_path[layer])
    for g, shard in enumerate(se.shards):
        mine = (se.owner == g).nonzero().flatten()
        assert torch.equal(shard.gate_up_proj, orig[mine])


def test_apply_rejects_infeasible_and_unmapped():
    cfg = CONFIGS["mixtral"]
    model = _model(cfg)
    total = M.describe(cfg, "float32").bytes
    p = P.plan(cfg, {0: total, 1: total}, "float32")
    with pytest.raises(ValueError, match="no torch device"):
        P.apply(model, p, devices={0: "cpu"})
    bad = P.plan(cfg, {0: total // 4}, "float32", raise_on_infeasible=False)
    with pytest.raises(ValueError, match="not feasible"):
        P.apply(model, bad, devices={0: "cpu"})


@pytest.mark.parametrize("model_type", ["lfm2_moe", "minimax_m2"])
def test_device_map_keys_that_name_tensors_are_placed(model_type):
    """A MoE block holding a bias buffer beside its experts: the device_map names that
    buffer itself (its module also holds experts planned elsewhere)."""
    from arch_configs import small_config

    config = small_config(model_type)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    ref = copy.deepcopy(model)
    total = M.describe(config, "float32").bytes
    plan = P.plan(config, {0: total // 2 + total // 20, 1: total // 2 + total // 20}, "float32")
    modules = {n for n, _ in model.named_modules()}
    tensor_keys = [k for k in plan.to_device_map() if k not in modules]
    assert tensor_keys and all("bias" in k for k in tensor_keys)
    P.apply(model, plan, devices={0: "cpu", 1: "cpu"})
    ids = torch.randint(0, config.get_text_config().vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="neither a module nor a tensor"):
        P._apply._move_tensor(model, tensor_keys[0] + "_missing", torch.device("cpu"))
