"""AutomaticOffloader on a tiny random Llama: identical outputs while layers are offloaded,
hysteresis, the memwarden pool really shrinking, failed moves leaving the model intact."""
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import memwarden.alloc as ma
from memwarden.controller import offload
from memwarden.controller.offload import AutomaticOffloader, find_decoder_layers

transformers = pytest.importorskip("transformers")

LAYERS = 4
CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2)
# One decoder layer, float32: q and o (64x64), k and v (64 x 2 heads x 16), gate, up and
# down (64x128 each), two RMSNorm weights (64).
LAYER_BYTES = 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64)
BUDGET = 10 * LAYER_BYTES  # pressure 1.0; one layer is 0.1 of it


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


INPUT_IDS = torch.arange(3, 11).reshape(1, 8)


def logits(model):
    with torch.no_grad():
        return model(INPUT_IDS).logits


def offloaded_by_hooks(model):
    """The layers that carry the offloader's hooks, read from the model itself."""
    return tuple(i for i, layer in enumerate(model.model.layers) if layer._forward_pre_hooks)


@pytest.fixture(scope="module")
def shared_model():
    model = tiny_llama()
    return model, logits(model)


@pytest.fixture
def make():
    """AutomaticOffloader, closed after the test so the shared model is left as it was."""
    made = []

    def make_offloader(model, **kwargs):
        made.append(AutomaticOffloader(model, **{"device": "cpu", **kwargs}))
        return made[-1]

    yield make_offloader
    for offloader in made:
        assert offloader.close().error is None


def test_finds_decoder_layers_and_their_bytes(shared_model, make):
    model, _ = shared_model
    assert find_decoder_layers(model) is model.model.layers
    offloader = make(model, memory_limit=BUDGET)
    assert offloader.units == tuple(f"model.layers.{i}" for i in range(LAYERS))
    assert [offloader.unit_bytes(i) for i in range(LAYERS)] == [LAYER_BYTES] * LAYERS


def test_outputs_identical_with_each_number_of_offloaded_layers():
    model = tiny_llama()
    reference = logits(model)
    offloader = AutomaticOffloader(model, device="cpu", memory_limit=BUDGET)
    for count in range(1, LAYERS + 1):
        action = offloader.step(0.85)  # one layer (0.1) brings it under 0.8
        assert (action.kind, action.units, action.nbytes) == ("offload", (LAYERS - count,), LAYER_BYTES)
        assert offloaded_by_hooks(model) == tuple(range(LAYERS - count, LAYERS))
        assert torch.equal(logits(model), reference)
    assert offloader.step(0.85).kind == "none"  # nothing left to offload
    generated = model.generate(INPUT_IDS, max_new_tokens=3, do_sample=False)  # with a KV cache too

    action = offloader.step(0.0)
    assert (action.kind, action.units) == ("restore", tuple(range(LAYERS)))
    assert offloaded_by_hooks(model) == ()
    assert torch.equal(logits(model), reference)
    assert torch.equal(model.generate(INPUT_IDS, max_new_tokens=3, do_sample=False), generated)
    stats = offloader.stats()
    assert (stats["offload_count"], stats["restore_count"], stats["failed_moves"]) == (LAYERS, LAYERS, 0)
    assert stats["bytes_moved"] == 2 * LAYERS * LAYER_BYTES
    assert stats["fetch_count"] > 0 and stats["gb_per_s"] > 0 and stats["offloaded_seconds"] > 0


def test_hysteresis_by_hand(shared_model, make):
    model, reference = shared_model
    offloader = make(model, memory_limit=BUDGET)
    kinds = []
    for pressure in (0.85, 0.7, 0.79, 0.61, 0.55, 0.7, 0.6):
        action = offloader.step(pressure)
        kinds.append(action.kind)
        if action.kind != "none":
            assert action.nbytes == LAYER_BYTES
    assert kinds == ["offload", "none", "none", "none", "restore", "none", "none"]
    action = offloader.step(0.95)  # two layers' worth: 0.95 - 0.2 < 0.8
    assert (action.units, action.nbytes) == ((3, 2), 2 * LAYER_BYTES)
    assert action.estimated_pressure == pytest.approx(0.75)
    assert offloader.step(0.65).kind == "none"  # in the band
    action = offloader.step(0.59)  # restores land at 0.69 and 0.79, both under 0.8
    assert action.units == (2, 3)
    assert offloader.step(0.75).kind == "none"  # an unchanged load does not offload them again
    assert torch.equal(logits(model), reference)


