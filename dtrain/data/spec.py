"""Feature specs: what to read from each Example, and how it comes out.

    spec = {"image": FixedLen((3072,), "uint8"),     # one bytes value -> uint8 tensor [3072]
            "label": FixedLen((), "int64"),           # int64_list of 1 -> tensor [] (batched: [B])
            "weights": FixedLen((16,), "float32", default=0.0),
            "tokens": VarLen("int64"),                # 1-D; batched: padded [B, L] + lengths [B]
            "name": FixedLen((), "bytes")}            # Python bytes; batched: a list

dtype maps to the Example's list: float32 <- float_list, int64 <- int64_list,
uint8 and bytes <- bytes_list ("uint8" takes the bytes themselves as a tensor).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from dtrain.errors import ConfigError

DTYPES = ("float32", "int64", "uint8", "bytes")
TORCH = {"float32": torch.float32, "int64": torch.int64, "uint8": torch.uint8}


def _check_dtype(dtype: str, what: str) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if dtype not in DTYPES:
        raise ConfigError(f"{what}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


@dataclass(frozen=True)
class FixedLen:
    """A feature with the same number of values in every record, read as `shape`."""
    shape: Tuple[int, ...]
    dtype: str
    default: Any = None

    def __init__(self, shape: Sequence[int] = (), dtype: str = "float32", default: Any = None):
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(shape)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ConfigError(f"FixedLen shape {shape!r} must be a tuple of non-negative ints")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", _check_dtype(dtype, "FixedLen"))
        object.__setattr__(self, "default", default)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class VarLen:
    """A feature whose value count varies per record: 1-D unbatched; batched, padded with
    zeros to the longest row, plus a `<name>_lengths` tensor (or a list of lists for bytes)."""
    dtype: str = "float32"

    def __init__(self, dtype: str = "float32"):
        object.__setattr__(self, "dtype", _check_dtype(dtype, "VarLen"))


def _default_blob(name: str, f: FixedLen) -> Tuple[Optional[bytes], list]:
    """The default as the C++ parser stores it: raw values (numel of them) and, for bytes, lengths."""
    if f.default is None:
        return None, []
    n = f.numel
    d = f.default
    if f.dtype == "bytes":
        vals = [d] * n if isinstance(d, (bytes, bytearray)) else list(d)
        if len(vals) != n or not all(isinstance(v, (bytes, bytearray)) for v in vals):
            raise ConfigError(f"feature {name!r}: default for FixedLen{f.shape} 'bytes' must be one bytes value "
                              f"or {n} of them, got {d!r}")
        return b"".join(vals), [len(v) for v in vals]
    t = torch.as_tensor(d, dtype=TORCH[f.dtype])
    if t.numel() == 1 and n != 1:
        t = t.reshape(()).expand(f.shape)
    if t.numel() != n:
        raise ConfigError(f"feature {name!r}: default has {t.numel()} values but FixedLen{f.shape} needs {n} "
                          "(or give one value to fill it)")
    return t.contiguous().reshape(-1).numpy().tobytes(), []


def to_schema(spec: Dict[str, Any], sequence: bool = False):
    """The C++ schema for a spec dict (ConfigError naming a bad entry)."""
    from dtrain import _C
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"spec must be a non-empty dict of feature name -> FixedLen/VarLen, got {spec!r}")
    rows = []
    for name, f in spec.items():
        if not isinstance(name, str):
            raise ConfigError(f"spec keys are feature names (str), got {name!r}")
        if isinstance(f, VarLen):
            rows.append((name, True, f.dtype, [], None, []))
        elif isinstance(f, FixedLen):
            blob, lens = _default_blob(name, f)
            rows.append((name, False, f.dtype, list(f.shape), blob, lens))
        else:
            raise ConfigError(f"spec[{name!r}] must be FixedLen(...) or VarLen(...), got {f!r}")
    return _C.data.Schema(rows, sequence)


def encode_example(features: Dict[str, Any]) -> bytes:
    """A tf.train.Example from a dict: ints -> int64_list, floats -> float_list, bytes/str ->
    bytes_list; lists, tuples and tensors/arrays of those likewise (a uint8 tensor is one
    bytes value)."""
    from dtrain import _C
    rows = []  # each row holds its buffer, which keeps it alive through the call
    for name, v in features.items():
        if not isinstance(name, str):
            raise ConfigError(f"Example feature names are str, got {name!r}")
        rows.append((name, *_feature(name, v)))
    return _C.data.encode_example(rows)


def _feature(name: str, v: Any):
    if isinstance(v, (bytes, bytearray, memoryview, str)):
        v = [v]
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu()
        if t.dtype == torch.uint8:
            b = t.contiguous().numpy().tobytes()
            return 1, b, 1, [len(b)]
        if t.is_floating_point():
            b = t.to(torch.float32).contiguous().reshape(-1).numpy().tobytes()
            return 2, b, t.numel(), None
        if t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.bool):
            b = t.to(torch.int64).contiguous().reshape(-1).numpy().tobytes()
            return 3, b, t.numel(), None
        raise ConfigError(f"feature {name!r}: tensors of {t.dtype} have no Example list type")
    if type(v).__module__ == "numpy":
        return _feature(name, torch.from_numpy(__import__("numpy").ascontiguousarray(v)))
    if isinstance(v, (int, float)):  # bool is an int
        v = [v]
    vals = list(v)
    if not vals:
        return 0, b"", 0, None  # an empty Feature: reads as no values of any dtype
    if all(isinstance(x, (bytes, bytearray, memoryview, str)) for x in vals):
        bs = [x.encode() if isinstance(x, str) else bytes(x) for x in vals]
        return 1, b"".join(bs), len(bs), [len(b) for b in bs]
    if all(isinstance(x, (int, bool)) for x in vals):
        return 3, struct.pack(f"<{len(vals)}q", *vals), len(vals), None
    if all(isinstance(x, (int, float)) for x in vals):
        return 2, struct.pack(f"<{len(vals)}f", *vals), len(vals), None
    raise ConfigError(f"feature {name!r}: {v!r} mixes types; an Example list holds only ints, floats or bytes")
