"""One pipeline stage: its layers, the micro-batches it holds between forward and backward, and
the transfers to its neighbours. Schedules drive it through forward/backward and the
send/recv methods; nothing here knows in which order they come."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from dtrain.comm.api import abort_world
from dtrain.errors import ConfigError, DtrainError
from dtrain.parallel.pipeline import microbatch
from dtrain.parallel.pipeline.p2p import Link, rebuild


class _SavedBytes:
    """Bytes autograd holds for backward (saved activations: not parameters or views of them, such
    as the transposed weight a linear layer saves), live now and at the peak, each tensor view
    counted once however many ops saved it."""

    def __init__(self, module: torch.nn.Module):
        self.live = 0
        self.peak = 0
        self._refs: Dict[tuple, List[int]] = {}
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(self, t: torch.Tensor):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or (t.is_leaf and t.requires_grad) \
                or t.untyped_storage().data_ptr() in self._params:
            return t
        key = (t.data_ptr(), t.numel() * t.element_size())
        ref = self._refs.get(key)
        if ref is None:
            ref = self._refs[key] = [0, key[1]]
            self.live += ref[1]
            self.peak = max(self.peak, self.live)
        ref[0] += 1
        return _Held(self, key, t)

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Held) else h

    def release(self, key: tuple) -> None:
        ref = self._refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[key]


class _Held:
    __slots__ = ("meter", "key", "t")

    def __init__(self, meter, key, t):
        self.meter, self.key, self.t = meter, key, t

    def __del__(self):
        self.meter.release(self.key)


class PipelineStage:
    """Stage `index` of `count`, running `module` on this rank of `group`.

    Per train step: begin() with the micro-batches, then the schedule's calls, then end().
    """

    def __init__(self, module: torch.nn.Module, index: int, count: int, group, ranks: List[int],
                 checkpoint_activations: bool = False, track_memory: bool = False):
        self.module = module
        self.index, self.count = index, count
        self.ranks = ranks  # global rank of each stage
        self.is_first, self.is_last = index == 0, index == count - 1
        self.prev = Link(group, index - 1) if not self.is_first else None
        self.next = Link(group, index + 1) if not self.is_last else None
        self.checkpoint_activations = checkpoint_activations
        self.meter = _SavedBytes(module) if track_memory else None
        self.peak_in_flight = 0
        self.compute_s = 0.0
        self.trace: List[tuple] = []  # (kind, micro-batch, start, end) of the last step, perf_counter seconds
        # micro-batch -> a context its backward runs in (the strategy's data-parallel no_sync)
        self.backward_context: Optional[Callable[[int], Any]] = None

    def name(self, index: Optional[int] = None) -> str:
        i = self.index if index is None else index
        return f"stage {i} (rank {self.ranks[i]})"

    # ---- per step
    def begin(self, inputs: Optional[List[Any]], targets: Optional[List[Any]], loss_fn: Optional[Callable],
              rows: List[int], grad: bool = True) -> None:
        self.inputs: Dict[int, Any] = dict(enumerate(inputs)) if inputs is not None else {}
        self.targets = targets
        self.loss_fn = loss_fn
        self.rows, self.total = rows, float(sum(rows))
        self.grad = grad
        self.held: Dict[int, tuple] = {}  # micro-batch -> (received inputs wanting grads, outputs, skeleton)
        self.grads_in: Dict[int, List[torch.Tensor]] = {}
        self.grads_out: Dict[int, List[torch.Tensor]] = {}
        self.outputs: Dict[int, Any] = {}  # forward-only results to send
        self.losses: List[torch.Tensor] = []
        self.trace = []
        self.peak_in_flight = 0
        self.compute_s = 0.0

    def end(self) -> Optional[torch.Tensor]:
        """The mean loss over the micro-batches (last stage; None elsewhere)."""
        if self.held:
            raise DtrainError(f"{self.name()}: the schedule left micro-batches {sorted(self.held)} without a "
                              "backward pass")
        if not self.is_last:
            return None
        return torch.stack(self.losses).sum() if self.losses else torch.zeros(())

    def _fail(self, what: str, mb: int, e: Exception):
        """A stage's own computation failed: tell every rank (so none waits on this one) and raise
        an error naming this stage and, for a received input, the stage it came from."""
        if isinstance(e, DtrainError):
            raise e
        got = ""
        if not self.is_first and mb in self.held:
            got = (f" on the input {microbatch.describe(self.held[mb][2])} that {self.name(self.index - 1)} "
                   f"sent for micro-batch {mb}")
        hint = (f": {self.name(self.index - 1)}'s output does not fit {self.name()}'s first layer; check the "
                "stage boundaries (balance=...) and the shapes each layer expects") if got and what == "forward" \
            else ""
        msg = f"{self.name()} failed in {what}{got}: {type(e).__name__}: {e}{hint}"
        abort_world(msg)
        raise ConfigError(msg) from e

    # ---- computation
    def forward(self, mb: int) -> None:
        x = self.inputs.pop(mb)
        t0 = time.perf_counter()
        try:
            if self.grad:
                with torch.autograd.graph.saved_tensors_hooks(self.meter.pack, self.meter.unpack) \
                        if self.meter is not None else contextlib.nullcontext():
                    out = self._run(x)
                    loss = self._loss(mb, out) if self.is_last else None
            else:
                with torch.no_grad():
                    out = self._run(x)
                    loss = self._loss(mb, out) if self.is_last else None
        except Exception as e:  # noqa: BLE001 - reported with the stage's name, then re-raised
            self._fail("forward", mb, e)
        t1 = time.perf_counter()
        self.compute_s += t1 - t0
        self.trace.append(("F", mb, t0, t1))
        received = self.held.pop(mb)[0] if mb in self.held else []
        if self.is_last:
            self.losses.append(loss.detach() * (self.rows[mb] / self.total))
        if not self.grad:
            if not self.is_last:
                self.outputs[mb] = out
            return
        if self.is_last:
            self.held[mb] = (received, [loss * (self.rows[mb] / self.total)], None)
        else:
            self.held[mb] = (received, out, None)
            self.outputs[mb] = out
        self.peak_in_flight = max(self.peak_in_flight, len(self.held))

    def _run(self, x: Any) -> Any:
        # one argument, as nn.Sequential passes each layer's output to the next (a tuple stays a tuple)
        if self.checkpoint_activations:
            from torch.utils.checkpoint import checkpoint
            return checkpoint(self.module, x, use_reentrant=False)
        return self.module(x)

    def _loss(self, mb: int, out: Any) -> torch.Tensor:
        loss = self.loss_fn(out, self.targets[mb])
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ConfigError(f"loss_fn must return a scalar tensor (mean over the micro-batch), got "
                              f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        return loss

    def backward(self, mb: int) -> None:
        received, out, _ = self.held.pop(mb)
        t0 = time.perf_counter()
        try:
            if self.is_last:
                roots, grads = out, None
            else:
                _, flat = microbatch.flatten(out)
                given = self.grads_in.pop(mb)
                pairs = [(t, g) for t, g in zip([t for t in flat if _wants_grad(t)], given)]
                roots, grads = [t for t, _ in pairs], [g for _, g in pairs]
            if roots:
                with self.backward_context(mb) if self.backward_context is not None else contextlib.nullcontext():
                    torch.autograd.backward(roots, grads)
        except Exception as e:  # noqa: BLE001
            self._fail("backward", mb, e)
        if not self.is_first:
            self.grads_out[mb] = [t.grad if t.grad is not None else torch.zeros_like(t) for t in received]
        t1 = time.perf_counter()
        self.compute_s += t1 - t0
        self.trace.append(("B", mb, t0, t1))

    # ---- transfers (each a no-op at the end of the pipeline it would cross)
    def _receive_forward(self, mb: int):
        if self.prev is None:
            return None

        def gen():
            skeleton, tensors = yield from self.prev.receive_activation()
            x = rebuild(skeleton, tensors)
            self.inputs[mb] = x
            wanting = [t for t in tensors if t.requires_grad]
            self.held[mb] = (wanting, None, skeleton)
        return gen()

    def _receive_backward(self, mb: int):
        if self.next is None:
            return None
        _, flat = microbatch.flatten(self.held[mb][1])
        specs = [microbatch.Leaf(t) for t in flat if _wants_grad(t)]

        def gen():
            self.grads_in[mb] = yield from Link.receive_gradients(specs)
        return gen()

    def _forward_chunks(self, mb: int) -> List[torch.Tensor]:
        if self.next is None:
            return []
        return self.next.activation_chunks(self.outputs.pop(mb))

    def _backward_chunks(self, mb: int) -> List[torch.Tensor]:
        if self.prev is None:
            return []
        return Link.gradient_chunks(self.grads_out.pop(mb))

    def _trade(self, link: Optional[Link], sends: List[torch.Tensor], receive) -> None:
        if link is not None:
            link.trade(sends, receive)

    def recv_forward(self, mb: int) -> None:
        self._trade(self.prev, [], self._receive_forward(mb))

    def send_forward(self, mb: int) -> None:
        if self.next is None:
            self.outputs.pop(mb, None)
            return
        self._trade(self.next, self._forward_chunks(mb), None)

    def recv_backward(self, mb: int) -> None:
        self._trade(self.next, [], self._receive_backward(mb))

    def send_backward(self, mb: int) -> None:
        if self.prev is None:
            self.grads_out.pop(mb, None)
            return
        self._trade(self.prev, self._backward_chunks(mb), None)

    def send_forward_recv_backward(self, send_mb: int, recv_mb: int) -> None:
        """Activations of `send_mb` to the next stage while its gradients for `recv_mb` come back."""
        if self.next is None:
            self.outputs.pop(send_mb, None)
            return
        self._trade(self.next, self._forward_chunks(send_mb), self._receive_backward(recv_mb))

    def send_backward_recv_forward(self, send_mb: int, recv_mb: int) -> None:
        """Gradients of `send_mb` to the previous stage while the input of `recv_mb` comes in."""
        if self.prev is None:
            self.grads_out.pop(send_mb, None)
            return
        self._trade(self.prev, self._backward_chunks(send_mb), self._receive_forward(recv_mb))


def _wants_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and (t.is_floating_point() or t.is_complex())