def test_one_unit_per_step_without_a_budget(shared_model, make):
    model, _ = shared_model
    offloader = make(model)  # no memory_limit, no allocator limit
    assert offloader.step(3.0).units == (3,)
    assert offloader.step(3.0).units == (2,)
    assert offloader.step(0.0).units == (2,)
    assert offloader.restore_all().units == (3,)


def test_offloading_lowers_the_pool_memwarden_accounts():
    with ma.use("cpu", memory_limit="16 MiB"):
        model = tiny_llama()
        reference = logits(model)
        offloader = AutomaticOffloader(model, device="cpu", memory_limit=BUDGET)
        assert offloader.current_pressure() == ma.memory_allocated("cpu") / ma.get_memory_limit("cpu")
        before = ma.memory_allocated("cpu")
        action = offloader.step(0.95)
        dropped = before - ma.memory_allocated("cpu")
        tensors = sum(1 for layer in model.model.layers[2:] for _ in layer.parameters())
        assert action.nbytes == 2 * LAYER_BYTES
        assert action.nbytes <= dropped < action.nbytes + 512 * tensors  # the pool rounds blocks up
        assert torch.equal(logits(model), reference)  # fetched back into the pool for the forward
        assert offloader.step(0.0).units == (2, 3)
        assert torch.equal(logits(model), reference)


def test_default_pressure_needs_a_limit(shared_model, make):
    model, _ = shared_model
    with pytest.raises(RuntimeError, match="no memory limit"):
        make(model).step()


def test_failed_offload_copy_leaves_the_layer_in_place(shared_model, make, monkeypatch):
    model, reference = shared_model
    offloader = make(model, memory_limit=BUDGET)
    before = [p.data_ptr() for p in model.parameters()]
    real_copy, calls = offload._copy_in, []

    def copy_then_fail(destination, tensor):
        calls.append(tensor)
        if len(calls) == 3:  # mid-layer: two tensors were already copied into the host buffer
            raise MemoryError("host memory short")
        real_copy(destination, tensor)

    monkeypatch.setattr(offload, "_copy_in", copy_then_fail)
    action = offloader.step(0.95)
    assert (action.kind, action.moves) == ("offload", ())
    assert "MemoryError: host memory short" in action.error
    assert [p.data_ptr() for p in model.parameters()] == before
    assert offloaded_by_hooks(model) == () and offloader.stats()["failed_moves"] == 1
    assert torch.equal(logits(model), reference)


def test_failed_restore_keeps_the_layer_offloaded(shared_model, make, monkeypatch):
    model, reference = shared_model
    offloader = make(model, memory_limit=BUDGET)
    offloader.step(0.85)
    with monkeypatch.context() as patch:
        patch.setattr(offload, "_device_copy", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("copy")))
        action = offloader.step(0.0)
    assert (action.kind, action.moves, action.error) == ("restore", (), "restoring model.layers.3: RuntimeError: copy")
    assert offloaded_by_hooks(model) == (3,)
    assert torch.equal(logits(model), reference)
    assert offloader.restore_all().units == (3,)


def test_step_waits_for_a_forward_in_another_thread(shared_model, make):
    model, reference = shared_model
    offloader = make(model, memory_limit=BUDGET)
    outputs, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            outputs.append(logits(model))

    server = threading.Thread(target=serve)
    server.start()
    try:
        for pressure in [0.95, 1.3, 0.0, 0.85] * 5:
            assert offloader.step(pressure).error is None
    finally:
        stop.set()
        server.join()
    assert outputs and all(torch.equal(out, reference) for out in outputs)


