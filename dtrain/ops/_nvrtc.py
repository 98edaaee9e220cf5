"""The CUDA kernels compiled at run time, for a dtrain built without nvcc.

csrc/kernels/cuda/device.cuh is the one source of every kernel: nvcc builds it into the
extension when a toolkit is there at install time; otherwise, on a machine with a GPU and
CuPy, this module hands the same text (its quoted includes inlined) to NVRTC through a
CuPy RawModule, which caches the binary on disk (~/.cupy/kernel_cache) and in memory per
device. The functions here take the same arguments as the extension's *_cuda functions,
so callers pick one or the other (dtrain.ops._cuda.backend) and call it the same way.

Multi-tensor kernels run their *Rtc variants: the Launch blocks planned by the extension
(the same planner the nvcc launchers use) are copied to the device, and the kernel gets
a pointer, so NVRTC launches pass only pointers and scalars.

    python -m dtrain.ops._nvrtc      # compiles the kernels to PTX with libnvrtc (no GPU needed)
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import re
import struct
import sys
from typing import Dict, List, Optional, Sequence

from dtrain.errors import ConfigError

_NS = "dtrain::kernels::cuda::"
_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
_DECAY = {"none": "kNone", "l2": "kL2", "decoupled": "kDecoupled"}
_MOMENTUM = {"none": "kNone", "first": "kFirst", "later": "kLater"}
_modules: Dict[int, object] = {}


def _csrc() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.join(here, "..", "_csrc"), os.path.join(here, "..", "..", "csrc")):
        if os.path.exists(os.path.join(root, "kernels", "cuda", "device.cuh")):
            return os.path.normpath(root)
    raise ConfigError("dtrain's CUDA sources (csrc/kernels/cuda/device.cuh) are not beside this install; "
                      "install dtrain from its source tree (pip install -e .) to compile kernels at run time")


def source() -> str:
    """device.cuh with its quoted includes inlined, once each (NVRTC gets one string)."""
    root, seen = _csrc(), set()

    def inline(rel: str) -> str:
        if rel in seen:
            return ""
        seen.add(rel)
        with open(os.path.join(root, rel)) as f:
            text = f.read()
        text = text.replace("#pragma once\n", "")
        return re.sub(r'^#include "([^"]+)"\s*$', lambda m: inline(m.group(1)), text, flags=re.M)

    return inline("kernels/cuda/device.cuh")


def name_expressions() -> List[str]:
    """Every kernel instantiation the launchers below can ask for."""
    names = []
    for t in _TYPES.values():
        for d in _DECAY.values():
            for a in ("false", "true"):
                names.append(f"{_NS}adamKernelRtc<{t}, dtrain::kernels::Decay::{d}, {a}>")
        for l2 in ("false", "true"):
            for m in _MOMENTUM.values():
                for n in ("false", "true"):
                    names.append(f"{_NS}sgdKernelRtc<{t}, {l2}, dtrain::kernels::Momentum::{m}, {n}>")
        for d in _TYPES.values():
            names.append(f"{_NS}convertKernelRtc<{t}, {d}>")
        names += [f"{_NS}normKernelRtc<{t}>", f"{_NS}geluFwdKernel<{t}>", f"{_NS}geluBwdKernel<{t}>",
                  f"{_NS}colSumKernel<{t}>", f"{_NS}lnFwdKernel<{t}>", f"{_NS}lnBwdKernel<{t}>",
                  f"{_NS}lnBwdColKernel<{t}>"]
    names.append(f"{_NS}normFinishKernel")
    return names


def include_dirs() -> List[str]:
    """Directories holding cuda_fp16.h (NVRTC has no headers of its own): DTRAIN_CUDA_INCLUDE,
    CUDA_HOME/CUDA_PATH, /usr/local/cuda, and the nvidia-* wheels torch's CUDA builds install."""
    cands = [os.environ.get("DTRAIN_CUDA_INCLUDE", "")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "include"))
    cands += sorted(glob.glob("/usr/local/cuda*/include"), reverse=True)
    for sp in sys.path:
        cands += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(cands) if d and os.path.exists(os.path.join(d, "cuda_fp16.h"))][:1]


def _options() -> tuple:
    return ("-std=c++17",) + tuple(f"-I{d}" for d in include_dirs())


def compile_ptx(arch: str = "compute_90", library: Optional[str] = None) -> Dict[str, str]:
    """Compiles the kernels with libnvrtc (no GPU, no CuPy needed) and returns each name
    expression's mangled name. Raises ConfigError with NVRTC's log when compilation fails."""
    lib = ctypes.CDLL(library or find_libnvrtc())
    prog = ctypes.c_void_p()
    src = source().encode()
    _nv(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"dtrain_device.cu", 0, None, None), prog)
    names = name_expressions()
    for n in names:
        _nv(lib, lib.nvrtcAddNameExpression(prog, n.encode()), prog)
    opts = [o.encode() for o in _options() + (f"-arch={arch}",)]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    _nv(lib, lib.nvrtcCompileProgram(prog, len(opts), arr), prog)
    lowered = {}
    for n in names:
        out = ctypes.c_char_p()
        _nv(lib, lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(out)), prog)
        lowered[n] = out.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return lowered


