"""fp32 islands inside mixed precision: the math a score is made of.

On GPU, inference runs the backbone under fp16 autocast (training.autocast; bf16 on some CPUs).
The nearest-neighbour search and the map fusion must not run in half precision: a memory
distance is a small difference of large squared norms (|a|^2 - 2ab + |b|^2), which fp16's 10-bit
and bf16's 7-bit mantissas cannot hold, and the blur's convolution and the interpolations would
round the very map whose maximum is the score. Functions decorated with `float32_math` run with
autocast off and their half-precision tensor arguments in float32, whatever autocast the caller
has on, and with TF32 off (exact_fp32): on Ampere and later GPUs cuDNN convolutions (the blur)
run in TF32, a 10-bit mantissa, unless told not to.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, TypeVar

import torch

# Device types whose autocast state is switched off (each device type has its own).
AUTOCAST_DEVICES = ("cuda", "cpu")
_HALF = (torch.float16, torch.bfloat16)

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Autocast off for every device type where it is on; the caller's state returns on exit."""
    with contextlib.ExitStack() as stack:
        for device in AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 math that is fp32 on GPUs too: TF32 off for cuDNN convolutions (on by default) and
    CUDA matmuls, the caller's settings back on exit. No effect on CPU math. The legacy flags, as
    torch refuses reads of them once the newer fp32_precision settings were mixed in."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    if saved == (False, False):
        yield
        return
    cudnn.allow_tf32, matmul.allow_tf32 = False, False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def as_float32(obj: Any) -> Any:
    """fp16/bf16 tensors as float32, also inside dicts, lists and tuples; anything else as is
    (float64 stays float64: only precision that autocast took away is given back)."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype in _HALF else obj
    if isinstance(obj, dict):
        return {k: as_float32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields") and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
        return type(obj)(as_float32(v) for v in obj)
    return obj


def float32_math(fn: F) -> F:
    """Decorator: `fn` runs with autocast and TF32 off and its half-precision tensor arguments as
    float32. The undecorated function stays reachable as `fn.__wrapped__` (tests compare against it)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_autocast(), exact_fp32():
            return fn(*as_float32(args), **as_float32(kwargs))

    return wrapper  # type: ignore[return-value]


def non_finite(value: Any, name: str = "") -> list[str]:
    """The names of the parts of `value` (a tensor, a number, or dicts, lists and tuples of them,
    e.g. a state dict or a Calibration's asdict) that hold NaN or inf, as `name.key[i]`; empty when
    all is finite. One NaN in a head's input standardization, a bank or a threshold makes every
    map it touches NaN, so a fit checks what crosses each of its steps with this and refuses it."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex:
            bad = int((~torch.isfinite(value.detach())).sum())
            return [f"{name} ({bad} of {value.numel()} values)"] if bad else []
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [f"{name} ({value})"] if value != value or value in (float("inf"), float("-inf")) else []
    if isinstance(value, dict):
        return [b for k, v in value.items() for b in non_finite(v, f"{name}.{k}" if name else str(k))]
    if isinstance(value, (list, tuple)):
        return [b for i, v in enumerate(value) for b in non_finite(v, f"{name}[{i}]")]
    return []
