"""Which layers of an nn.Sequential each stage runs: by explicit counts, by parameter count, or
by measured forward time (contiguous runs of layers, the heaviest stage as light as possible)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, List, Optional, Sequence

import torch

from dtrain.errors import ConfigError


def contiguous(weights: Sequence[float], parts: int) -> List[int]:
    """Layer counts of `parts` contiguous runs of `weights`, minimising the largest run's sum
    (every run gets at least one layer). Dynamic programming, O(parts * n^2)."""
    n = len(weights)
    if n < parts:
        raise ConfigError(f"cannot split {n} layers into {parts} pipeline stages: every stage needs at least "
                          "one layer; use fewer ranks in the pipeline group or a model with more layers")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = float("inf")
    # best[k][i]: the lightest heaviest-run for the first i layers in k runs; cut[k][i] where run k starts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    counts, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def by_params(layers: Sequence[torch.nn.Module]) -> List[float]:
    # parameterless layers (activations) weigh a little, so they are not all piled onto one stage
    return [sum(p.numel() for p in layer.parameters()) + 1.0 for layer in layers]


def by_time(layers: Sequence[torch.nn.Module], sample: Any, repeats: int = 5) -> List[float]:
    """Median forward seconds of each layer on `sample` (one micro-batch), run in order."""
    times: List[List[float]] = [[] for _ in layers]
    with torch.no_grad():
        for _ in range(repeats):
            x = sample
            for i, layer in enumerate(layers):
                t0 = time.perf_counter()
                x = layer(x)
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def counts_for(balance, layers: Sequence[torch.nn.Module], parts: int, sample: Optional[Any],
               agree: Callable[[List[float]], List[float]] = lambda w: w) -> List[int]:
    """The layer count of each stage for `balance`: None (even by layer count), a list of counts,
    "params" or "time" (which needs `sample`; `agree` makes the ranks' timings one, for example
    their average, so every rank cuts the model in the same places)."""
    n = len(layers)
    if balance is None:
        if n < parts:
            return contiguous([1.0] * n, parts)  # raises, saying why
        base, extra = divmod(n, parts)
        return [base + (1 if i < extra else 0) for i in range(parts)]  # the first stages get the extra layer
    if isinstance(balance, str):
        if balance == "params":
            return contiguous(by_params(layers), parts)
        if balance == "time":
            if sample is None:
                raise ConfigError("balance='time' measures each layer's forward time and needs an input: call "
                                  "strategy.prepare(model, optimizer, sample=one_micro_batch_of_inputs)")
            return contiguous(agree(by_time(layers, sample)), parts)
        raise ConfigError(f"balance must be None, a list of layer counts, 'params' or 'time', got {balance!r}")
    counts = list(balance)
    if len(counts) != parts or any((not isinstance(c, int)) or c < 1 for c in counts) or sum(counts) != n:
        raise ConfigError(f"balance={counts} must give each of the {parts} stages a positive number of layers "
                          f"summing to the model's {n} layers")
    return counts
