"""dtrain.memory: freed blocks stay in the process, so a step that reallocates what the last one
freed does not page-fault through it again. Fresh processes each (mallopt is process-wide)."""

import json
import os
import subprocess
import sys

import pytest

from tests.multiproc.harness import REPO, ranks

WARM = 20

# Allocates, touches and frees a block `cycles` times after WARM cycles (the heap settles: torch
# aligns its blocks, so the first few freed ones do not fit the next request); prints the minor
# page faults of the measured cycles and what keep_freed_memory() returned.
CYCLE = """
import json, resource, sys, torch
from dtrain import memory
applied = memory.keep_freed_memory() if sys.argv[1] == "tune" else None
def cycle(nbytes):
    t = torch.empty(nbytes // 4)
    t.fill_(1.0)
    del t
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
nbytes, cycles = int(sys.argv[2]), int(sys.argv[3])
for _ in range(WARM):
    cycle(nbytes)
before = faults()
for _ in range(cycles):
    cycle(nbytes)
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def run_cycles(mode, nbytes, cycles=10, env=None):
    e = dict(os.environ, PYTHONPATH=REPO)
    e.pop("DTRAIN_MALLOC", None)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-c", CYCLE.replace("WARM", str(WARM)), mode, str(nbytes), str(cycles)], capture_output=True,
                       text=True, timeout=120, env=e)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mib", [40, 129])  # above glibc's 32 MiB mmap ceiling; odd, past 128 MiB
def test_a_freed_block_is_reused_without_faults(mib):
    pages = (mib << 20) // 4096
    default = run_cycles("default", mib << 20)
    tuned = run_cycles("tune", mib << 20)
    assert tuned["applied"] is True
    # glibc's defaults map the block afresh every cycle: at least one fault per 2 MiB huge page
    # (transparent huge pages), usually one per 4 KiB page
    assert default["faults"] >= 10 * (mib // 2), default
    # kept: the warm-up faulted it in, the next ten reuse it
    assert tuned["faults"] < max(pages // 20, 64), (tuned, default)


@pytest.mark.timeout(120)
def test_dtrain_malloc_0_keeps_glibcs_defaults():
    off = run_cycles("tune", 40 << 20, env={"DTRAIN_MALLOC": "0"})
    assert off["applied"] is False
    assert off["faults"] >= 10 * 20, off


def _after_init(warm):
    import resource

    import torch

    import dtrain
    from dtrain import memory
    dtrain.init()
    try:
        for _ in range(warm):
            torch.empty(10 << 20).fill_(1.0)  # 40 MiB
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            torch.empty(10 << 20).fill_(1.0)
        return memory._applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        dtrain.shutdown()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [1, 2])
def test_init_keeps_freed_memory_on_every_rank(n):
    for rank, (applied, faults) in enumerate(ranks(_after_init, n, WARM, env={"DTRAIN_MALLOC": "1"})):
        assert applied is True, f"rank {rank}"
        assert faults < 512, f"rank {rank}: {faults} page faults reallocating a freed 40 MiB block 10 times"
