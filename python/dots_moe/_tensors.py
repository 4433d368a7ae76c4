"""Zero-copy hand-over of torch tensors and numpy arrays to the native layer.

A CPU, contiguous float32 or bfloat16 torch tensor (or a C-contiguous float32 numpy array)
is passed as the address and element count of its own memory: no copy. The caller keeps
the tensor alive for the native call. Anything else is refused with a ValueError or
TypeError that names the argument, its shape and its dtype.
"""

import numpy as np
import torch


def describe(t):
    """`shape (...), dtype ..., device ...` of a tensor or array, for error messages."""
    device = f", device {t.device}" if isinstance(t, torch.Tensor) else ""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}{device}"


def check_shape(t, name, shape):
    """Raises ValueError unless `t` has `shape` (None entries match any size)."""
    if len(t.shape) != len(shape) or any(w is not None and w != d for w, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {describe(t)}")


def raw(t):
    """`(address, elements)` of a contiguous CPU tensor's memory."""
    return (t.data_ptr(), t.numel())


def host_view(t, name, shape=None, dtypes=("f32", "bf16")):
    """`((address, elements), dtype_code)` of `t`'s memory, without a copy.

    `t` must be a CPU torch tensor or a numpy array, contiguous, of a dtype in `dtypes`
    ("f32", "bf16"), and of `shape` when given.
    """
    if isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            raise ValueError(f"{name}: dots_moe runs on the CPU; got a tensor with {describe(t)}")
        code = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(t.dtype)
        if code is None or code not in dtypes:
            allowed = " or ".join({"f32": "torch.float32", "bf16": "torch.bfloat16"}[d] for d in dtypes)
            raise TypeError(f"{name}: expected {allowed}, got {describe(t)}")
        if shape is not None:
            check_shape(t, name, shape)
        if not t.is_contiguous():
            raise ValueError(f"{name}: not contiguous ({describe(t)}, strides {t.stride()}); call .contiguous()")
        if t.is_neg():
            raise ValueError(f"{name}: a lazily negated view ({describe(t)}); call .resolve_neg()")
        return raw(t), code
    if isinstance(t, np.ndarray):
        if t.dtype != np.float32 or "f32" not in dtypes:
            raise TypeError(f"{name}: expected a float32 array, got {describe(t)}")
        if shape is not None:
            check_shape(t, name, shape)
        if not t.flags.c_contiguous:
            raise ValueError(f"{name}: not C-contiguous ({describe(t)}); use numpy.ascontiguousarray")
        return (t.ctypes.data, t.size), "f32"
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(t).__name__}")


def out_f32(shape):
    """A new float32 CPU tensor and its `(address, elements)` for the native code to fill."""
    out = torch.empty(shape, dtype=torch.float32)
    return out, raw(out)
