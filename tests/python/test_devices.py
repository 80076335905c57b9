"""memwarden._devices: the one parser of device names."""
import pytest
import torch

from memwarden._devices import device_key, device_order, is_accelerator, torch_device


@pytest.mark.parametrize("value,key", [
    (0, 0), (3, 3), ("1", 1), (" 2 ", 2), ("cuda:1", 1), ("CUDA:1", 1), ("cuda : 4", 4),
    (torch.device("cuda", 1), 1), ("cpu", "cpu"), (" CPU ", "cpu"), ("mps", "mps"), ("disk", "disk"),
    ("Disk", "disk"), (torch.device("cpu"), "cpu"), (torch.device("mps"), "mps")])
def test_device_key(value, key):
    assert device_key(value) == key
    assert type(device_key(value)) is type(key)


def test_bare_cuda_is_the_current_device_without_initialising_cuda():
    if not torch.cuda.is_initialized():
        assert device_key("cuda") == 0 and device_key(torch.device("cuda")) == 0
        assert not torch.cuda.is_initialized()
    else:  # pragma: no cover - another test brought CUDA up
        assert device_key("cuda") == torch.cuda.current_device()


@pytest.mark.parametrize("bad", [True, False, -1, "tpu", "cuda:", "cuda:x", "cuda:-1", "", None, 1.0,
                                 torch.device("meta"), ["cpu"]])
def test_device_key_rejects(bad):
    with pytest.raises(ValueError, match=r"max_memory key must be a GPU index .*'mps', 'cpu' or 'disk'; got"):
        device_key(bad, "max_memory key")


def test_device_key_names_the_value():
    with pytest.raises(ValueError, match=r"got 'tpu'"):
        device_key("tpu")
    with pytest.raises(ValueError, match=r"got -2 \(a GPU index must be >= 0\)"):
        device_key(-2)


def test_device_order_is_accelerates():
    keys = ["disk", "cpu", 2, "mps", 0, "cuda:1"]
    assert sorted(keys, key=device_order) == [0, "cuda:1", 2, "mps", "cpu", "disk"]


def test_is_accelerator():
    assert is_accelerator(0) and is_accelerator("cuda:3") and is_accelerator("mps")
    assert not is_accelerator("cpu") and not is_accelerator("disk")


def test_torch_device():
    assert torch_device(1) == torch.device("cuda", 1)
    assert torch_device("cuda:2") == torch.device("cuda", 2)
    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device(torch.device("mps")) == torch.device("mps")
    with pytest.raises(ValueError, match="target.*'disk' only names offloaded weights"):
        torch_device("disk", "target")
    with pytest.raises(ValueError, match="target"):
        torch_device("tpu", "target")
