"""The CUDA sources without a GPU: NVRTC compiles device.cuh (the run-time path's exact
text and kernel names), the launch planner both paths share covers every chunk of every
tensor once, and the argument layouts Python builds match the C++ structs.

nvcc's build of the same sources happens in setup.py (CI compiles it on every run)."""

import importlib.util
import os
import struct
import subprocess
import sys

import pytest

from dtrain import _C
from dtrain.errors import ConfigError
from dtrain.ops import _cuda, _nvrtc


def _nvrtc_or_skip():
    try:
        lib = _nvrtc.find_libnvrtc()
    except ConfigError as e:
        pytest.skip(str(e))
    if not _nvrtc.include_dirs():
        pytest.skip("no cuda_fp16.h found for NVRTC (install a CUDA toolkit or set DTRAIN_CUDA_INCLUDE)")
    return lib


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_every_kernel(arch):
    lib = _nvrtc_or_skip()
    lowered = _nvrtc.compile_ptx(arch, lib)
    names = _nvrtc.name_expressions()
    assert len(names) == len(set(names)) == len(lowered) == 85
    assert all(v.startswith("_Z") for v in lowered.values())  # mangled: every template was instantiated
    assert len(set(lowered.values())) == len(lowered)


def test_nvrtc_reports_a_compile_error_with_its_log(monkeypatch):
    lib = _nvrtc_or_skip()
    good = _nvrtc.source()
    monkeypatch.setattr(_nvrtc, "source", lambda: good + "\n__global__ void broken() { undefined_name(); }\n")
    with pytest.raises(ConfigError, match="undefined_name"):
        _nvrtc.compile_ptx("compute_90", lib)


def test_source_inlines_each_header_once():
    src = _nvrtc.source()
    assert '#include "' not in src
    assert src.count("struct Launch {") == 1 and src.count("struct AdamArgs {") == 1
    assert "#include <cuda_fp16.h>" in src


def test_an_install_outside_the_source_tree_carries_the_kernel_source(tmp_path):
    """setup.py's build_py puts device.cuh and its headers in dtrain/_csrc; _nvrtc, loaded from
    that built package, reads the same text from there as it does from csrc/ here."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)], cwd=repo, check=True,
                   capture_output=True, timeout=120)
    assert (out / "dtrain" / "_csrc" / "kernels" / "cuda" / "device.cuh").exists()
    spec = importlib.util.spec_from_file_location("built_nvrtc", out / "dtrain" / "ops" / "_nvrtc.py")
    built = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(built)
    assert built._csrc() == str(out / "dtrain" / "_csrc")
    assert built.source() == _nvrtc.source()


def _decode(blob, lay):
    """(tensor slot pointers, numel, [(tensor, chunk)]) of one Launch block."""
    mt, mb = lay["max_tensors"], lay["max_blocks"]
    slots = [struct.unpack_from(f"{mt}Q", blob, s * mt * 8) for s in range(5)]
    numel = struct.unpack_from(f"{mt}q", blob, lay["numel_offset"])
    bt = struct.unpack_from(f"{mb}h", blob, lay["block_tensor_offset"])
    bc = struct.unpack_from(f"{mb}i", blob, lay["block_chunk_offset"])
    return slots, numel, list(zip(bt, bc))


@pytest.mark.parametrize("sizes", [
    [0], [1], [0, 1, 0, 7], [65536, 65537, 3],
    [320 * 65536 + 5, 1, 2 * 65536],             # one tensor spans more than one launch
    [(i * 7919) % 200003 for i in range(130)],    # 130 tensors of mixed sizes, zeros among them
])
@pytest.mark.parametrize("nslots", [1, 2, 4, 5])
def test_plan_covers_every_chunk_once(sizes, nslots):
    lay = _C.kernels.cuda_layout()
    chunk = lay["chunk"]
    # fake, distinct pointers per (slot, tensor): the planner only copies them
    slots = [[(s + 1) << 40 | (i + 1) << 8 for i in range(len(sizes))] for s in range(nslots)]
    seen = {}
    for blob, blocks in _C.kernels.cuda_plan(slots, sizes):
        assert len(blob) == lay["launch_size"] and 1 <= blocks <= lay["max_blocks"]
        ptrs, numel, work = _decode(blob, lay)
        for t, c in work[:blocks]:
            assert 0 <= t < lay["max_tensors"]
            i = ((ptrs[0][t] >> 8) & 0xffffffff) - 1  # which input tensor this slot holds
            assert all(ptrs[s][t] == slots[s][i] for s in range(nslots))
            assert numel[t] == sizes[i] and 0 <= c * chunk < sizes[i]
            seen[(i, c)] = seen.get((i, c), 0) + 1
    want = {(i, c) for i, n in enumerate(sizes) for c in range(-(-n // chunk))}
    assert set(seen) == want and all(v == 1 for v in seen.values())
    assert _C.kernels.cuda_total_blocks(sizes) == len(want)


def test_argument_layouts_match_python():
    lay = _C.kernels.cuda_layout()
    assert lay["adam_args_size"] == struct.calcsize("9f") and lay["sgd_args_size"] == struct.calcsize("5f")
    assert lay["launch_size"] == 5 * 24 * 8 + 24 * 8 + 320 * 2 + 320 * 4
    assert [_C.kernels.cuda_col_chunks(r) for r in (0, 1, 32, 33, 10**6)] == [1, 1, 1, 2, 128]


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("DTRAIN_CUDA_KERNELS", "gpu-please")
    with pytest.raises(ConfigError, match="'builtin' or 'nvrtc'"):
        _cuda.backend("test")
    monkeypatch.setenv("DTRAIN_CUDA_KERNELS", "builtin")
    if _C.kernels.cuda_built:
        assert _cuda.backend("test") is _C.kernels
    else:
        with pytest.raises(ConfigError, match="built without CUDA kernels"):
            _cuda.backend("test")
        assert _cuda.backend("test", required=False) is None
    monkeypatch.setenv("DTRAIN_CUDA_KERNELS", "nvrtc")
    if _nvrtc.available():
        assert _cuda.backend("test") is _nvrtc
    else:
        with pytest.raises(ConfigError, match="pip install cupy"):
            _cuda.backend("test")
