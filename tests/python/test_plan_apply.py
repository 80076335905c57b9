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
    assert len(split) == cfg["num_hidden_layers"]
    for layer, devs in plan.expert_devices.items():
        sizes = sorted(s.num_experts for s in model.get_submodule(f"model.layers.{layer}.mlp.experts").shards)
        assert sizes == sorted(devs.count(d) for d in set(devs))
    ids = torch.randint(0, cfg["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ref(ids).logits
        b = model(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    # and the shards really hold the planned experts' weights
    layer = plan.split_layers()[0]
    orig = ref.get_submodule(f"model.layers.{layer}.mlp.experts").gate_up_proj
    se = model.get_submodule(f"model.layers.{layer}.mlp.experts")
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
