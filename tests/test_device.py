"""Device selection (auto | cpu | cuda | cuda:N) and moving storage-dtype batches to a device.

CUDA's presence is simulated with monkeypatch on CPU machines; the real CUDA path runs only
where a GPU is present."""

import pytest
import torch

from activation_cache import ConfigError, UserError
from trainer import resolve_device, to_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cpu_and_auto_without_cuda(no_cuda):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" AUTO ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_asked_for_without_cuda_is_a_one_line_config_error(no_cuda, spec):
    with pytest.raises(ConfigError) as info:
        resolve_device(spec, field="SAEConfig.device")
    msg = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in msg
    assert msg.startswith(f"SAEConfig.device: {spec!r} but CUDA is not available")
    assert "use 'cpu' or 'auto'" in msg


def test_no_cuda_message_says_when_the_process_was_given_no_gpu(no_cuda, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES is empty: no GPU was assigned"):
        resolve_device("cuda")


def test_cuda_specs_with_gpus(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)


def test_cuda_index_out_of_range(two_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ConfigError) as info:
        resolve_device("cuda:2", field="SAEConfig.device")
    msg = str(info.value)
    assert "\n" not in msg
    assert "sees 2 CUDA device(s) (cuda:0..cuda:1; CUDA_VISIBLE_DEVICES=4,5)" in msg


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cpu:0", "auto:1", "mps", "", 3, None])
def test_not_a_device(spec):
    with pytest.raises(ConfigError, match="is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device(spec)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
def test_to_device_on_cpu_converts_without_pinning(stored, monkeypatch):
    def no_pinning(*args, **kwargs):
        raise AssertionError("pinned memory needs CUDA")

    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
    batch = torch.randn(64, 8).to(stored)
    out = to_device(batch, torch.device("cpu"))
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out, batch.float())
    kept = to_device(batch, "cpu", dtype=None)
    assert kept.dtype == stored and torch.equal(kept, batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_pinned_batch_on_cuda():
    batch = torch.randn(256, 16).half().pin_memory()
    out = to_device(batch, resolve_device("cuda"))
    assert out.is_cuda and out.dtype == torch.float32
    assert torch.equal(out.cpu(), batch.float())
