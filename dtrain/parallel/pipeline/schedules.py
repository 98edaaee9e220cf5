"""Schedules: the order in which a stage runs forward and backward passes of the micro-batches
and trades with its neighbours. Each is a function of (stage, micro-batches); adding one (for
example interleaved or zero-bubble) means adding a class here and a name in SCHEDULES.

Every transfer a stage makes is matched by the same transfer, seen from the other side, at its
neighbour, so no stage waits on one that is itself waiting.
"""

from __future__ import annotations

from typing import Dict, Type

from dtrain.errors import ConfigError


class Schedule:
    """run(stage, m) performs one training step's forward and backward passes of m micro-batches."""

    name = ""

    def run(self, stage, m: int) -> None:
        raise NotImplementedError

    @staticmethod
    def forward_only(stage, m: int) -> None:
        """Forward passes only (evaluation): each micro-batch flows through as it is ready."""
        for i in range(m):
            stage.recv_forward(i)
            stage.forward(i)
            stage.send_forward(i)

    @staticmethod
    def in_flight_bound(stages: int, index: int, m: int) -> int:
        """The most micro-batches stage `index` holds activations for at once."""
        raise NotImplementedError


class GPipe(Schedule):
    """All forward passes, then all backward passes (Huang et al., 2019): every stage holds the
    activations of all m micro-batches at the turn."""

    name = "gpipe"

    def run(self, stage, m: int) -> None:
        for i in range(m):
            stage.recv_forward(i)
            stage.forward(i)
            stage.send_forward(i)
        for i in range(m):
            stage.recv_backward(i)
            stage.backward(i)
            stage.send_backward(i)

    @staticmethod
    def in_flight_bound(stages: int, index: int, m: int) -> int:
        return m


class OneFOneB(Schedule):
    """One forward, one backward (PipeDream-Flush, Narayanan et al., 2021; Megatron-LM's
    non-interleaved schedule): stage s runs p-s-1 warm-up forwards, then alternates, so it
    holds at most p-s micro-batches' activations; the bubble equals GPipe's."""

    name = "1f1b"

    def run(self, stage, m: int) -> None:
        warmup = min(stage.count - stage.index - 1, m)
        steady = m - warmup
        for i in range(warmup):
            stage.recv_forward(i)
            stage.forward(i)
            stage.send_forward(i)
        if steady:
            stage.recv_forward(warmup)
        for j in range(steady):
            f, b = warmup + j, j
            stage.forward(f)
            stage.send_forward_recv_backward(f, b)
            stage.backward(b)
            if j == steady - 1:
                stage.send_backward(b)
            else:
                stage.send_backward_recv_forward(b, f + 1)
        for b in range(steady, m):
            stage.recv_backward(b)
            stage.backward(b)
            stage.send_backward(b)

    @staticmethod
    def in_flight_bound(stages: int, index: int, m: int) -> int:
        return min(stages - index, m)


SCHEDULES: Dict[str, Type[Schedule]] = {"gpipe": GPipe, "1f1b": OneFOneB}


def get(name: str) -> Schedule:
    try:
        return SCHEDULES[name]()
    except (KeyError, TypeError):
        raise ConfigError(f"unknown pipeline schedule {name!r}: use one of {', '.join(SCHEDULES)}") from None
