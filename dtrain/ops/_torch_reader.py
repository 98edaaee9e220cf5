"""The tensor reader compiled at run time against the installed torch.

dtrain._C includes no torch header, so one build of it serves every torch version; to
read a list of tensors it calls torch's Python-facing C functions, five of them a tensor
(~40 us for 200 tensors, most of a 1M-parameter pack's time). csrc/jit/torch_reader.cc
reads the same facts from the at::Tensor itself, a few ns a tensor, but has to be compiled
against the torch it runs with. This module does that, once per torch build:

- start() (fusion's first read) looks for the library in the cache: DTRAIN_CACHE_DIR, else
  $XDG_CACHE_HOME/dtrain, else ~/.cache/dtrain, under torch-reader/, named by a hash of
  the sources, torch's version and path, Python's ABI and the compiler. Found, it is
  loaded at once.
- Not found, it is compiled on a background thread (~20 s of one core), under a file lock
  so that ranks starting together build it once; until it is there, lists are read
  through the descriptor path, which gives the same answers.
- DTRAIN_TORCH_READER=0 turns it off. Where it cannot be built (no C++ compiler, no
  torch headers), one warning says why and the descriptor path stays.

wait() blocks until the reader is in use or has failed (benchmarks call it before timing);
state() says which.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import warnings
from typing import Callable, List, Optional

_log = logging.getLogger("dtrain.ops")

_SOURCES = ("jit/torch_reader.cc", "jit/torch_reader.h", "common/dtype.h")
_lock = threading.Lock()
_done = threading.Event()
_state = "not started"
_lib: Optional[ctypes.CDLL] = None  # held for the life of the process: _C calls into it
_address: Optional[int] = None


def state() -> str:
    """"in use (PATH)", "compiling", "off (DTRAIN_TORCH_READER=0)", "failed: why" or "not started"."""
    return _state


def wait(timeout: Optional[float] = None) -> bool:
    """Blocks until the reader is in use or has failed (or `timeout` seconds); True when it is in use."""
    _done.wait(timeout)
    return _state.startswith("in use")


def address() -> Optional[int]:
    """The reader function's address once it is in use (what _C.kernels.use_torch_reader took)."""
    return _address


def _csrc() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.join(here, "..", "_csrc"), os.path.join(here, "..", "..", "csrc")):
        if all(os.path.exists(os.path.join(root, rel)) for rel in _SOURCES):
            return os.path.normpath(root)
    return None


def cache_dir() -> str:
    base = os.environ.get("DTRAIN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dtrain")
    return os.path.join(base, "torch-reader")


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX") or (sysconfig.get_config_var("CXX") or "").split(" ")[0]
    for c in (cxx, "c++", "g++", "clang++"):
        path = shutil.which(c) if c else None
        if path:
            return path
    return None


def _command(cxx: str, root: str, std: str, out: str) -> List[str]:
    import torch
    tdir = os.path.dirname(torch.__file__)
    return [cxx, "-O2", f"-std={std}", "-w", "-shared", "-fPIC", "-fvisibility=hidden",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-I", os.path.join(tdir, "include"), "-I", sysconfig.get_paths()["include"], "-I", root,
            os.path.join(root, _SOURCES[0]), "-o", out,
            "-L", os.path.join(tdir, "lib"), "-lc10", f"-Wl,-rpath,{os.path.join(tdir, 'lib')}"]


def library_path(root: str, cxx: str) -> str:
    """Where the library for this torch, Python, compiler and source text lives in the cache."""
    import torch
    h = hashlib.sha256()
    for rel in _SOURCES:
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
    for part in (torch.__version__, os.path.dirname(torch.__file__), str(torch._C._GLIBCXX_USE_CXX11_ABI),
                 sysconfig.get_config_var("EXT_SUFFIX") or "", sys.version, cxx):
        h.update(b"\0" + part.encode())
    return os.path.join(cache_dir(), f"torch_reader-{torch.__version__.replace('+', '_')}-{h.hexdigest()[:16]}.so")


def _build(root: str, cxx: str, path: str) -> bool:
    """Compiles into `path` (True) unless another process did while this one waited for the lock."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            return False
        tmp = f"{path}.{os.getpid()}.tmp"
        err = ""
        try:
            for std in ("c++20", "c++17"):
                r = subprocess.run(_command(cxx, root, std, tmp), capture_output=True, text=True, timeout=600)
                if r.returncode == 0:
                    os.replace(tmp, path)  # whole or absent: a rank never loads a half-written file
                    return True
                err = f"exit status {r.returncode}" + (f": ...{(r.stderr or r.stdout).strip()[-600:]}"
                                                         if (r.stderr or r.stdout).strip() else "")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise RuntimeError(f"{cxx} failed ({err}), compiling {os.path.join(root, _SOURCES[0])}")


def _install(path: str, use: Callable[[int, int], bool]) -> None:
    global _lib, _address
    lib = ctypes.CDLL(path)
    abi = int(lib.dtrain_torch_reader_abi())
    addr = ctypes.cast(lib.dtrain_torch_read, ctypes.c_void_p).value
    if not use(addr, abi):
        raise RuntimeError(f"dtrain._C refused the reader at {path} (reader ABI {abi})")
    _lib, _address = lib, addr


def _finish(state: str) -> None:
    global _state
    _state = state
    _done.set()


def _run(root: str, cxx: str, path: str, use: Callable[[int, int], bool]) -> None:
    try:
        if not os.path.exists(path) and _build(root, cxx, path):
            _log.info("dtrain: compiled its torch tensor reader into %s", path)
        try:
            _install(path, use)
        except Exception:
            os.unlink(path)  # a damaged cache entry: the next process builds it anew
            raise
        _finish(f"in use ({path})")
    except Exception as e:  # noqa: BLE001 - any failure leaves the descriptor path, which is correct
        warnings.warn(f"dtrain could not build its torch tensor reader ({e}); lists of tensors are read through "
                      "torch's Python API instead, ~0.2 us a tensor slower. DTRAIN_TORCH_READER=0 stops the attempt.",
                      RuntimeWarning, stacklevel=2)
        _finish(f"failed: {e}")


def start(use: Callable[[int, int], bool]) -> None:
    """Loads the reader from the cache, or starts compiling it in the background; `use`
    (dtrain._C's use_torch_reader) takes its function's address and ABI. Once per process."""
    global _state
    with _lock:
        if _state != "not started":
            return
        _state = "compiling"
    if os.environ.get("DTRAIN_TORCH_READER", "1") == "0":
        return _finish("off (DTRAIN_TORCH_READER=0)")
    root, cxx = _csrc(), _compiler()
    if root is None:
        return _finish("failed: csrc/jit is not beside this install")
    if cxx is None:
        return _finish("failed: no C++ compiler (c++, g++, clang++ or $CXX) on PATH")
    try:
        path = library_path(root, cxx)
    except OSError as e:
        return _finish(f"failed: {e}")
    if os.path.exists(path):
        return _run(root, cxx, path, use)
    threading.Thread(target=_run, args=(root, cxx, path, use), name="dtrain-torch-reader", daemon=True).start()
