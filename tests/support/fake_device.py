"""A stand-in accelerator on a CPU-only machine: tensors that say they live on
the `meta` device but hold real CPU values.

Inside `FakeDevice()`, factories asked for `device="meta"` and `.to("meta")`
produce such tensors; every op computes on the real values, so data-dependent
code (`.item()`, boolean indexing, collectives) runs as on a GPU, while an op
that mixes them with an ordinary CPU tensor raises, as CUDA does (a 0-dim CPU
tensor in a pointwise op is allowed, as on CUDA). The meta device is used
because autograd runs backward for it without a driver.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

DEVICE = torch.device("meta")


class DeviceMixError(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert type(elem) is torch.Tensor and elem.device.type == "cpu"
        out = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                  storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                  layout=elem.layout, device=DEVICE,
                                                  requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


_ALLOW_CPU_INDEX = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                    torch.ops.aten._index_put_impl_.default}


def _run(func, args, kwargs):
    on_device, plain = [], []

    def visit(x):
        if isinstance(x, OnDevice):
            on_device.append(x)
        elif isinstance(x, torch.Tensor):
            plain.append(x)
        return x

    tree_map(visit, (args, kwargs))
    device_kw = kwargs.get("device")
    to_device = device_kw is not None and torch.device(device_kw).type == DEVICE.type
    if func is torch.ops.aten._to_copy.default and on_device and device_kw is not None \
            and torch.device(device_kw).type == "cpu":
        with _disable_current_modes():
            return func(args[0].elem, *args[1:], **kwargs)  # .cpu(): the way back to the host
    if on_device and plain:
        pointwise = torch.Tag.pointwise in func.tags
        bad = [t for t in plain if not (t.dim() == 0 and pointwise)]
        if func in _ALLOW_CPU_INDEX:
            bad = [t for t in bad if t is args[0]]
        if bad:
            raise DeviceMixError(f"{func}: tensors on {DEVICE} and on cpu ({tuple(bad[0].shape)}) mixed")
    if to_device:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    unwrapped_args, unwrapped_kwargs = tree_map(lambda x: x.elem if isinstance(x, OnDevice) else x, (args, kwargs))
    with _disable_current_modes():  # the real computation, on the host values
        out = func(*unwrapped_args, **unwrapped_kwargs)
    if not (on_device or to_device):
        return out
    return tree_map(lambda x: OnDevice(x) if type(x) is torch.Tensor and x.device.type == "cpu" else x, out)


class FakeDevice(TorchDispatchMode):
    """The mode that makes `device=DEVICE` factories and copies real; `host_reads` counts the
    device-to-host reads (`.item()`, `.cpu()`, `bool(t)`...), each a synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, OnDevice) for t in types):
            if func in _HOST_READS and not (func is torch.ops.aten._to_copy.default
                                             and torch.device(kwargs.get("device") or DEVICE).type != "cpu"):
                self.host_reads += 1
            return NotImplemented
        if func.namespace == "c10d":
            plain = [t for t in _tensors((args, kwargs))]
            if plain:
                raise DeviceMixError(f"{func}: a collective on a host tensor ({tuple(plain[0].shape)}); "
                                     "NCCL takes device tensors only")
        device_kw = kwargs.get("device")
        if device_kw is not None and torch.device(device_kw).type == DEVICE.type:
            return _run(func, args, kwargs)
        return func(*args, **kwargs)


_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten._to_copy.default}


def _tensors(tree):
    found = []
    tree_map(lambda x: found.append(x) if isinstance(x, torch.Tensor) else x, tree)
    return found
