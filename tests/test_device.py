"""Tests for device.py: --device / --dtype resolution and the precision policy.

CUDA and MPS availability are monkeypatched; nothing runs on a device other than the CPU.
"""

import pytest
import torch

from tanggpt import device
from tanggpt.device import DeviceError, Runtime, compile_pays, default_dtype, pick_device, setup_runtime


@pytest.fixture
def no_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_pick_cpu():
    """--device cpu gives the CPU."""
    assert pick_device("cpu") == torch.device("cpu")


def test_auto_falls_back_to_cpu(no_accelerators):
    """auto gives the CPU when neither CUDA nor MPS is available."""
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device() == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    """auto picks CUDA first, then MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type == "mps"


@pytest.mark.parametrize("name", ["gpu0", "tpu", "cuda:x", "", "meta"])
def test_invalid_device_name_raises_one_line_error(name):
    """A bad --device is a DeviceError with a one-line message naming --device."""
    with pytest.raises(DeviceError) as info:
        pick_device(name)
    message = str(info.value)
    assert "--device" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps"])
def test_unavailable_accelerator_raises(no_accelerators, name):
    """Asking for CUDA or MPS where there is none is a DeviceError, not a later crash."""
    with pytest.raises(DeviceError, match="--device"):
        pick_device(name)


def test_float32_runtime_autocast_is_a_no_op(no_accelerators):
    """dtype float32 means no autocast: matmuls and Linear layers stay float32."""
    rt = setup_runtime(dtype="float32")
    assert rt.device == torch.device("cpu")
    assert rt.dtype == torch.float32
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    a, b = torch.randn(3, 8), torch.randn(8, 5)
    with rt.autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.float32
        assert layer(a).dtype == torch.float32


def test_bfloat16_runtime_autocasts_linear():
    """setup_runtime('cpu', 'bfloat16') autocasts a Linear's output to bfloat16."""
    rt = setup_runtime("cpu", "bfloat16")
    assert rt.dtype == torch.bfloat16
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with rt.autocast():
        assert torch.is_autocast_enabled("cpu")
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32  # parameters stay fp32
    assert layer(x).dtype == torch.float32  # and autocast ends with the block


@pytest.mark.parametrize("name", ["half", "int8", "bfloat"])
def test_invalid_dtype_raises(name):
    """An unknown --dtype is a one-line DeviceError naming --dtype."""
    with pytest.raises(DeviceError) as info:
        setup_runtime("cpu", name)
    assert "--dtype" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_default_dtype_follows_native_bf16(monkeypatch, native, expected):
    """On the CPU, bf16 autocast is the default only with native bf16 instructions."""
    monkeypatch.setattr(device, "_cpu_has_native_bf16", lambda: native)
    assert default_dtype(torch.device("cpu")) == expected
    assert setup_runtime("cpu", "auto").dtype == expected


def test_mps_default_dtype_is_float32(monkeypatch):
    """MPS stays in fp32 whatever the CPU supports."""
    monkeypatch.setattr(device, "_cpu_has_native_bf16", lambda: True)
    assert default_dtype(torch.device("mps")) == torch.float32


@pytest.mark.parametrize("capability, expected", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                                  ((7, 5), torch.float16), ((6, 0), torch.float16)])
def test_cuda_default_dtype_is_bf16_from_ampere_on_else_fp16(monkeypatch, capability, expected):
    """On CUDA, bf16 autocast where the tensor cores compute in bf16 (compute capability 8+),
    fp16 with loss scaling before that (a T4 is 7.5), even where torch calls bf16 "supported"
    because it can emulate it."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype(torch.device("cuda")) == expected


@pytest.mark.parametrize("name", ["float16", "fp16"])
def test_float16_runtime_autocasts_and_scales_the_loss(name):
    """--dtype float16: fp16 autocast, and the loop's gradient scaler is on; not in fp32 or bf16."""
    rt = setup_runtime("cpu", name)
    assert rt.dtype == torch.float16 and rt.scales_loss
    with rt.autocast():
        assert torch.nn.Linear(8, 4)(torch.randn(3, 8)).dtype == torch.float16
    assert not setup_runtime("cpu", "float32").scales_loss
    assert not setup_runtime("cpu", "bfloat16").scales_loss


def test_describe_names_device_and_precision():
    """describe() says which device and which precision, for the startup log line."""
    assert setup_runtime("cpu", "float32").describe() == "cpu, fp32"
    assert setup_runtime("cpu", "bf16").describe() == "cpu, bf16 autocast"
    assert setup_runtime("cpu", "fp16").describe() == "cpu, fp16 autocast with loss scaling"


def test_compiling_is_the_default_only_where_it_was_measured_faster():
    cpu = torch.device("cpu")
    assert not compile_pays(Runtime(cpu, torch.float32))  # slower on a CPU in fp32 (docs/speed.md)
    assert compile_pays(Runtime(cpu, torch.bfloat16))
    assert compile_pays(Runtime(torch.device("cuda"), torch.float32))
    assert not compile_pays(Runtime(torch.device("mps"), torch.float32))
