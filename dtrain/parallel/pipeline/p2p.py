"""Moving activations forward and their gradients back between neighbouring stages.

A forward message is a 16-byte header (skeleton bytes, tensor count), the pickled skeleton of
the structure when it differs from the last one sent on that link, then each tensor's bytes. A
backward message is the gradient of each tensor that asked for one, in order: the receiver of
the activations knows their shapes, so it needs no header.

Every transfer is a run of dtrain sendrecv calls that pair this side's next send with its next
receive from the same neighbour, so two neighbours trading activations for gradients never wait
on each other's send (send-then-recv of tensors larger than a transport's buffer would).
"""

from __future__ import annotations

import pickle
from typing import Any, Generator, List, Optional

import torch

from dtrain.comm.api import sendrecv
from dtrain.errors import CommError
from dtrain.parallel.pipeline.microbatch import Leaf, flatten, leaves, unflatten

# A receive is a generator: it yields the uint8 buffer to fill next and returns the result.
Receive = Generator[torch.Tensor, None, Any]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """`t`'s memory as a flat uint8 tensor (a copy only when `t` is not contiguous)."""
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _empty_like_leaf(leaf: Leaf) -> torch.Tensor:
    return torch.empty(leaf.shape, dtype=leaf.dtype)


class Link:
    """This stage's side of the connection to one neighbour (a rank of `group`)."""

    def __init__(self, group, peer: int):
        self.group = group
        self.peer = peer
        self._sent_skeleton: Any = None
        self._recv_skeleton: Any = None

    # ---- encoding
    def activation_chunks(self, obj: Any) -> List[torch.Tensor]:
        skeleton, tensors = flatten(obj)
        # compared as objects (Leaf has __eq__): pickled only when it changed, not every micro-batch
        fresh = self._sent_skeleton is None or skeleton != self._sent_skeleton
        raw = pickle.dumps(skeleton) if fresh else b""
        self._sent_skeleton = skeleton
        header = torch.tensor([len(raw), len(tensors)], dtype=torch.int64)
        chunks = [header.view(torch.uint8)]
        if fresh:
            chunks.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        return chunks + [as_bytes(t) for t in tensors]

    def receive_activation(self) -> Receive:
        header = torch.empty(2, dtype=torch.int64)
        yield header.view(torch.uint8)
        skel_len, count = header.tolist()
        if skel_len:
            raw = torch.empty(skel_len, dtype=torch.uint8)
            yield raw
            self._recv_skeleton = pickle.loads(raw.numpy().tobytes())
        skeleton = self._recv_skeleton
        specs = leaves(skeleton)
        if len(specs) != count:
            raise CommError(f"pipeline message from rank {self.group.ranks[self.peer]} out of step: its header "
                            f"announces {count} tensors, the structure holds {len(specs)}")
        tensors = []
        for leaf in specs:
            t = _empty_like_leaf(leaf)
            if t.numel():
                yield t.view(-1).view(torch.uint8)
            tensors.append(t)
        return skeleton, tensors

    @staticmethod
    def gradient_chunks(grads: List[torch.Tensor]) -> List[torch.Tensor]:
        return [as_bytes(g) for g in grads if g.numel()]

    @staticmethod
    def receive_gradients(specs: List[Leaf]) -> Receive:
        grads = []
        for leaf in specs:
            g = _empty_like_leaf(leaf)
            if g.numel():
                yield g.view(-1).view(torch.uint8)
            grads.append(g)
        return grads

    # ---- moving
    def trade(self, sends: List[torch.Tensor], receive: Optional[Receive]) -> Any:
        """Sends `sends` to the peer while running `receive` against it; returns what it returns."""
        result = None
        pending = list(sends)
        nxt = None
        if receive is not None:
            try:
                nxt = next(receive)
            except StopIteration as stop:
                receive, result = None, stop.value
        while pending or nxt is not None:
            out = pending.pop(0) if pending else None
            sendrecv(out, self.peer if out is not None else None, nxt, self.peer if nxt is not None else None,
                     group=self.group)
            if nxt is not None:
                try:
                    nxt = receive.send(None)
                except StopIteration as stop:
                    nxt, result = None, stop.value
        return result


def rebuild(skeleton: Any, tensors: List[torch.Tensor]) -> Any:
    """The received structure, its floating tensors asking for gradients where the sender's did."""
    for leaf, t in zip(leaves(skeleton), tensors):
        if leaf.requires_grad:
            t.requires_grad_(True)
    return unflatten(skeleton, tensors)
