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


# ---- flat buffers: WeightSlots -----------------------------------------------------------

class MixedBlock(torch.nn.Module):
    """What one flat buffer must keep apart: dtypes of 1, 2, 4 and 8 bytes, a transposed
    weight, a strided view with gaps, a 0-dim and an empty buffer, and a tied pair."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.first = torch.nn.Linear(6, 6, bias=False)
        self.second = torch.nn.Linear(6, 6, bias=False)
        self.second.weight = self.first.weight
        self.turned = torch.nn.Parameter(torch.randn(6, 6).t())  # stride (1, 6)
        self.every_other = torch.nn.Parameter(torch.randn(6, 12)[:, ::2])  # stride (12, 2): gaps
        self.register_buffer("half_scale", torch.randn(6).half())
        self.register_buffer("mask", torch.rand(6) > 0.3)
        self.register_buffer("shift", torch.randint(-3, 4, (6,)))
        self.register_buffer("count", torch.tensor(7, dtype=torch.int16))
        self.register_buffer("nothing", torch.empty(0, 3))
        # not used by forward: bits a value comparison would let through (-0.0 == 0.0, NaN != NaN)
        self.register_buffer("odd_bits", torch.tensor([-0.0, float("nan"), float("inf")], dtype=torch.bfloat16))

    def forward(self, x):
        x = self.second(self.first(x)) @ self.turned @ self.every_other
        x = x * self.half_scale.float() + self.shift
        return torch.where(self.mask, x, -x) + self.count + self.nothing.sum()


class MixedStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(MixedBlock(seed) for seed in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def bits(tensor):
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def named_tensors(module):
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def snapshot(module):
    """An independent reference: each tensor cloned, with its strides and Parameter object."""
    return {name: (tensor, tensor.detach().clone(), tensor.stride()) for name, tensor in named_tensors(module)}


def assert_as_before(module, before):
    now = dict(named_tensors(module))
    assert now.keys() == before.keys()
    for name, (original, clone, stride) in before.items():
        tensor = now[name]
        if isinstance(original, torch.nn.Parameter):
            assert tensor is original, name  # the same Parameter object: optimizers and ties see it
        assert (tensor.dtype, tensor.shape, tensor.stride()) == (clone.dtype, clone.shape, stride), name
        assert torch.equal(bits(tensor), bits(clone)), name


def storages(module):
    return {tensor.untyped_storage().data_ptr() for _, tensor in named_tensors(module)}


@pytest.mark.parametrize("outside_pool", [True, False])
def test_weight_slots_park_and_restore_bit_identical(outside_pool):
    block = MixedBlock(0)
    before = snapshot(block)
    weights = offload.WeightSlots(block)
    distinct = {id(t): t for _, t in named_tensors(block)}.values()
    assert len(weights.slots) == len(before) - 1  # the tied pair is one slot
    assert weights.nbytes == sum(t.numel() * t.element_size() for t in distinct)

    weights.park(outside_pool=outside_pool)
    assert weights.parked and weights.host.dtype == torch.uint8
    assert storages(block) == {weights.host.untyped_storage().data_ptr()}  # one host buffer
    assert_as_before(block, before)
    assert block.second.weight is block.first.weight

    weights.restore(torch.device("cpu"))
    assert not weights.parked and weights.host is None
    (base,) = storages(block)  # one device buffer, every tensor at an aligned offset in it
    assert all((tensor.data_ptr() - base) % 64 == 0 for _, tensor in named_tensors(block))
    assert_as_before(block, before)
    assert block.second.weight is block.first.weight


def test_offloaded_mixed_units_answer_bit_identically_and_stay_tied(make):
    model = MixedStack()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    before = snapshot(model)
    offloader = make(model)
    for _ in range(3):
        assert offloader.step(1.0).error is None  # one block a step (no budget), the last first
    assert offloader.offloaded == (0, 1, 2)
    assert_as_before(model, before)  # the host buffers' views
    with torch.no_grad():
        assert torch.equal(bits(model(x)), bits(reference))  # each block fetched in one copy
    assert_as_before(model, before)  # back on the host buffers after the forward
    assert offloader.restore_all().units == (0, 1, 2)
    assert_as_before(model, before)
    assert all(block.second.weight is block.first.weight for block in model.blocks)
    with torch.no_grad():
        assert torch.equal(bits(model(x)), bits(reference))


def test_failed_host_buffer_leaves_the_mixed_unit_in_place(make, monkeypatch):
    model = MixedStack()
    before = snapshot(model)
    offloader = make(model)
    monkeypatch.setattr(offload, "_host_buffer", lambda *a, **kw: (_ for _ in ()).throw(MemoryError("no host")))
    action = offloader.step(1.0)
    assert (action.moves, action.error) == ((), "offloading blocks.2: MemoryError: no host")
    assert offloader.offloaded == () and not model.blocks[2]._forward_pre_hooks
    assert_as_before(model, before)


def test_parked_layers_are_adopted_without_a_copy_and_detach_leaves_them_parked(shared_model, make):
    model, reference = shared_model
    layers = list(model.model.layers)
    parked = [offload.WeightSlots(layer) for layer in layers[2:]]
    for weights in parked:
        weights.park(outside_pool=True)
    offloader = make(model, parked=parked)
    assert offloader.offloaded == (2, 3) and offloaded_by_hooks(model) == (2, 3)
    assert offloader.stats()["bytes_moved"] == 0  # adopted, not copied
    assert torch.equal(logits(model), reference)
    assert offloader.detach() == parked and offloaded_by_hooks(model) == ()
    assert all(weights.parked for weights in parked)
    for weights in parked:
        weights.restore(torch.device("cpu"))
    assert torch.equal(logits(model), reference)


def test_parked_must_be_the_last_units_own_parked_weights(shared_model):
    model, _ = shared_model
    layers = list(model.model.layers)
    unparked = offload.WeightSlots(layers[3])
    with pytest.raises(ValueError, match="parked: not the parked weights"):
        AutomaticOffloader(model, device="cpu", parked=[unparked])
    other = offload.WeightSlots(layers[2])
    other.park(outside_pool=True)
    try:
        with pytest.raises(ValueError, match="parked: not the parked weights of model.layers.3"):
            AutomaticOffloader(model, device="cpu", parked=[other])
        with pytest.raises(ValueError, match="parked: 5 parked units"):
            AutomaticOffloader(model, device="cpu", parked=[other] * 5)
    finally:
        other.restore(torch.device("cpu"))


def test_weight_slots_leave_out_excluded_modules(shared_model):
    model, _ = shared_model
    layers = list(model.model.layers)
    rest = offload.WeightSlots(model, exclude=layers)
    whole = offload.WeightSlots(model)
    assert rest.nbytes + sum(offload.WeightSlots(layer).nbytes for layer in layers) == whole.nbytes
    outside = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if ".layers." not in n]
    assert rest.nbytes == sum(t.nbytes for t in outside) > 0


def test_pieces_restored_together_share_one_allocation(shared_model):
    model, reference = shared_model
    pieces = [offload.WeightSlots(layer) for layer in model.model.layers]
    for piece in pieces:
        piece.park(outside_pool=True)
    offload.restore_together(pieces, torch.device("cpu"))
    storages = {slot.get().untyped_storage().data_ptr() for piece in pieces for slot in piece.slots}
    assert len(storages) == 1 and not any(piece.parked for piece in pieces)
    assert torch.equal(logits(model), reference)
