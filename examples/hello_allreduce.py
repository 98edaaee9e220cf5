"""Allreduce a tensor across every rank and print what each rank holds.

    python examples/hello_allreduce.py            # one process
    dtrain-run -n 2 examples/hello_allreduce.py   # two processes
"""

import torch

import dtrain


def main():
    dtrain.init()
    rank, size = dtrain.rank(), dtrain.world_size()
    t = torch.arange(4, dtype=torch.float32) * (rank + 1)
    dtrain.allreduce(t, op="sum")
    expected = torch.arange(4, dtype=torch.float32) * sum(r + 1 for r in range(size))
    assert torch.equal(t, expected), f"rank {rank}: got {t.tolist()}, expected {expected.tolist()}"
    half = dtrain.allreduce(torch.full((3,), 0.5 * (rank + 1)), op="avg", compression="fp16")
    print(f"rank {rank}/{size}: sum {t.tolist()}  avg over fp16 wire {half.tolist()}")
    dtrain.shutdown()


if __name__ == "__main__":
    main()
