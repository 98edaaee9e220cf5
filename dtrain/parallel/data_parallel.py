"""Synchronous data parallelism: AllReduceStrategy and the gradient reducer beneath it.

How a step runs (the shape DDP and Horovod share):

* ``prepare`` broadcasts parameters, buffers and optimizer state from rank 0, puts the
  parameters into buckets of about ``bucket_mb`` (reverse registration order, the
  order backward usually produces them), and hooks every parameter's gradient
  accumulation.
* During backward, each hook copies its gradient into its bucket (a parameter with a
  bucket of its own, uncompressed, is reduced in its ``.grad`` instead). A full bucket is
  launched (an async allreduce on the C++ progress thread) as soon as every bucket
  before it has been launched, so all ranks issue the same collectives in the same
  order even when their hooks fire in different orders.
* At the end of backward (an autograd callback) parameters that got no gradient
  count as zeros, the last buckets go out, and the reduced gradients are copied
  back into ``.grad``: after ``loss.backward()`` the gradients are reduced, as with
  DDP, so gradient clipping between backward and ``step`` sees the global ones.
  A parameter that got no gradient on any rank keeps ``.grad`` as it was (None).
* After the first step the buckets are rebuilt in the order gradients actually
  became ready on rank 0 (broadcast, so every rank agrees).

fp16/bf16 wire compression sends half precision and accumulates in float32 at every
hop. For fp16 each bucket is multiplied by a power of two chosen from the previous
step's reduced maximum (identical on every rank: the reduced result is bitwise the
same everywhere) so that sums sit near 2**13, 8x below fp16's largest value and far
above its smallest; a result that still overflows, or whose largest value fell
below 1 (gradients 8192x smaller than last step), is redone in float32 and the
scale follows. The first step of each bucket goes in float32 to learn the scale.
With ``error_feedback=True`` each rank rounds its own contribution to the wire type
itself and adds what rounding lost to the next step's gradient.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Dict, List, Optional

import torch

import dtrain
from dtrain import ops
from dtrain import timeline as tl
from dtrain.comm.api import allgather_bytes, broadcast_bytes
from dtrain.comm.group import resolve
from dtrain.comm.tensors import broadcast_coalesced
from dtrain.errors import ConfigError
from dtrain.parallel import checkpoint
from dtrain.parallel.strategy import GroupStrategy

_SUM_TARGET = 2.0 ** 13  # where an fp16 bucket's largest reduced value is put
_UNDERFLOW = 1.0  # a scaled result whose largest value is below this lost bits to fp16's subnormals
_WIRE = {"fp16": torch.float16, "bf16": torch.bfloat16}


_FUSABLE = (torch.float32, torch.float16, torch.bfloat16)  # dtypes dtrain.ops.unpack takes
_SOLO_BYTES = 1 << 20  # uncompressed gradients this large are reduced in place, in a bucket of their own


def _amax(buf: torch.Tensor) -> float:
    """Largest |x| of a bucket (inf or NaN if it holds one): one fused pass, no temporary
    (torch's buf.abs().max() writes a bucket-sized one first, 15x slower at 100 MB)."""
    return float(ops.multi_tensor_norm([buf], math.inf)) if buf.numel() else 0.0


class _Bucket:
    def __init__(self, params: List[int], shapes: List[torch.Size], dtype: torch.dtype):
        self.params = params  # indices into the reducer's parameter list
        self.shapes = shapes
        sizes = [s.numel() for s in shapes]
        self.offsets = []
        off = 0
        for n in sizes:
            self.offsets.append(off)
            off += n
        self.sizes = sizes
        self.numel = off
        self.dtype = dtype
        self.elsize = torch.empty(0, dtype=dtype).element_size()
        self._buf: Optional[torch.Tensor] = None  # allocated on first use: a solo bucket may never need it
        self._shaped: Optional[List[torch.Tensor]] = None  # each parameter's span, in its shape
        self.inplace: Optional[torch.Tensor] = None  # this step's solo gradient, reduced where it lies
        self.pending = len(params)
        self.work = None
        self.scale = 1.0
        self.amax: Optional[float] = None  # largest |reduced sum| last step, for the fp16 scale
        self.wire: Optional[str] = None  # what this step's launch sent
        self.residual: Optional[torch.Tensor] = None
        self.launched = 0.0  # when this step's allreduce was queued (timeline clock)
        self.pack_scale = 1.0  # the fp16 scale, applied while gradients are copied in (no pass of its own)

    @property
    def buf(self) -> torch.Tensor:
        if self._buf is None:
            self._buf = torch.zeros(self.numel, dtype=self.dtype)
        return self._buf

    def slot(self, j: int, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The flat span of parameter j (of this bucket) in `t` (default: the bucket buffer)."""
        return (self.buf if t is None else t)[self.offsets[j]: self.offsets[j] + self.sizes[j]]

    def put(self, j: int, grad: Optional[torch.Tensor]) -> None:
        """Parameter j's gradient into the buffer; zeros for a parameter without one. (Runs in
        every gradient hook: the spans are made once, and the copy is a single call.)"""
        if self._shaped is None:
            buf = self.buf
            self._shaped = [buf[o: o + n].view(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]
        dst = self._shaped[j]
        if grad is None:
            dst.zero_()
            return
        if grad.requires_grad:  # backward(create_graph=True): the bucket takes the values only
            grad = grad.detach()
        if self.pack_scale != 1.0:
            torch.mul(grad, self.pack_scale, out=dst)
        else:
            dst.copy_(grad)


class _Reducer:
    """Buckets, hooks and the per-backward state machine of AllReduceStrategy."""

    def __init__(self, params: List[torch.nn.Parameter], group, bucket_bytes: int, compression: Optional[str],
                 error_feedback: bool, average: bool, names: Optional[List[str]] = None,
                 timeline: Optional[tl.Timeline] = None):
        self.params = params
        self.names = names or [f"param{i}" for i in range(len(params))]
        self.timeline = timeline
        self.stall_s = tl.stall_seconds()
        # Cumulative seconds and bytes (stats()): gradient copies into buckets, the progress
        # thread's transfers, backward's end blocked on them, copies back out; bytes this rank
        # sent (ring allreduce: 2(n-1)/n of each bucket's wire bytes).
        self.totals = {"pack_s": 0.0, "comm_s": 0.0, "blocked_s": 0.0, "unpack_s": 0.0, "wire_bytes": 0.0}
        self.backward_start: Optional[float] = None
        self.group = group
        self.world = group.size if group is not None else dtrain.world_size()
        self.bucket_bytes = bucket_bytes
        self.compression = compression
        self.error_feedback = error_feedback
        self.average = average
        self.enabled = True  # False inside no_sync
        self.state = "idle"  # idle -> running (hooks firing) -> done (reduced, copied out)
        self.rebuilt = False
        self.steps = 0  # finished reductions
        self.fp32_redos = 0  # fp16 buckets that overflowed and were redone in float32
        self.inplace_reductions = 0  # solo buckets reduced in .grad itself (no bucket copy)
        # Horovod's DistributedOptimizer (dtrain.horovod) drives the reducer with these:
        self.passes_per_step = 1  # backward passes whose gradients accumulate before one reduction
        self._pass = 0
        self._skipping = False  # inside a backward pass that only accumulates
        self.one_reduction_per_step = False  # a backward after a reduction, before step(), is an error
        self.densify = False  # sparse gradients are reduced dense instead of refused
        self.active = True  # False while this rank has joined (hvd.join): it sends zeros, flagged so
        self.others_active = True  # whether any rank was still training in the last reduction
        self._order: List[int] = []
        self._ready = [False] * len(params)
        self._used = bytearray(len(params))  # 1: a gradient came this step (a tensor write per hook costs ~10 us)
        self._build(list(reversed(range(len(params)))))
        self._handles = []
        me = weakref.ref(self)
        for i, p in enumerate(params):
            self._handles.append(p.register_post_accumulate_grad_hook(
                lambda param, i=i: me() is not None and me()._on_grad(i, param)))

    # ---- buckets
    def _build(self, order: List[int]) -> None:
        """Buckets over parameter indices in `order`, one dtype (and device) per bucket; a bucket
        closes when the next parameter would take it past bucket_bytes. Uncompressed, a parameter
        of _SOLO_BYTES or more (or half a bucket, for small buckets) gets a bucket of its own and
        is reduced where autograd left it: copying it into a bucket and back costs two passes over
        its bytes, a collective of its own a few microseconds."""
        spans: List[list] = []  # [indices, bytes], in the order the buckets opened
        open_: Dict[tuple, list] = {}
        solo_bytes = min(_SOLO_BYTES, self.bucket_bytes // 2) if self.compression is None else None
        for i in order:
            p = self.params[i]
            key, nbytes = (p.dtype, p.device), p.numel() * p.element_size()
            if solo_bytes is not None and nbytes >= max(solo_bytes, 1):
                spans.append([[i], nbytes])
                open_.pop(key, None)  # what comes after it opens a new bucket, launched after it
                continue
            cur = open_.get(key)
            if cur is None or (cur[0] and cur[1] + nbytes > self.bucket_bytes):
                cur = [[], 0]
                spans.append(cur)
                open_[key] = cur
            cur[0].append(i)
            cur[1] += nbytes
        self.buckets: List[_Bucket] = []
        self.where: Dict[int, tuple] = {}
        for idx, _ in spans:
            for j, i in enumerate(idx):
                self.where[i] = (len(self.buckets), j)
            self.buckets.append(_Bucket(idx, [self.params[i].shape for i in idx], self.params[idx[0]].dtype))
        self._next = 0

    def describe(self) -> List[dict]:
        return [{"params": len(b.params), "numel": b.numel, "dtype": str(b.dtype).replace("torch.", ""),
                 "bytes": b.numel * b.elsize} for b in self.buckets]

    # ---- per backward
    def _on_grad(self, i: int, p: torch.nn.Parameter) -> None:
        if not self.enabled or self._skipping:
            return
        if self.state != "running":
            if self.state == "done" and self.one_reduction_per_step:
                raise AssertionError(
                    "Gradients were computed more than backward_passes_per_step times before call to step(). "
                    "Increase backward_passes_per_step to accumulate gradients locally.")
            self._pass += 1
            if self._pass < self.passes_per_step:
                self._skipping = True  # this pass only accumulates into .grad
                torch.autograd.Variable._execution_engine.queue_callback(self._end_skip)
                return
            self._pass = 0
            self._begin()
        if self._ready[i]:
            raise ConfigError(
                f"parameter {i} (shape {tuple(p.shape)}) got a second gradient in one backward pass before it "
                "was reduced: AllReduceStrategy reduces each gradient once per backward; for several backward "
                "passes per step wrap all but the last in `with strategy.no_sync(model):`")
        self._ready[i] = True
        self._used[i] = 1
        if not self.rebuilt:
            self._order.append(i)
        bi, j = self.where[i]
        b = self.buckets[bi]
        if p.grad is not None and p.grad.is_sparse and self.densify:
            p.grad = p.grad.to_dense()
        if p.grad is not None and p.grad.is_sparse:
            raise ConfigError("sparse gradients are not supported by AllReduceStrategy: use dense "
                              "embeddings (sparse=False)")
        t0 = tl.now()
        if self.backward_start is None:
            self.backward_start = t0
        self._stage(b, j, p.grad)
        t1 = tl.now()
        self.totals["pack_s"] += t1 - t0
        if self.timeline is not None and b.inplace is None:
            self.timeline.span("pack", "reduce", t0, t1, args={"param": self.names[i], "bucket": bi})
        b.pending -= 1
        self._launch_ready()

    def _stage(self, b: _Bucket, j: int, grad: Optional[torch.Tensor]) -> None:
        """Parameter j's gradient into its bucket. A bucket of one parameter (a tensor as large as
        a bucket, or larger) sent as it is reduces the gradient where it lies: no copy in, no
        copy out, which on one host is most of what a large model's reduction costs."""
        b.inplace = None
        if self._solo(b) and grad is not None and grad.dtype == b.dtype and grad.is_contiguous():
            b.inplace = grad
        else:
            b.put(j, grad)

    def _reset(self) -> None:
        """A new reduction: nothing ready, nothing launched."""
        self.state = "running"
        self._ready = [False] * len(self.params)
        self._used = bytearray(len(self.params))
        for b in self.buckets:
            b.pending = len(b.params)
            b.work = None
            # Without error feedback, fp16 gradients are scaled as they are copied in.
            prescale = self.compression == "fp16" and not self.error_feedback and b.dtype == torch.float32
            b.pack_scale = self._fp16_scale(b) if prescale and b.amax else 1.0
        self._next = 0

    def _end_skip(self) -> None:
        self._skipping = False

    def _begin(self) -> None:
        self._reset()
        # Runs once backward has finished, on the thread that ran it.
        torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, b: _Bucket) -> None:
        wire = self.compression if b.dtype == torch.float32 else None
        if wire == "fp16" and not b.amax:
            wire = None  # first step (or an all-zero bucket): learn the scale from an exact reduction
        b.wire = wire
        b.launched = tl.now()
        wire_size = 2 if wire is not None else b.elsize
        self.totals["wire_bytes"] += b.numel * wire_size * 2.0 * (self.world - 1) / self.world
        if wire is not None:
            b.scale = self._fp16_scale(b) if wire == "fp16" and b.amax > 0 else 1.0
            if self.error_feedback:
                if b.residual is None:
                    b.residual = torch.zeros_like(b.buf)
                b.buf.add_(b.residual)
                if b.scale != 1.0:
                    b.buf.mul_(b.scale)
                q = b.buf.to(_WIRE[wire]).to(torch.float32)
                torch.sub(b.buf, q, out=b.residual)
                if b.scale != 1.0:
                    b.residual.div_(b.scale)
                b.buf.copy_(q)
            elif b.scale != b.pack_scale:
                b.buf.mul_(b.scale / b.pack_scale)  # not applied while packing (or another scale was)
        if self._solo(b):
            # Every rank makes the same call whether its gradient is reduced in place or (absent,
            # or not contiguous) from the bucket: the collective averages, nothing scales after.
            op = "avg" if self.average else "sum"
            if b.inplace is not None:
                self.inplace_reductions += 1
            b.work = dtrain.allreduce(b.buf if b.inplace is None else b.inplace, op=op, group=self.group,
                                      async_op=True)
            return
        b.work = dtrain.allreduce(b.buf, compression=wire, group=self.group, async_op=True)

    @staticmethod
    def _fp16_scale(b: _Bucket) -> float:
        """The power of two that puts this bucket's largest reduced value (last step's) near 2**13."""
        scale = 2.0 ** math.floor(math.log2(_SUM_TARGET / b.amax))
        return min(max(scale, 2.0 ** -60), 2.0 ** 60)

    def _solo(self, b: _Bucket) -> bool:
        """A bucket of one parameter, sent uncompressed: reduced in .grad when it can be."""
        return len(b.params) == 1 and self.compression is None

    def _finish(self, from_grads: bool = False) -> None:
        """End of backward: zeros for the gradients that never came (or, from step() without a
        synced backward, the accumulated .grad), launch the rest, wait, copy out."""
        for i, ready in enumerate(self._ready):
            if not ready:
                bi, j = self.where[i]
                b = self.buckets[bi]
                g = self.params[i].grad if from_grads else None
                if g is not None and g.is_sparse:
                    g = g.to_dense()
                self._stage(b, j, g)
                if g is not None:
                    self._used[i] = 1
                self._ready[i] = True
                b.pending -= 1
        self._launch_ready()
        used = torch.tensor(list(self._used) + [int(self.active)], dtype=torch.uint8)
        used_work = dtrain.allreduce(used, op="max", group=self.group, async_op=True)
        t_end = tl.now()  # backward's end: what follows is communication nobody overlapped
        native_group = resolve(self.group)
        for bi, b in enumerate(self.buckets):
            tl.wait(b.work, lambda bi=bi: self._describe_bucket(bi), native_group, self.stall_s)
        used_work.wait()
        t_synced = tl.now()
        self.totals["blocked_s"] += t_synced - t_end
        self._account(t_end, t_synced)
        used = used.tolist()
        self.others_active = bool(used[-1])
        for b in self.buckets:
            if b.inplace is not None:
                b.inplace = None  # reduced (and averaged) in .grad itself
                continue
            factor = self._unscale(b)
            if self._unpack_all(b, used, factor):
                continue
            for j, i in enumerate(b.params):
                if not used[i]:
                    continue  # no rank produced a gradient: leave .grad as the optimizer expects (None)
                p = self.params[i]
                src = b.slot(j).view(p.shape)
                # one pass: scale (the average, the fp16 scale) while copying out
                if p.grad is None:
                    p.grad = src * factor if factor != 1.0 else src.clone()
                elif factor != 1.0:
                    torch.mul(src, factor, out=p.grad)
                else:
                    p.grad.copy_(src)
        t_out = tl.now()
        self.totals["unpack_s"] += t_out - t_synced
        if self.timeline is not None:
            if self.backward_start is not None:
                self.timeline.span("backward", "step", self.backward_start, t_end)
            self.timeline.span("wait for reduction", "reduce", t_end, t_synced)
            self.timeline.span("unpack", "reduce", t_synced, t_out, args={"buckets": len(self.buckets)})
        self.backward_start = None
        self.steps += 1
        self.state = "done"
        if not self.rebuilt:
            self._rebuild()

    def _describe_bucket(self, bi: int) -> str:
        b = self.buckets[bi]
        names = [self.names[i] for i in b.params]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        return (f"gradient bucket {bi} of {len(self.buckets)} ({shown}; {b.numel} {str(b.dtype)[6:]} elements) "
                f"of reduction #{self.steps + 1}")

    def _account(self, t_end: float, t_synced: float) -> None:
        """Each bucket's transfer as the progress thread ran it, into the totals and the timeline."""
        for bi, b in enumerate(self.buckets):
            native = getattr(b.work, "_native", None)
            started, finished = getattr(native, "times", (0.0, 0.0))
            if not started:  # run inline (a synchronous backend): known only to lie in the wait
                started, finished = b.launched, t_synced
            self.totals["comm_s"] += finished - started
            if self.timeline is not None:
                self.timeline.span(f"allreduce bucket {bi}", "reduce", started, finished, row="comm",
                                   args={"params": len(b.params), "elements": b.numel,
                                         "wire": b.wire or str(b.dtype)[6:],
                                         "queued_ms": round((started - b.launched) * 1e3, 3),
                                         "in_place": b.inplace is not None})

    def _unpack_all(self, b: _Bucket, used: List[int], factor: float) -> bool:
        """The whole bucket back into its gradients in one fused pass (cast-free unpack with
        the scale), when every parameter got one and all are plain CPU float tensors.
        Returns False to leave it to the per-parameter copy."""
        if b.dtype not in _FUSABLE:
            return False
        grads = []
        for i in b.params:
            p = self.params[i]
            if not used[i] or p.device.type != "cpu":
                return False
            g = p.grad
            if g is None:
                g = torch.empty_like(p, memory_format=torch.contiguous_format)
            elif g.dtype != b.dtype or not g.is_contiguous() or g.shape != p.shape:
                return False
            grads.append(g)
        ops.unpack(b.buf, grads, scale=factor)
        for i, g in zip(b.params, grads):
            if self.params[i].grad is None:
                self.params[i].grad = g
        return True

    def _unscale(self, b: _Bucket) -> float:
        """Checks an fp16 result (redoing it in float32 if it over- or underflowed) and returns
        the factor that turns the bucket into the gradient (1/scale, and 1/world to average)."""
        if b.wire == "fp16" or (self.compression == "fp16" and b.dtype == torch.float32):
            amax = _amax(b.buf)
            if b.wire == "fp16" and not (_UNDERFLOW <= amax < math.inf):
                # The gradients grew past the old scale and overflowed (or a rank sent inf/nan), or
                # shrank so far that they sat among fp16's subnormals: redo this bucket exactly. Every
                # rank decides alike, since the reduced result, inf included, is bitwise the same.
                self.fp32_redos += 1
                b.pack_scale = 1.0  # the redo sends the gradients as they are
                self._repack(b)
                if b.residual is not None:
                    b.residual.zero_()  # the redo is exact: nothing of this step is left to feed back
                dtrain.allreduce(b.buf, group=self.group)
                b.scale = 1.0
                amax = _amax(b.buf)
            # in gradient units (the buffer holds them times the scale), so the next scale is right
            b.amax = amax / b.scale if math.isfinite(amax) else None
        factor = 1.0 / b.scale
        if self.average and not self._solo(b):  # a solo bucket's collective averaged already
            factor /= self.world
        return factor

    def _repack(self, b: _Bucket) -> None:
        for j, i in enumerate(b.params):
            b.put(j, self.params[i].grad if self._used[i] else None)

    def _rebuild(self) -> None:
        """Buckets in the order rank 0's gradients became ready (every rank takes rank 0's)."""
        self.rebuilt = True
        n = len(self.params)
        seen = set(self._order)
        order = self._order + [i for i in reversed(range(n)) if i not in seen]
        t = torch.tensor(order, dtype=torch.int64)
        dtrain.broadcast(t, root=0, group=self.group)
        order = t.tolist()
        if order == [i for b in self.buckets for i in b.params]:
            return
        amax = max((b.amax for b in self.buckets if b.amax is not None), default=None)
        residual = self._residuals()
        self._build(order)
        for b in self.buckets:
            b.amax = amax
            if residual is not None:
                b.residual = torch.cat([residual[i] for i in b.params]) if b.params else None

    def _residuals(self) -> Optional[Dict[int, torch.Tensor]]:
        if not self.error_feedback or all(b.residual is None for b in self.buckets):
            return None
        out = {}
        for b in self.buckets:
            for j, i in enumerate(b.params):
                if b.residual is None:
                    out[i] = torch.zeros(b.sizes[j], dtype=b.dtype)
                else:
                    out[i] = b.slot(j, b.residual).clone()
        return out

    # ---- around optimizer.step
    def before_step(self) -> None:
        # A rank whose backward touched no parameter never ran a hook, and gradients accumulated
        # under no_sync with no synced backward after them were never sent: reduce .grad as it
        # stands now, so no rank is left waiting.
        if self.enabled and self.state == "idle":
            self._pass = 0
            self._reset()
            self._finish(from_grads=True)


    def after_step(self) -> None:
        if self.enabled:
            self.state = "idle"

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


