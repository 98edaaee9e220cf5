"""Train a small character-level transformer language model on Python's own argparse.py source
(it ships with every Python: no download), split across ranks by layers or within layers.

    python examples/train_transformer_pipeline.py                                       # one process
    dtrain-run -n 2 examples/train_transformer_pipeline.py --parallel pipeline           # 2 pipeline stages
    dtrain-run -n 2 examples/train_transformer_pipeline.py --parallel tensor             # 2-way tensor parallel
    dtrain-run -n 4 examples/train_transformer_pipeline.py --parallel pipeline           # 4 stages
    dtrain-run -n 4 examples/train_transformer_pipeline.py --parallel tensor --model-parallel 2   # 2 TP x 2 DP

--model-parallel K (default: every rank) cuts the world into replicas of K ranks
(dtrain.parallel.Mesh); the replicas train data-parallel with AllReduceStrategy, each on
its share of every batch. Whatever the layout, the same --seed gives the same model and the
same batches, so the loss curves agree with the one-process run up to float32 rounding.

The model is built once from dtrain.parallel.tensor layers: with a tensor-parallel group of
one rank (one process, or a pipeline stage) they are plain torch layers. Rank 0 shows a
progress bar, logs the loss, evaluates on the held-out end of the text, saves a checkpoint
(one shard per model-parallel rank) and prints a summary; exits with status 1 if the final
validation loss is above --max-val-loss.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn

import dtrain
from dtrain.parallel import Mesh
from dtrain.parallel.tensor import (ColumnParallelLinear, ParallelMLP, ParallelSelfAttention, VocabParallelEmbedding,
                                    vocab_parallel_cross_entropy)


def load_text():
    """(train ids, validation ids, alphabet): argparse.py as characters, the last 10% held out."""
    import argparse as source
    with open(source.__file__, encoding="utf-8") as f:
        text = f.read()
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], alphabet


def batch(ids: torch.Tensor, rows: int, length: int, step: int, seed: int):
    """`rows` random windows of `length` + 1 characters: (inputs, next characters). The same on
    every rank for the same step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - length - 1, (rows,), generator=g)
    windows = torch.stack([ids[s:s + length + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


class Embed(nn.Module):
    def __init__(self, vocab, d, length, group):
        super().__init__()
        self.tok = VocabParallelEmbedding(vocab, d, group=group)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)

    def forward(self, x):
        return self.tok(x) + self.pos[: x.shape[1]]


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, d, heads, group):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = ParallelSelfAttention(d, heads, causal=True, group=group)
        self.mlp = ParallelMLP(d, 4 * d, group=group)

    def forward(self, x):
        x = x + self.att(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final norm and the vocabulary projection; with tensor parallelism each rank keeps its slice
    of the logits (the loss is computed without gathering them)."""

    def __init__(self, d, vocab, group):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.proj = ColumnParallelLinear(d, vocab, gather_output=False, group=group)

    def forward(self, x):
        return self.proj(self.ln(x))


def build(vocab, args, group):
    torch.manual_seed(args.seed)
    return nn.Sequential(Embed(vocab, args.d, args.length, group),
                         *[Block(args.d, args.heads, group) for _ in range(args.layers)],
                         Head(args.d, vocab, group))


def progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False, ncols=80, file=sys.stdout, mininterval=0.2)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Character-level transformer LM with pipeline or tensor parallelism.")
    ap.add_argument("--parallel", choices=["pipeline", "tensor"], default="pipeline")
    ap.add_argument("--model-parallel", type=int, default=None,
                    help="ranks per model replica (stages or tensor-parallel ranks); default: all of them")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch of windows")
    ap.add_argument("--micro-batches", type=int, default=4, help="--parallel pipeline: micro-batches per step")
    ap.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    ap.add_argument("--length", type=int, default=64, help="characters per window")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--checkpoint", default="runs/charlm", help="checkpoint folder")
    ap.add_argument("--max-val-loss", type=float, default=2.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    dtrain.init()
    world = dtrain.world_size()
    torch.set_num_threads(1 if world > 1 else torch.get_num_threads())
    k = args.model_parallel or world
    if world % k:
        sys.exit(f"--model-parallel {k} must divide the {world} ranks")
    mesh = Mesh(model=k)
    replicas = mesh.data_size
    if args.batch_size % (replicas * args.micro_batches if args.parallel == "pipeline" else replicas):
        sys.exit(f"--batch-size {args.batch_size} must divide by the {replicas} replica(s)"
                 + (f" times --micro-batches {args.micro_batches}" if args.parallel == "pipeline" else ""))
    train_ids, val_ids, alphabet = load_text()
    vocab = len(alphabet)

    # the tensor-parallel group: the model group, or (pipeline) this rank alone
    if args.parallel == "tensor":
        tp = mesh.model
    else:
        singles = [dtrain.new_group([r]) for r in range(world)]
        tp = singles[dtrain.rank()]
    model = build(vocab, args, tp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def loss_fn(logits, targets):
        return vocab_parallel_cross_entropy(logits, targets, group=tp)

    pipe = None
    if args.parallel == "pipeline":
        pipe = dtrain.PipelineStrategy(micro_batches=args.micro_batches, schedule=args.schedule, group=mesh.model)
        model, optimizer = pipe.prepare(model, optimizer)
    dp = dtrain.AllReduceStrategy(group=mesh.data)
    model, optimizer = dp.prepare(model, optimizer)
    main_rank = dtrain.rank() == 0
    rows = args.batch_size // replicas
    mine = slice(mesh.data_rank * rows, (mesh.data_rank + 1) * rows)

    def step_loss(x, y, train: bool) -> float:
        if pipe is not None:
            run = pipe.train_step if train else pipe.eval_step
            return run((x, y), loss_fn).item()
        if not train:
            with torch.no_grad():
                return loss_fn(model(x), y).item()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss.item()

    def evaluate() -> float:
        model.eval()
        total = 0.0
        for i in range(4):
            x, y = batch(val_ids, args.batch_size, args.length, 10_000_000 + i, args.seed)
            total += step_loss(x[mine], y[mine], train=False)
        model.train()
        return dp.reduce_metrics({"val": total / 4})["val"]

    params = sum(p.numel() for p in model.parameters())
    if main_rank:
        layout = (f"{k} {'stages' if args.parallel == 'pipeline' else 'tensor-parallel ranks'} x {replicas} "
                  f"data-parallel replica(s)")
        print(f"char LM on argparse.py: {len(train_ids):,} training characters, vocabulary {vocab}; "
              f"{args.layers} blocks of width {args.d}, {layout}; rank 0 holds {params:,} parameters", flush=True)
    val0 = evaluate()
    t0 = time.perf_counter()
    losses = []
    for step in progress(range(args.steps), main_rank, "training"):
        x, y = batch(train_ids, args.batch_size, args.length, step, args.seed)
        optimizer.zero_grad()
        loss = dp.reduce_metrics({"loss": step_loss(x[mine], y[mine], train=True)})["loss"]
        optimizer.step()
        losses.append(loss)
        if main_rank and step == 0:
            print(f"step 1 loss {loss:.6f}", flush=True)
        if main_rank and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            recent = losses[-args.eval_every:]
            print(f"step {step + 1:4d}/{args.steps}  train loss {sum(recent) / len(recent):.4f}", flush=True)
    train_time = time.perf_counter() - t0
    val = evaluate()
    shard = (mesh.model_rank, mesh.model_size)
    if pipe is not None:
        ckpt = pipe.save(args.checkpoint, optimizer=optimizer, step=args.steps)
    else:
        ckpt = dp.save(args.checkpoint, model=model, optimizer=optimizer, step=args.steps, shard=shard)
    if main_rank:
        tokens = args.steps * args.batch_size * args.length
        extra = []
        if pipe is not None:
            st = pipe.stats()
            ideal = (k - 1) / (args.micro_batches + k - 1)
            extra = [("pipeline", f"{args.schedule}, {args.micro_batches} micro-batches; stage 0: layers "
                                  f"{st['layers'][0]}-{st['layers'][1] - 1}, idle {st['bubble']:.2f} of its step "
                                  f"(ideal {ideal:.2f})")]
        rows_out = [("ranks", f"{world} ({args.parallel}, model-parallel {k} x data-parallel {replicas})"),
                    ("steps", str(args.steps)), ("train time", f"{train_time:.1f} s"),
                    ("tokens/s", f"{tokens / train_time:,.0f}"), *extra,
                    ("val loss", f"{val0:.4f} -> {val:.4f} (uniform guess {math.log(vocab):.4f})"),
                    ("checkpoint", os.path.dirname(ckpt) + f" ({mesh.model_size} shard(s))")]
        width = max(len(name) for name, _ in rows_out)
        print("\nsummary\n" + "\n".join(f"  {name:<{width}}  {v}" for name, v in rows_out), flush=True)
    dtrain.shutdown()
    if val > args.max_val_loss:
        print(f"rank {mesh.model_rank}: validation loss {val:.4f} is above --max-val-loss {args.max_val_loss}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