def _nv(lib, rc: int, prog) -> None:
    if rc == 0:
        return
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(max(size.value, 1))
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    raise ConfigError(f"NVRTC failed ({lib.nvrtcGetErrorString(rc).decode()}) compiling dtrain's CUDA kernels:\n"
                      f"{log.value.decode(errors='replace')[:4000]}")


def find_libnvrtc() -> str:
    """libnvrtc from the nvidia-cuda-nvrtc wheels (which torch's CUDA builds depend on) or a toolkit."""
    cands = []
    for sp in sys.path:
        cands += glob.glob(os.path.join(sp, "nvidia", "*", "lib", "libnvrtc.so*"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands += glob.glob(os.path.join(os.environ[var], "lib64", "libnvrtc.so*"))
    cands += glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*")
    cands = [c for c in cands if "builtins" not in c and "alt" not in os.path.basename(c)]
    if not cands:
        raise ConfigError("no libnvrtc found: pip install nvidia-cuda-nvrtc (or set CUDA_HOME to a CUDA toolkit)")
    return sorted(cands)[-1]


# ---- launching through CuPy -------------------------------------------------------------


def available() -> bool:
    """Whether CuPy is importable (the run-time path's only requirement beyond a GPU)."""
    try:
        __import__("cupy")
    except Exception:
        return False
    return True


def _fn(name: str):
    import cupy
    dev = cupy.cuda.runtime.getDevice()
    mod = _modules.get(dev)
    if mod is None:
        mod = _modules[dev] = cupy.RawModule(code=source(), options=_options(), name_expressions=name_expressions())
    return mod.get_function(_NS + name)


def _launch(name: str, grid, block, args, stream: int) -> None:
    import cupy
    import numpy as np
    conv = []
    for a in args:
        if isinstance(a, _Ptr):
            conv.append(np.uint64(a.value))
        elif isinstance(a, float):
            conv.append(np.float32(a))
        elif isinstance(a, _I32):
            conv.append(np.int32(a.value))
        else:
            conv.append(np.int64(a))
    fn = _fn(name)
    with cupy.cuda.ExternalStream(stream):
        fn(tuple(grid), tuple(block), tuple(conv))


class _Ptr:
    __slots__ = ("value",)

    def __init__(self, value: int):
        self.value = int(value)


class _I32:
    __slots__ = ("value",)

    def __init__(self, value: int):
        self.value = int(value)


def _k():
    from dtrain import _C
    return _C.kernels


@functools.lru_cache(maxsize=None)
def _layout() -> dict:
    return _k().cuda_layout()


def _tname(dt) -> str:
    return _TYPES[dt.name]


def _device_blob(blob: bytes):
    """The bytes in device memory, copied on torch's current stream (the one the kernels run
    on; kept alive by the caller until launched, and the caching allocator orders any reuse
    after the launch on that stream)."""
    import torch
    host = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return host.to(torch.device("cuda", torch.cuda.current_device()))


def _multi(kernel: str, slots: Sequence[Sequence[int]], numel: Sequence[int], extra, stream: int,
           args_blob: bytes = b"") -> int:
    """Launches `kernel` over the planned Launch blocks; extra(launch_index, base_block) gives
    the arguments after the Launch (and args) pointers. Returns the total block count."""
    plans = _k().cuda_plan([list(s) for s in slots], list(numel))
    if not plans:
        return 0
    size = _layout()["launch_size"]
    blob = b"".join(p for p, _ in plans) + args_blob
    dev = _device_blob(blob)
    base = dev.data_ptr()
    pre = [_Ptr(base + len(plans) * size)] if args_blob else []
    blocks = 0
    for i, (_, nb) in enumerate(plans):
        _launch(kernel, (nb,), (_layout()["threads"],), [_Ptr(base + i * size)] + pre + extra(blocks),
                stream)
        blocks += nb
    return blocks


def adam_step_cuda(slots, numel, dtype, decay, amsgrad, grad_scale, beta1_comp, beta2, beta2_comp, eps,
                   weight_decay, decay_factor, neg_step_size, inv_bc2_sqrt, found_inf, stream) -> None:
    args = struct.pack("9f", grad_scale, beta1_comp, beta2, beta2_comp, eps, weight_decay, decay_factor,
                       neg_step_size, inv_bc2_sqrt)
    name = f"adamKernelRtc<{_tname(dtype)}, dtrain::kernels::Decay::{_DECAY[decay.name]}, " \
           f"{'true' if amsgrad else 'false'}>"
    _multi(name, slots, numel, lambda _: [_Ptr(found_inf)], stream, args)


def sgd_step_cuda(slots, numel, dtype, l2, momentum, nesterov, grad_scale, weight_decay, momentum_factor, damp_comp,
                  neg_lr, found_inf, stream) -> None:
    args = struct.pack("5f", grad_scale, weight_decay, momentum_factor, damp_comp, neg_lr)
    name = f"sgdKernelRtc<{_tname(dtype)}, {'true' if l2 else 'false'}, " \
           f"dtrain::kernels::Momentum::{_MOMENTUM[momentum.name]}, {'true' if nesterov else 'false'}>"
    _multi(name, slots, numel, lambda _: [_Ptr(found_inf)], stream, args)


def _pairs(tensors: Sequence[int], numel: Sequence[int], flat: int, flat_dtype, to_flat: bool):
    size = 4 if flat_dtype.name == "float32" else 2
    offs, o = [], flat
    for n in numel:
        offs.append(o)
        o += n * size
    return [list(tensors), offs] if to_flat else [offs, list(tensors)]


def pack_cuda(src, numel, src_dtype, flat, flat_dtype, scale, stream) -> None:
    name = f"convertKernelRtc<{_tname(src_dtype)}, {_tname(flat_dtype)}>"
    _multi(name, _pairs(src, numel, flat, flat_dtype, True), numel, lambda _: [float(scale), _I32(0)], stream)


def unpack_cuda(flat, flat_dtype, dst, numel, dst_dtype, scale, accumulate, stream) -> None:
    name = f"convertKernelRtc<{_tname(flat_dtype)}, {_tname(dst_dtype)}>"
    _multi(name, _pairs(dst, numel, flat, flat_dtype, False), numel,
           lambda _: [float(scale), _I32(1 if accumulate else 0)], stream)


def norm_cuda(x, numel, dtype, part_sq, part_max, inf, out, stream) -> None:
    blocks = _multi(f"normKernelRtc<{_tname(dtype)}>", [x], numel,
                    lambda base: [_Ptr(part_sq), _Ptr(part_max), _I32(base)], stream)
    _launch("normFinishKernel", (1,), (_layout()["threads"],),
            [_Ptr(part_sq), _Ptr(part_max), _I32(blocks), _I32(1 if inf else 0), _Ptr(out)], stream)


def _grid(elements: int) -> int:
    return max(1, min((elements + 255) // 256, 4096))


def _col_grid(rows: int, n: int):
    lay = _layout()
    return ((n + lay["col_tile"] - 1) // lay["col_tile"], _k().cuda_col_chunks(rows)), (lay["col_tile"],
                                                                                         lay["col_rows"])


def gelu_forward_cuda(dtype, x, b, y, rows, n, stream) -> None:
    if rows * n:
        _launch(f"geluFwdKernel<{_tname(dtype)}>", (_grid(rows * n),), (256,),
                [_Ptr(x), _Ptr(b), _Ptr(y), rows, n], stream)


def gelu_backward_cuda(dtype, dy, x, b, dx, db, part, rows, n, stream) -> None:
    if not n:
        return
    t = _tname(dtype)
    grid, block = _col_grid(rows, n)
    _launch(f"geluBwdKernel<{t}>", grid, block, [_Ptr(dy), _Ptr(x), _Ptr(b), _Ptr(dx), _Ptr(part), rows, n], stream)
    _launch(f"colSumKernel<{t}>", (_grid(n),), (256,), [_Ptr(part), _I32(grid[1]), n, _Ptr(db)], stream)


def layer_norm_forward_cuda(dtype, x, w, b, y, mean, rstd, rows, n, eps, stream) -> None:
    if rows:
        per = _layout()["rows_per_warp_block"]
        _launch(f"lnFwdKernel<{_tname(dtype)}>", ((rows + per - 1) // per,), (32, per),
                [_Ptr(x), _Ptr(w), _Ptr(b), _Ptr(y), _Ptr(mean), _Ptr(rstd), rows, _I32(n), float(eps)], stream)


def layer_norm_backward_cuda(dtype, dy, x, w, mean, rstd, dx, dw, db, part, rows, n, stream) -> None:
    if not n:
        return
    t = _tname(dtype)
    per = _layout()["rows_per_warp_block"]
    if rows:
        _launch(f"lnBwdKernel<{t}>", ((rows + per - 1) // per,), (32, per),
                [_Ptr(dy), _Ptr(x), _Ptr(w), _Ptr(mean), _Ptr(rstd), _Ptr(dx), rows, _I32(n)], stream)
    if not dw and not db:
        return
    grid, block = _col_grid(rows, n)
    dw_part = part if dw else 0
    db_part = part + grid[1] * n * 4 if db else 0
    _launch(f"lnBwdColKernel<{t}>", grid, block,
            [_Ptr(dy), _Ptr(x), _Ptr(mean), _Ptr(rstd), _Ptr(dw_part), _Ptr(db_part), rows, n], stream)
    for out, p in ((dw, dw_part), (db, db_part)):
        if out:
            _launch(f"colSumKernel<{t}>", (_grid(n),), (256,), [_Ptr(p), _I32(grid[1]), n, _Ptr(out)], stream)


if __name__ == "__main__":
    lowered = compile_ptx()
    print(f"compiled {len(lowered)} kernels with {find_libnvrtc()} (headers: {include_dirs() or 'none'})")
