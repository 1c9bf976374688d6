"""A device other than the CPU, with real data: the test double for "every tensor is made where it
is used" on a machine without a GPU.

Inside `on_device()`, tensors on the `meta` device (which PyTorch offers everywhere) carry real
CPU data: `x.to("meta")`, `torch.zeros(..., device="meta")`, `torch.tensor(..., device=x.device)`
and every op on such tensors compute on the CPU and hand back "meta" tensors, so code that asks
for `x.device` gets "meta" and data-dependent code (`int(argmax)`, `float(trace)`) still runs.
What CUDA refuses, this refuses too, by raising DeviceMismatch: an op that meets a tensor on the
device and a CPU tensor that is not a 0-dim scalar (a CPU projection times device features, a
CPU identity added to a device covariance, a CPU tensor indexed with device indices). It is
stricter than CUDA in one way, on purpose: a device tensor indexed with CPU indices is refused
too (CUDA copies such indices to the device on every call; the code makes them on the device).
Copies between the CPU and the device (`.to`, `.cpu()`, `copy_`) are allowed, as on CUDA.

A plain meta tensor (no data: made by a path this double does not cover) raises too, so a test
never passes on tensors that hold nothing.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("meta")
_COPIES = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}


class DeviceMismatch(RuntimeError):
    """A CPU tensor met a tensor on the device in one op (CUDA raises there)."""


class OnDevice(torch.Tensor):
    """A tensor that says it is on DEVICE and holds its data on the CPU (`elem`)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> "OnDevice":
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)
        r.elem = elem.detach() if elem.requires_grad else elem
        return r

    def __repr__(self) -> str:  # noqa: D105
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an OnDevice tensor outside on_device()")


def _on_device(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves = pytree.tree_leaves((args, kwargs))
        tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
        wrapped = [a for a in tensors if isinstance(a, OnDevice)]
        empty = [a for a in tensors if not isinstance(a, OnDevice) and a.device.type == DEVICE.type]
        if empty:
            raise RuntimeError(f"{func}: a meta tensor without data (made outside the double)")
        target = bool(wrapped)
        if "device" in kwargs and kwargs["device"] is not None:
            target = _on_device(kwargs["device"])
            if target:
                kwargs["device"] = torch.device("cpu")
        if wrapped and func not in _COPIES:
            cpu = [a for a in tensors if not isinstance(a, OnDevice) and a.dim() > 0]
            if cpu:
                raise DeviceMismatch(f"{func}: a CPU tensor of shape {tuple(cpu[0].shape)} meets tensors on "
                                     f"{DEVICE.type} (CUDA refuses this)")
        back = {id(a.elem): a for a in wrapped}
        args, kwargs = pytree.tree_map(lambda a: a.elem if isinstance(a, OnDevice) else a, (args, kwargs))
        out = func(*args, **kwargs)

        def wrap(t):
            if not isinstance(t, torch.Tensor) or isinstance(t, OnDevice):
                return t
            if id(t) in back:  # in-place and out= ops return their own argument
                return back[id(t)]
            return OnDevice(t) if target else t

        return pytree.tree_map(wrap, out)


class _Factories(TorchFunctionMode):
    """torch.tensor / torch.as_tensor with device=DEVICE copy to the device inside C++, below the
    dispatch mode; route them through a CPU tensor and `.to`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _on_device(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(DEVICE)
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_device() -> Iterator[torch.device]:
    """The double, for the duration of the block; yields the device to pass as `device`."""
    with _Factories(), _Dispatch():
        yield DEVICE


def host(x):
    """`x` (a tensor, or tensors in dicts/lists/tuples) as plain CPU tensors, checking that every
    tensor in it was on the device."""
    def one(t):
        if isinstance(t, torch.Tensor):
            assert isinstance(t, OnDevice), f"expected a tensor on {DEVICE.type}, got one on {t.device}"
            return t.elem.clone()
        return t
    return pytree.tree_map(one, x)
