"""The tensor reader compiled at run time against the installed torch.

dtrain._C includes no torch header, so one build of it serves every torch version; to
read a list of tensors it calls torch's Python-facing C functions, six of them a tensor
(~40 us for 200 tensors, most of a 1M-parameter pack's time). csrc/jit/torch_reader.cc
reads the same facts from the at::Tensor itself, a few ns a tensor, but has to be compiled
against the torch it runs with. This module does that, once per torch build:

- start() (fusion's first read) looks for the library in the cache: DTRAIN_CACHE_DIR, else
  $XDG_CACHE_HOME/dtrain, else ~/.cache/dtrain, under torch-reader/, named by a hash of
  the sources, torch's version and path, Python's ABI and the compiler. Found, it is
  loaded at once.
- Not found, it is compiled (~20 s of one core) by a process of its own session, under a
  file lock so that ranks starting together build it once; the build finishes even when
  the job that started it ends first. Until the library is there, lists are read through
  the descriptor path, which gives the same answers; a background thread loads it then.
- DTRAIN_TORCH_READER=0 turns it off. Where it cannot be built (no C++ compiler, no
  torch headers), one warning says why and the descriptor path stays.

wait() blocks until the reader is in use or has failed (benchmarks call it before timing);
state() says which.
"""

from __future__ import annotations

import ctypes
import fcntl
import glob
import hashlib
import json
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


def _commands(cxx: str, root: str) -> List[List[str]]:
    """The compile commands to try in turn (C++20, then C++17), with "{out}" for the output."""
    import torch
    tdir = os.path.dirname(torch.__file__)
    return [[cxx, "-O2", f"-std={std}", "-w", "-shared", "-fPIC", "-fvisibility=hidden",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             "-I", os.path.join(tdir, "include"), "-I", sysconfig.get_paths()["include"], "-I", root,
             os.path.join(root, _SOURCES[0]), "-o", "{out}",
             "-L", os.path.join(tdir, "lib"), "-lc10", f"-Wl,-rpath,{os.path.join(tdir, 'lib')}"]
            for std in ("c++20", "c++17")]


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


_BUILT, _FOUND, _FAILED = 0, 3, 1  # the builder's exit statuses


def _build(path: str, commands: List[List[str]]) -> int:
    """Compiles into `path` (_BUILT) unless another process did while this one waited for the
    lock (_FOUND); raises RuntimeError naming the compiler's complaint."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            return _FOUND
        for stale in glob.glob(glob.escape(path) + ".*.tmp"):  # left by a builder that was killed
            os.unlink(stale)
        tmp = f"{path}.{os.getpid()}.tmp"
        err = ""
        try:
            for command in commands:
                r = subprocess.run([tmp if a == "{out}" else a for a in command], capture_output=True, text=True,
                                   timeout=600)
                if r.returncode == 0:
                    os.replace(tmp, path)  # whole or absent: a rank never loads a half-written file
                    return _BUILT
                said = (r.stderr or r.stdout).strip()
                err = f"exit status {r.returncode}" + (f": ...{said[-600:]}" if said else "")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise RuntimeError(f"{commands[0][0]} failed ({err}), compiling {commands[0][commands[0].index('-o') - 1]}")


class _Builder:
    """_build in a process of its own session, started at once by the thread that asks for
    the reader: it finishes (and renames the library into the cache) even when this process
    exits first, so a job shorter than the compile still leaves the reader for the next.
    Its complaint, if any, comes back through a log file, which it removes when it succeeds
    (and the waiting process when it has read it)."""

    def __init__(self, path: str, commands: List[List[str]]):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.log = f"{path}.{os.getpid()}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), path, json.dumps(commands),
                                          self.log], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                         start_new_session=True)

    def wait(self) -> bool:
        """True when it compiled, False when another process had; raises when it failed."""
        said = ""
        try:
            rc = self.proc.wait(timeout=1300)
            if os.path.exists(self.log):  # (the builder removes it when it succeeds)
                with open(self.log) as log:
                    said = log.read().strip()
        finally:
            if os.path.exists(self.log):
                os.unlink(self.log)
        if rc not in (_BUILT, _FOUND):
            raise RuntimeError(said or f"the builder exited with status {rc}")
        return rc == _BUILT


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


def _run(path: str, use: Callable[[int, int], bool], builder: Optional[_Builder] = None) -> None:
    try:
        if builder is not None and builder.wait():
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
        builder = None if os.path.exists(path) else _Builder(path, _commands(cxx, root))
    except OSError as e:
        warnings.warn(f"dtrain could not build its torch tensor reader ({e}); lists of tensors are read through "
                      "torch's Python API instead. DTRAIN_TORCH_READER=0 stops the attempt.", RuntimeWarning,
                      stacklevel=3)
        return _finish(f"failed: {e}")
    if builder is None:
        return _run(path, use)
    threading.Thread(target=_run, args=(path, use, builder), name="dtrain-torch-reader", daemon=True).start()


if __name__ == "__main__":  # the builder (_Builder): _torch_reader.py PATH COMMANDS_JSON LOG
    try:
        status = _build(sys.argv[1], json.loads(sys.argv[2]))
        os.unlink(sys.argv[3])  # empty: nothing to report
        sys.exit(status)
    except Exception as e:  # noqa: BLE001 - reported to the process waiting for it, through stderr
        print(f"{e}", file=sys.stderr)
        sys.exit(_FAILED)