_OWNERS: "weakref.WeakKeyDictionary[torch.nn.Module, AllReduceStrategy]" = weakref.WeakKeyDictionary()


def data_parallel_of(module: torch.nn.Module) -> Optional["AllReduceStrategy"]:
    """The AllReduceStrategy that prepared `module`, if any (a pipeline stage asks, to reduce
    its gradients once per step rather than once per micro-batch)."""
    return _OWNERS.get(module)


class AllReduceStrategy(GroupStrategy):
    """Synchronous data parallelism over the native collectives.

    Args:
        compression: None, "fp16" or "bf16": gradients travel in half precision and
            accumulate in float32 at every hop (float32 parameters; others go as they are).
        bucket_mb: bucket size in MiB; smaller buckets start communicating earlier,
            larger ones make fewer calls.
        error_feedback: keep each rank's rounding residual and add it to the next step.
        average: divide the summed gradients by the number of ranks (as DDP does).
        backend: None (dtrain.init's choice), "native", "mpi" (through mpi4py, under mpirun) or
            "torch" (through torch.distributed's gloo).
        group: a dtrain.Group to reduce over (for example the data-parallel replicas of
            a 2-D layout); None is the whole world.
        timeline: path of a Chrome trace of every phase and bucket on every rank, written by
            rank 0 at dtrain.shutdown() (default: DTRAIN_TIMELINE, if set). See dtrain.timeline.

    Example (``dtrain-run -n 2 train.py``)::

        strategy = dtrain.AllReduceStrategy(compression="fp16")
        model, optimizer = strategy.prepare(model, optimizer)
        for x, y in strategy.distribute(dataset, batch_size=64):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()     # gradients are averaged across ranks here
            optimizer.step()
    """

    def __init__(self, compression: Optional[str] = None, bucket_mb: float = 25, error_feedback: bool = False,
                 average: bool = True, backend: Optional[str] = None, group: Optional["dtrain.Group"] = None,
                 timeline: Optional[str] = None):
        super().__init__(group)
        if compression not in (None, "none", "fp16", "bf16"):
            raise ConfigError(f"compression must be None, 'fp16' or 'bf16', got {compression!r}")
        if not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
            raise ConfigError(f"bucket_mb must be a positive number of MiB, got {bucket_mb!r}")
        if backend not in (None, "native", "mpi", "torch"):
            raise ConfigError(f"backend {backend!r} is not available to AllReduceStrategy in this build: "
                              "use None, 'native', 'mpi' or 'torch'")
        self.compression = None if compression == "none" else compression
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.error_feedback = bool(error_feedback)
        self.average = bool(average)
        if not dtrain.is_initialized():
            dtrain.init(backend=backend)
        self.reducer: Optional[_Reducer] = None
        self.wire: Optional[str] = None  # what gradients travel as, once prepared
        self.timeline = tl.from_env(timeline, group)

    def prepare(self, model, optimizer=None):
        """Makes every rank start identical and hooks gradient reduction. Returns (model, optimizer),
        the same objects (state_dict keys stay unchanged)."""
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"prepare() takes a torch.nn.Module, got {type(model).__name__}")
        if self.reducer is not None:
            raise ConfigError("this AllReduceStrategy already prepared a model: make one strategy per model")
        self._broadcast_module(model)
        _OWNERS[model] = self
        if optimizer is not None:
            self._broadcast_optimizer(optimizer)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weights appear once
        params = [p for _, p in named]
        if self.timeline is not None:
            self._trace_phases(model, optimizer)
        if self.world_size > 1 and params:
            # On a group that shares one host's memory the native backend sends float32 whatever
            # is asked (halving bytes there saves less than converting costs), so the reducer does
            # not round either: the result is the exact one. DTRAIN_SHM_COMPRESSION=1 forces the wire.
            self.wire = self.compression if resolve(self._group).compress_wire else None
            self.reducer = _Reducer(params, self._group, self.bucket_bytes, self.wire,
                                    self.error_feedback, self.average, names=[n for n, _ in named],
                                    timeline=self.timeline)
            if optimizer is not None:
                reducer = self.reducer
                optimizer.register_step_pre_hook(lambda *a: reducer.before_step())
                optimizer.register_step_post_hook(lambda *a: reducer.after_step())
        return model, optimizer

    def _trace_phases(self, model: torch.nn.Module, optimizer) -> None:
        """Forward and optimizer spans on the timeline (backward and buckets come from the reducer)."""
        t = self.timeline
        mark = {}
        model.register_forward_pre_hook(lambda *a: mark.__setitem__("fwd", tl.now()))
        model.register_forward_hook(lambda *a: t.span("forward", "step", mark.pop("fwd", tl.now()), tl.now()))
        if optimizer is not None:
            optimizer.register_step_pre_hook(lambda *a: mark.__setitem__("opt", tl.now()))
            optimizer.register_step_post_hook(
                lambda *a: t.span("optimizer step", "step", mark.pop("opt", tl.now()), tl.now()))

    def stats(self) -> Dict[str, float]:
        """Where reduction time went since prepare(), summed over steps: ``steps``; ``pack_s``
        (gradients copied into buckets during backward); ``comm_s`` (the progress thread's
        transfers, overlapped or not); ``blocked_s`` (backward's end waiting for them: the exposed
        communication); ``unpack_s`` (reduced gradients copied back); ``wire_bytes`` (bytes this
        rank sent, ring algorithm: 2(n-1)/n of each bucket). Zeros on one rank."""
        r = self.reducer
        out = {"steps": r.steps if r else 0}
        out.update(r.totals if r else {k: 0.0 for k in ("pack_s", "comm_s", "blocked_s", "unpack_s", "wire_bytes")})
        return out

    def _broadcast_module(self, model: torch.nn.Module) -> None:
        if self.world_size == 1:
            return

        def send(t: torch.Tensor) -> None:
            if t.dtype == torch.bool:  # no native bool: as bytes
                u = t.to(torch.uint8)
                dtrain.broadcast(u, root=0, group=self._group)
                t.copy_(u.bool())
            else:
                dtrain.broadcast(t, root=0, group=self._group)

        broadcast_coalesced([p.data for p in model.parameters()] + list(model.buffers()), send)

    def _broadcast_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self.world_size == 1:
            return
        payload = checkpoint.serialize(optimizer.state_dict()) if self.rank == 0 else b""
        payload = broadcast_bytes(payload, root=0, group=self._group)
        if self.rank != 0:
            optimizer.load_state_dict(checkpoint.deserialize(payload))

    @contextlib.contextmanager
    def no_sync(self, model: Optional[torch.nn.Module] = None):
        r = self.reducer
        if r is None:
            yield
            return
        prev = r.enabled
        r.enabled = False
        try:
            yield
        finally:
            r.enabled = prev

    def _gather_rng(self) -> list:
        mine = checkpoint.rng_state()
        if self.world_size == 1:
            return [mine]
        return [checkpoint.deserialize(b) for b in allgather_bytes(checkpoint.serialize(mine), group=self._group)]


__all__ = ["AllReduceStrategy"]
