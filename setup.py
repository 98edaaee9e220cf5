"""Builds dtrain._C: the C++ core (always) plus CUDA objects when a toolkit is found.

Build flags live here and only here:
  DTRAIN_CUDA=0        never compile CUDA sources, even with nvcc present
  DTRAIN_DEBUG=1       -O0 -g, assertions on
  DTRAIN_SANITIZE=1    AddressSanitizer + UBSan (debugging only; needs LD_PRELOAD of libasan)
  MAX_JOBS=N           parallel compile jobs (default: all cores)
"""

import glob
import os
import shutil
import subprocess
import sys

import re

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

ParallelCompile("MAX_JOBS", default=os.cpu_count() or 1).install()

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default="0"):
    return os.environ.get(name, default) not in ("", "0", "false", "False", "no")


def _cxx_sources():
    files = glob.glob(os.path.join("csrc", "**", "*.cc"), recursive=True)
    # csrc/jit: compiled at run time against the installed torch (dtrain.ops._torch_reader)
    return sorted(f for f in files if os.sep + "cuda" + os.sep not in f and os.sep + "jit" + os.sep not in f)


def _nvcc():
    """nvcc's path when CUDA sources should be built, else None."""
    if not _flag("DTRAIN_CUDA", "1"):
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _cuda_lib_dir(nvcc):
    """The toolkit's lib64 (nvcc may be a wrapper script outside the toolkit)."""
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for r in roots:
        if r and os.path.exists(os.path.join(r, "lib64", "libcudart_static.a")):
            return os.path.join(r, "lib64")
    return None


class BuildExt(build_ext):
    """Compiles csrc/**/cuda/*.cu with nvcc (when found) and links them into _C."""

    def build_extension(self, ext):
        # Objects are rebuilt only when their own .cc is newer; a changed header would leave
        # stale objects with another struct layout linked together. Rebuild all instead.
        built = self.get_ext_fullpath(ext.name)
        headers = glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)
        if os.path.exists(built) and headers and max(map(os.path.getmtime, headers)) > os.path.getmtime(built):
            self.force = True
        nvcc = _nvcc()
        cu = sorted(glob.glob(os.path.join("csrc", "**", "cuda", "*.cu"), recursive=True))
        libdir = _cuda_lib_dir(nvcc) if nvcc else None
        if nvcc and not libdir:
            print(f"warning: nvcc is {nvcc} but no libcudart_static.a was found (set CUDA_HOME); "
                  "building without CUDA kernels", file=sys.stderr)
        if nvcc and libdir and cu:
            archs = os.environ.get("DTRAIN_CUDA_ARCHS", "80;90").split(";")
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            out = os.path.join(self.build_temp, "cuda")
            os.makedirs(out, exist_ok=True)
            for src in cu:
                obj = os.path.join(out, os.path.basename(src) + ".o")
                cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       "-Icsrc", *gencode]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
                ext.extra_objects.append(obj)
            # cudart linked statically: the extension then imports on machines without a CUDA
            # runtime library, and only a CUDA call needs the driver.
            ext.library_dirs.append(libdir)
            ext.libraries += ["cudart_static", "dl", "rt"]
            ext.define_macros.append(("DTRAIN_WITH_CUDA", "1"))
        super().build_extension(ext)


def _runtime_sources(rel="kernels/cuda/device.cuh", seen=None):
    """`rel` and every header it includes with quotes, transitively (paths under csrc/): what
    is compiled at run time from an install (for kernels/cuda/device.cuh, the text
    dtrain.ops._nvrtc hands NVRTC on a machine whose dtrain was built without nvcc)."""
    seen = [] if seen is None else seen
    if rel not in seen:
        seen.append(rel)
        with open(os.path.join(ROOT, "csrc", rel)) as f:
            for inc in re.findall(r'^#include "([^"]+)"', f.read(), flags=re.M):
                _runtime_sources(inc, seen)
    return seen


class BuildPy(build_py):
    """Also ships the sources compiled at run time as dtrain/_csrc, where dtrain.ops._nvrtc
    (the CUDA kernels) and dtrain.ops._torch_reader (csrc/jit) look for them in an install
    that is not the source tree (a wheel, pip install .)."""

    def run(self):
        super().run()
        for rel in _runtime_sources() + _runtime_sources("jit/torch_reader.cc"):
            dst = os.path.join(self.build_lib, "dtrain", "_csrc", rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, "csrc", rel), dst)


def _check_zlib():
    """zlib's header must be there: the TFRecord reader inflates gzip/zlib files with it."""
    for d in ("/usr/include", "/usr/local/include", os.path.join(os.environ.get("CONDA_PREFIX", "/nonexistent"),
                                                                   "include")):
        if os.path.exists(os.path.join(d, "zlib.h")):
            return
    raise SystemExit("dtrain needs zlib's development files to build (zlib.h was not found): "
                     "apt-get install zlib1g-dev  (or: dnf install zlib-devel, brew install zlib)")


_check_zlib()
debug = _flag("DTRAIN_DEBUG")
compile_args = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
# -fno-math-errno: sqrt must not set errno, or no loop calling it vectorises (nothing reads errno).
# -fno-trapping-math: a float compare may then run unconditionally, so loops with a select
# (clamps, sign flips) vectorise; nothing here enables floating-point traps. Neither flag
# lets the compiler reorder arithmetic.
# -fopenmp: `#pragma omp simd reduction` marks the few loops whose sums may be split into
# vector lanes, and the multi-threaded kernels run on an OpenMP team (kernels/cpu/threads.h):
# the libgomp.so.1 torch loaded first, so they share its intra-op pool.
compile_args += ["-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-fno-math-errno", "-fno-trapping-math",
                 "-fopenmp"]
link_args = ["-pthread", "-fopenmp"]
if _flag("DTRAIN_SANITIZE"):
    compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    link_args += ["-fsanitize=address,undefined"]

ext = Pybind11Extension(
    "dtrain._C",
    _cxx_sources(),
    include_dirs=[os.path.join(ROOT, "csrc")],
    cxx_std=17,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    libraries=["rt", "z"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt, "build_py": BuildPy})