def test_step_inside_a_forward_moves_nothing(shared_model, make):
    model, reference = shared_model
    offloader = make(model, memory_limit=BUDGET)
    actions = []
    with model.model.layers[1].register_forward_hook(lambda *_: actions.append(offloader.step(0.95))):
        assert torch.equal(logits(model), reference)
    assert actions[0].moves == () and "during a forward" in actions[0].error
    assert offloader.offloaded == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: pinned copies and the prefetch stream")
def test_cuda_outputs_identical_with_prefetch():
    model = tiny_llama().cuda()
    with torch.no_grad():
        reference = model(INPUT_IDS.cuda()).logits
    offloader = AutomaticOffloader(model, device="cuda", memory_limit=BUDGET)
    assert offloader.pin_memory
    assert offloader.step(1.3).units == (3, 2, 1, 0)
    assert all(not p.is_cuda for p in model.model.layers.parameters())
    for _ in range(2):  # each layer's forward prefetches the next one on the side stream
        with torch.no_grad():
            assert torch.equal(model(INPUT_IDS.cuda()).logits, reference)
    assert offloader.close().units == (0, 1, 2, 3)
    assert all(p.is_cuda for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(offload_threshold=1.0), "offload_threshold must be a number in"),
    (dict(restore_threshold=0.9), "restore_threshold"),
    (dict(device="disk"), "device must be"),
    (dict(offload_device=0), "offload_device must be host memory"),
    (dict(units="experts"), "units must be"),
    (dict(units=[torch.nn.Linear(1, 1)]), r"units\[0\] is not a submodule"),
    (dict(memory_limit=0), "memory_limit must be"),
    (dict(pressure=0.5), "pressure must be a callable"),
])
def test_bad_arguments_name_themselves(shared_model, kwargs, message):
    model, _ = shared_model
    with pytest.raises(ValueError, match=message):
        AutomaticOffloader(model, **{"device": "cpu", **kwargs})


def test_refuses_units_sharing_a_tensor_with_the_rest(shared_model, make):
    model, _ = shared_model
    layer = model.model.layers[0]
    model.model.norm.weight, saved = layer.input_layernorm.weight, model.model.norm.weight
    try:
        with pytest.raises(ValueError, match="share a tensor with model.norm"):
            AutomaticOffloader(model, device="cpu")
    finally:
        model.model.norm.weight = saved


PRESSURES = st.sampled_from([0.0, 0.3, 0.55, 0.59, 0.6, 0.7, 0.79, 0.8, 0.85, 0.95, 1.3])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pressures=st.lists(PRESSURES, max_size=12), budget=st.sampled_from([None, BUDGET, 3 * LAYER_BYTES]))
def test_random_pressures_keep_a_suffix_offloaded(shared_model, pressures, budget):
    model, reference = shared_model
    offloader = AutomaticOffloader(model, device="cpu", memory_limit=budget)  # a fixture would outlive the example
    try:
        offloaded = 0
        for pressure in pressures:
            action = offloader.step(pressure)
            moved = len(action.units)
            if action.kind == "offload":  # the last resident layers, backwards
                last_resident = LAYERS - 1 - offloaded
                assert pressure >= 0.8 and action.units == tuple(range(last_resident, last_resident - moved, -1))
                offloaded += moved
            elif action.kind == "restore":  # the first offloaded layers, forwards
                first_offloaded = LAYERS - offloaded
                assert pressure < 0.6 and action.units == tuple(range(first_offloaded, first_offloaded + moved))
                offloaded -= moved
            else:
                assert moved == 0
            assert offloader.offloaded == offloaded_by_hooks(model) == tuple(range(LAYERS - offloaded, LAYERS))
            stats = offloader.stats()
            assert stats["offload_count"] - stats["restore_count"] == offloaded == stats["offloaded_units"]
            assert stats["bytes_moved"] == (stats["offload_count"] + stats["restore_count"]) * LAYER_BYTES
        assert torch.equal(logits(model), reference)
    finally:
        closed = offloader.close()
    assert len(closed.units) == offloaded
    assert offloaded_by_hooks(model) == () and not model._forward_pre_hooks
