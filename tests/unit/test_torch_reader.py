"""dtrain.ops._torch_reader: csrc/jit/torch_reader.cc compiled at run time against this
torch, cached, shared by processes that start together, and a correct fallback when it
cannot be built. Each case runs fresh Python processes on an empty cache directory (the
real compiler, the real torch headers); what the reader reads is tested, on both paths,
in test_fusion_ops.py."""

import importlib.util
import os
import subprocess
import sys
import time

from tests.multiproc.harness import REPO

# Packs 60 tensors (one a negated view) in a fresh process, checks the result against
# torch, waits for the reader and checks again; prints its state.
_CHILD = f"""
import logging, sys, warnings
sys.path.insert(0, {REPO!r})
logging.basicConfig(level=logging.INFO, format="%(message)s")
warnings.simplefilter("always")
import torch
from dtrain import ops, _C
from dtrain.ops import _torch_reader
ts = [torch.randn(i % 5, 3) for i in range(59)] + [torch._neg_view(torch.randn(4))]
want = torch.cat([t.flatten() for t in ts]).half()
assert torch.equal(ops.pack(ts, dtype=torch.float16), want)
used = _torch_reader.wait(600)
assert used == _C.kernels.using_torch_reader()
assert torch.equal(ops.pack(ts, dtype=torch.float16), want)
assert torch.equal(ops.pack(ts[:-1], dtype=torch.float16), want[:-4])
print("STATE", _torch_reader.state(), flush=True)
"""


def _spawn(env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(p):
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def test_two_processes_starting_together_compile_the_reader_once_and_both_use_it(tmp_path):
    procs = [_spawn({"DTRAIN_CACHE_DIR": str(tmp_path)}) for _ in range(2)]
    outs = [_finish(p) for p in procs]
    built = [o for o in outs if "compiled its torch tensor reader" in o]
    assert len(built) == 1, outs
    libs = sorted((tmp_path / "torch-reader").glob("*.so"))
    assert len(libs) == 1 and not list((tmp_path / "torch-reader").glob("*.tmp")), libs
    for o in outs:
        assert f"STATE in use ({libs[0]})" in o, o
    # A third process finds it in the cache and loads it at once: no compile.
    again = _finish(_spawn({"DTRAIN_CACHE_DIR": str(tmp_path)}))
    assert f"STATE in use ({libs[0]})" in again and "compiled" not in again


def test_a_process_that_exits_before_the_compile_ends_still_leaves_the_reader_cached(tmp_path):
    """The compile runs in a process of its own session: it renames the library into the
    cache after the job that started it has gone (a job shorter than the compile)."""
    code = f"import sys; sys.path.insert(0, {REPO!r}); import torch; from dtrain import ops; ops.pack([torch.ones(2)])"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DTRAIN_CACHE_DIR=str(tmp_path)), check=True,
                   timeout=120)
    assert time.monotonic() - t0 < 15  # it did not wait for the compile
    cache = tmp_path / "torch-reader"
    while not list(cache.glob("*.so")):
        assert time.monotonic() - t0 < 600, sorted(cache.iterdir())
        time.sleep(0.5)
    time.sleep(0.5)  # the builder removes its log after the rename
    assert not list(cache.glob("*.tmp")) and not list(cache.glob("*.log")), sorted(cache.iterdir())
    out = _finish(_spawn({"DTRAIN_CACHE_DIR": str(tmp_path)}))
    assert "STATE in use" in out and "compiled" not in out, out


def test_a_compiler_that_fails_leaves_the_descriptor_path_with_one_warning(tmp_path):
    out = _finish(_spawn({"DTRAIN_CACHE_DIR": str(tmp_path), "CXX": "/bin/false"}))
    assert "STATE failed: /bin/false failed (exit status 1), compiling " in out, out
    assert out.count("could not build its torch tensor reader") == 1, out
    assert "DTRAIN_TORCH_READER=0" in out
    assert not list((tmp_path / "torch-reader").glob("*.so"))


def test_DTRAIN_TORCH_READER_0_never_tries(tmp_path):
    out = _finish(_spawn({"DTRAIN_CACHE_DIR": str(tmp_path), "DTRAIN_TORCH_READER": "0"}))
    assert "STATE off (DTRAIN_TORCH_READER=0)" in out, out
    assert not (tmp_path / "torch-reader").exists()


def test_an_unwritable_cache_fails_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = _finish(_spawn({"DTRAIN_CACHE_DIR": str(blocker)}))
    assert "STATE failed:" in out and "could not build its torch tensor reader" in out, out


def test_a_damaged_cache_entry_is_refused_with_a_warning_and_removed(tmp_path):
    from dtrain.ops import _torch_reader
    path = _torch_reader.library_path(_torch_reader._csrc(), _torch_reader._compiler()).replace(
        _torch_reader.cache_dir(), str(tmp_path / "torch-reader"))
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not an ELF file")
    out = _finish(_spawn({"DTRAIN_CACHE_DIR": str(tmp_path)}))
    assert "STATE failed:" in out and "could not build its torch tensor reader" in out, out
    assert not os.path.exists(path)


def test_an_install_outside_the_source_tree_carries_the_readers_source(tmp_path):
    """setup.py's build_py puts csrc/jit/torch_reader.cc and the headers it includes in
    dtrain/_csrc, where the built package's _torch_reader finds them; the cache key is
    the same text's."""
    out = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    csrc = out / "dtrain" / "_csrc"
    for rel in ("jit/torch_reader.cc", "jit/torch_reader.h", "common/dtype.h"):
        assert (csrc / rel).read_bytes() == open(os.path.join(REPO, "csrc", rel), "rb").read()
    spec = importlib.util.spec_from_file_location("built_reader", out / "dtrain" / "ops" / "_torch_reader.py")
    built = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(built)
    assert built._csrc() == str(csrc)
    from dtrain.ops import _torch_reader
    assert built.library_path(built._csrc(), "c++") == _torch_reader.library_path(_torch_reader._csrc(), "c++")

