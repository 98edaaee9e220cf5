"""Train a small CNN on scikit-learn's handwritten digits (1,797 real 8x8 images, bundled, no download).

    python examples/train_digits.py                                  # one process
    dtrain-run -n 2 examples/train_digits.py --compression fp16       # two ranks, fp16 gradients
    dtrain-run -n 2 examples/train_digits.py --resume                 # go on from the last checkpoint
    dtrain-run -n 3 examples/train_digits.py --strategy ps            # 1 parameter server, 2 async workers

The same script runs either way: AllReduceStrategy is plain training when the world
size is 1. With --strategy ps the first --num-servers ranks serve the parameters and
the others train asynchronously (--staleness bounds how far apart they may run). Rank 0 shows a progress bar, logs loss and accuracy per epoch, saves a
checkpoint after each epoch (atomically) and prints a summary. Exits with status 1
if the final test accuracy is below --min-accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import dtrain


def load_digits_split(seed: int = 0):
    """(train, test) TensorDatasets: images scaled to [0, 1] as (N, 1, 8, 8), a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install -e '.[examples]'")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    tr, te = order[:cut], order[cut:]
    return (torch.utils.data.TensorDataset(x[tr], y[tr]), torch.utils.data.TensorDataset(x[te], y[te]))


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    x, y = data.tensors
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False, ncols=80, file=sys.stdout, mininterval=0.2)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train a CNN on the bundled digits with dtrain.")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (split across ranks)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--compression", choices=["none", "fp16", "bf16"], default="none")
    ap.add_argument("--checkpoint", default="runs/digits", help="checkpoint folder")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint if there is one")
    ap.add_argument("--min-accuracy", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", choices=["allreduce", "ps"], default="allreduce")
    ap.add_argument("--num-servers", type=int, default=1, help="parameter servers (--strategy ps)")
    ap.add_argument("--staleness", type=int, default=None,
                    help="--strategy ps: how many steps a worker may run ahead (default: fully asynchronous)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1 if os.environ.get("DTRAIN_WORLD_SIZE", "1") != "1" else torch.get_num_threads())
    compression = None if args.compression == "none" else args.compression
    if args.strategy == "ps":
        dtrain.init()
        strategy = dtrain.ParameterServerStrategy(args.num_servers, staleness=args.staleness,
                                                  compression=compression)
        rank, world = strategy.rank, strategy.num_workers  # the ranks that train
    else:
        strategy = dtrain.AllReduceStrategy(compression=compression)
        rank, world = strategy.rank, strategy.world_size
    serving = getattr(strategy, "is_server", False)
    main_rank = strategy.is_main
    if args.batch_size % world:
        sys.exit(f"--batch-size {args.batch_size} must divide by the {world} ranks")

    torch.manual_seed(args.seed)
    train, test = load_digits_split(args.seed)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer = strategy.prepare(model, optimizer)
    loader = strategy.distribute(train, batch_size=args.batch_size // world, seed=args.seed)

    start_epoch = 0
    ckpt_file = os.path.join(args.checkpoint, "checkpoint.pt")
    if args.resume and os.path.exists(ckpt_file):
        state = strategy.load(args.checkpoint, model=model, optimizer=optimizer)
        start_epoch = state["step"]
        if not serving:
            loader.sampler.set_epoch(start_epoch)
        if main_rank:
            print(f"resumed from {ckpt_file} after epoch {start_epoch}", flush=True)
    wire = getattr(strategy, "wire", compression) or "float32"
    if args.strategy == "allreduce" and args.compression != "none" and strategy.wire is None and world > 1:
        wire += f" ({args.compression} asked; ranks sharing memory send float32, DTRAIN_SHM_COMPRESSION=1 forces it)"
    if main_rank:
        how = (f"{strategy.num_servers} server(s) + {world} worker(s), staleness {args.staleness}"
               if args.strategy == "ps" else f"{world} rank(s)")
        print(f"training DigitsNet on {len(train)} digits ({len(test)} held out), {how}, "
              f"global batch {args.batch_size}, wire {wire}", flush=True)

    samples, train_time = 0, 0.0
    acc = accuracy(model, test)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        total, count = 0.0, 0
        for x, y in progress(loader, main_rank, f"epoch {epoch + 1}/{args.epochs}"):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
            samples += x.shape[0] * world
        train_time += time.perf_counter() - t0
        acc = accuracy(model, test)
        m = strategy.reduce_metrics({"loss": total / max(count, 1), "acc": acc})
        strategy.save(args.checkpoint, model=model, optimizer=optimizer, step=epoch + 1)
        if main_rank:
            print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {m['loss']:.4f}  test accuracy {m['acc']:.4f}",
                  flush=True)

    if main_rank:
        rate = samples / train_time if train_time else float("nan")
        rows = [("ranks", str(world)), ("wire", wire),
                ("epochs", f"{start_epoch}->{args.epochs}"), ("train time", f"{train_time:.2f} s"),
                ("samples/s", f"{rate:,.0f}"), ("test accuracy", f"{acc:.4f}"), ("checkpoint", ckpt_file)]
        width = max(len(k) for k, _ in rows)
        print("\nsummary\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)
    dtrain.shutdown()
    if serving:
        return 0  # the trained model lives on the workers
    if acc < args.min_accuracy:
        print(f"rank {rank}: test accuracy {acc:.4f} is below --min-accuracy {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
