"""Every causal-LM architecture of the installed transformers: memwarden's parts of the
model built from a small config hold exactly transformers' parameters, under names that
exist, and an architecture that cannot be built is an error naming it, never a guess."""
import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from arch_configs import UNBUILDABLE, causal_lm_types, small_config  # noqa: E402
from memwarden import models as M  # noqa: E402

# Architectures memwarden cannot split into decoder layers (docs/plan.md lists them).
UNDESCRIBABLE = {
    "blt": "byte latent transformer: three layer stacks (local encoder, global transformer, local "
           "decoder) and no num_hidden_layers",
}
TYPES = causal_lm_types()


def _reference(config):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def test_the_survey_covers_the_pinned_transformers():
    assert len(TYPES) >= 170
    assert set(UNBUILDABLE) | set(UNDESCRIBABLE) <= set(TYPES)


@pytest.mark.parametrize("model_type", [t for t in TYPES if t not in UNBUILDABLE and t not in UNDESCRIBABLE])
def test_parts_hold_exactly_the_transformers_parameters(model_type):
    config = small_config(model_type)
    model = _reference(config)
    desc = M.describe(config)
    assert desc.params == sum(p.numel() for p in model.parameters())
    tensors = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    modules = {n for n, _ in model.named_modules()}
    named = [t.name.split("[")[0] for p in desc.parts for t in p.tensors]
    assert set(named) == tensors            # every parameter and buffer, once (experts: sliced)
    keys = set()
    for part in desc.parts:
        for key in part.modules:
            assert key in modules or key in tensors, (part.name, key)
            keys.add(key)
    params = [n for n, _ in model.named_parameters()]
    assert all(any(n == k or n.startswith(k + ".") for k in keys) for n in params)
    assert [p.layer for p in desc.parts] == sorted(p.layer for p in desc.parts)


@pytest.mark.parametrize("model_type", sorted(UNBUILDABLE) + sorted(UNDESCRIBABLE))
def test_what_cannot_be_built_is_an_error_naming_it(model_type):
    with pytest.raises(ValueError, match=repr(model_type)):
        M.describe(small_config(model_type))
