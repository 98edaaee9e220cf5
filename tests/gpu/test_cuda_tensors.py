"""CUDA tensors through the native backend (staged via pinned host memory)."""

import os

import pytest
import torch


def require_gpu():
    if torch.cuda.is_available():
        return
    if os.environ.get("DTRAIN_TEST_GPU") == "1":
        pytest.fail("DTRAIN_TEST_GPU=1 but torch sees no CUDA device")
    pytest.skip("no CUDA device (set DTRAIN_TEST_GPU=1 to make this a failure)")


def test_allreduce_of_a_cuda_tensor_in_a_world_of_one():
    require_gpu()
    import dtrain
    dtrain.init()
    t = torch.arange(10, device="cuda", dtype=torch.float32)
    out = dtrain.allreduce(t)
    assert out.device.type == "cuda" and torch.equal(out.cpu(), torch.arange(10, dtype=torch.float32))
