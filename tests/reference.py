"""Seeded inputs and float64 references shared by the loopback and multi-process tests.

Error bounds (stated once, used everywhere):
- float32/float64 tensors: a ring of n ranks rounds each partial sum once per hop, so
  |got - exact| <= n * eps * sum_i |x_i| (eps = 2^-24 / 2^-53); prod likewise relative to |exact|.
- float16/bfloat16 tensors: the same with eps = 2^-11 / 2^-8 (each hop rounds to the tensor type).
- compression="fp16"/"bf16" on float32: every hop sends the partial sum rounded to the wire type
  (relative error u = 2^-11 / 2^-8, plus 2^-25 absolute below fp16's normal range), and the owner
  rounds the final sum once more so all ranks agree: |got - exact| <= (n + 1) * (u * sum_i |x_i| + 2^-25).
- integers: exact (uint8 wraps modulo 256, as torch does).
"""

import torch

EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
WIRE_EPS = {"fp16": 2.0**-11, "bf16": 2.0**-8}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8]
OPS = ["sum", "avg", "min", "max", "prod"]


def rank_input(seed: int, rank: int, dtype, n: int, op: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    if dtype.is_floating_point:
        if op == "prod":  # near 1 so products neither overflow nor vanish
            return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    if dtype == torch.uint8:
        return torch.randint(0, 60, (n,), generator=g).to(dtype)
    hi = 3 if op == "prod" else 10_000
    return torch.randint(-hi, hi, (n,), generator=g).to(dtype)


def exact(inputs, op: str, dtype):
    wide = [x.double() if dtype.is_floating_point else x.long() for x in inputs]
    acc = wide[0].clone()
    for x in wide[1:]:
        acc = {"sum": acc + x, "avg": acc + x, "prod": acc * x, "min": torch.minimum(acc, x),
               "max": torch.maximum(acc, x)}[op]
    if op == "avg":
        acc = acc / len(inputs)
    return acc


def check(got: torch.Tensor, inputs, op: str, dtype, compression=None, what: str = "") -> None:
    n = len(inputs)
    ref = exact(inputs, op, dtype)
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not dtype.is_floating_point:
        assert torch.equal(got, ref.to(dtype)), f"{what}: integer result differs"
        return
    if op in ("min", "max") and compression is None:
        assert torch.equal(got, ref.to(dtype)), f"{what}: {op} must be exact"
        return
    mag = sum(x.double().abs() for x in inputs)
    if op == "avg":
        mag = mag / n
    if op == "prod":
        mag = ref.abs()
    if compression is not None:
        bound = (n + 1) * (WIRE_EPS[compression] * mag + 2.0**-25)
    else:
        bound = (n + 1) * EPS[dtype] * mag + 1e-300
    err = (got.double() - ref).abs()
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{what}: error exceeds the stated bound by {worst:g}"
