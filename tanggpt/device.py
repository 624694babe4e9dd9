"""Where the model runs and in what precision: the one place that decides.

`--device auto` picks CUDA, then Apple's MPS, then the CPU. The precision policy:

- CUDA: bf16 autocast where the GPU computes in bf16 (Ampere and newer). Older GPUs (a T4,
  what free notebook services lend) compute in fp16 instead: fp16 autocast with a gradient
  scaler. fp16 has 5 exponent bits to bf16's 8, so small gradients would round to zero;
  the scaler multiplies the loss by a large factor before backward and divides the
  gradients by it before the update, skipping a step whose gradients overflowed
  (training.py). bf16 has fp32's range and needs no scaling.
- CPU: bf16 autocast where the CPU has native bf16 instructions (AVX512-BF16 or AMX).
  Measured on a 2-core AMD EPYC with AVX512-BF16, training the reference 4-layer,
  256-wide model: fp32 3,200 tokens/s, bf16 autocast 4,800 tokens/s (1.5x). Without
  native support bf16 is emulated and slower than fp32, so those CPUs stay in fp32.
- MPS: fp32. Autocast support on MPS varies with the macOS and PyTorch version, and we
  have not measured a gain there; fp32 always works.

`--dtype` overrides the policy: `--dtype float16` on a CPU takes the scaled fp16 path too
(slowly; the tests use it to check that path where no GPU is).

Parameters and optimizer state stay fp32 in every case; autocast runs matmuls in bf16 (or fp16).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from data.errors import UserError


class DeviceError(UserError):
    """An unusable --device; the message is one line."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: bf16 (or fp16) autocast when the policy says so, else nothing."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def scales_loss(self) -> bool:
        """Whether training needs a gradient scaler: fp16 autocast (see the module's docstring)."""
        return self.dtype == torch.float16

    def describe(self) -> str:
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16 autocast",
                     torch.float16: "fp16 autocast with loss scaling"}[self.dtype]
        name = self.device.type
        if self.device.type == "cuda":
            name = f"cuda ({torch.cuda.get_device_name(self.device)})"
        return f"{name}, {precision}"


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_device(name: str = "auto") -> torch.device:
    """auto -> cuda, then mps, then cpu; or exactly the device named (cpu, cuda, cuda:1, mps)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: not a device name (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine (try --device auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: MPS is not available on this machine (try --device auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {name}: unsupported device type (use auto, cpu, cuda or mps)")
    return device


def _cuda_has_native_bf16(device: torch.device) -> bool:
    # torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (a T4):
    # the tensor cores compute in bf16 from compute capability 8.0 (Ampere) on.
    return torch.cuda.get_device_capability(device)[0] >= 8


def default_dtype(device: torch.device) -> torch.dtype:
    """The precision policy above, as a function."""
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_has_native_bf16(device) else torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def compile_pays(runtime: Runtime) -> bool:
    """Whether torch.compile is the default: where it made training steps faster (CUDA; a CPU
    training in bf16). On a CPU in fp32 the step is already mostly large matmuls, and the
    compiled one was slower (docs/speed.md). Inductor does not target MPS."""
    return runtime.device.type == "cuda" or (runtime.device.type == "cpu" and runtime.dtype == torch.bfloat16)


def setup_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Resolve --device and --dtype (auto, float32, bfloat16 or float16) into a Runtime."""
    dev = pick_device(device)
    if dtype == "auto":
        return Runtime(dev, default_dtype(dev))
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if dtype not in choices:
        raise DeviceError(f"--dtype {dtype}: use auto, float32, bfloat16 or float16")
    return Runtime(dev, choices[dtype])


def release_freed_memory() -> None:
    """Hand memory Python has freed back to the operating system (Linux/glibc only).

    Parsing 25 MB of JSON makes many small objects; once they are freed, glibc keeps the
    pages for reuse and the process stays ~100 MB larger than it needs to be for the
    rest of training. malloc_trim returns them. Elsewhere this does nothing.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
