"""One parameter-server job for tests/multiproc/test_param_server.py, run with dtrain-run.

    dtrain-run -n N ps_job.py MODE OUT_DIR [key=value ...]

Every worker writes OUT_DIR/worker-<rank>.json (what it measured); nothing is printed
that a test parses. Modes:
    parity     staleness=0 against one process training on both workers' batches
    straggler  the last worker sleeps every step; the first records how far ahead it ran
    kill       worker rank `victim` kills itself at step `at`; the others train on
    server     rank 0 (a server) dies once a worker has reached step `at`
    resume     trains `steps` steps saving every `every`; on the first attempt the server dies
               at step `crash` (a file from the worker tells it when); --max-restarts resumes
"""

import json
import os
import sys
import threading
import time

import torch

import dtrain

MODE, OUT = sys.argv[1], sys.argv[2]
ARGS = dict(a.split("=", 1) for a in sys.argv[3:])
OPT = ARGS.get("opt", "sgd")
SERVERS = int(ARGS.get("servers", "1"))
STALENESS = None if ARGS.get("staleness", "none") == "none" else int(ARGS["staleness"])
COMPRESSION = ARGS.get("compression") or None
STEPS = int(ARGS.get("steps", "12"))
MODEL = ARGS.get("model", "odd")
ATTEMPT = int(os.environ.get("DTRAIN_RESTART_COUNT", "0"))


def build():
    torch.manual_seed(0)
    if MODEL == "tiny":  # fewer elements than servers can split evenly; some shards may be empty
        return torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False))
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def optimizer(model):
    first, rest = list(model[0].parameters()), [p for m in list(model)[1:] for p in m.parameters()]
    groups = [{"params": first}] + ([{"params": rest, "lr": 0.03}] if rest else [])
    if OPT == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if OPT == "adam":
        return torch.optim.Adam(groups, lr=0.01, weight_decay=1e-3)
    return torch.optim.AdamW(groups, lr=0.01, weight_decay=0.05)


def batch(step, workers):
    """Step `step`'s global batch: 16 rows per worker, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    n = 16 * workers
    x = torch.randn(n, 7 if MODEL == "odd" else 1, generator=g)
    y = torch.randint(0, 3, (n,), generator=g) if MODEL == "odd" else torch.randn(n, 1, generator=g)
    return x, y


def loss_fn(out, y):
    return torch.nn.functional.cross_entropy(out, y) if MODEL == "odd" else torch.nn.functional.mse_loss(out, y)


def write(name, obj):
    path = os.path.join(OUT, name)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def die_when(flag):
    """On a server (busy serving inside prepare): exit at once when `flag` appears."""
    def watch():
        while not os.path.exists(flag):
            time.sleep(0.01)
        os._exit(7)
    threading.Thread(target=watch, daemon=True).start()


def main():
    dtrain.init(timeout=float(ARGS.get("timeout", "60")))
    strategy = dtrain.ParameterServerStrategy(num_servers=SERVERS, staleness=STALENESS, compression=COMPRESSION)
    model = build()
    opt = optimizer(model)
    if MODE == "server" and dtrain.rank() == 0:
        die_when(os.path.join(OUT, "kill-server"))
    if MODE == "resume" and dtrain.rank() == 0 and ATTEMPT == 0:
        die_when(os.path.join(OUT, "kill-server"))
    model, opt = strategy.prepare(model, opt)
    if strategy.is_server:
        dtrain.shutdown()
        return
    W, w = strategy.num_workers, strategy.worker_index
    rank = dtrain.rank()
    start = 0
    ckpt = os.path.join(OUT, "ckpt")
    if MODE == "resume" and os.path.exists(os.path.join(ckpt, "checkpoint.pt")):
        start = strategy.load(ckpt, model=model, optimizer=opt)["step"]
    leads, t0 = [], time.monotonic()
    for step in range(start, STEPS):
        if MODE == "kill" and rank == int(ARGS["victim"]) and step == int(ARGS["at"]):
            os.kill(os.getpid(), 9)
        if MODE == "server" and step == int(ARGS["at"]) and w == 0:
            open(os.path.join(OUT, "kill-server"), "w").close()
        if MODE == "straggler" and w == W - 1:
            time.sleep(float(ARGS.get("sleep", "0.03")))
        x, y = batch(step, W)
        xb, yb = x[16 * w: 16 * (w + 1)], y[16 * w: 16 * (w + 1)]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        strategy.synchronize()
        leads.append(strategy.stats()["worker"]["leads"][-1] if MODE == "straggler" else 0)
        if MODE == "resume" and (step + 1) % int(ARGS["every"]) == 0:
            strategy.save(ckpt, model=model, optimizer=opt, step=step + 1)
        if MODE == "resume" and ATTEMPT == 0 and step + 1 == int(ARGS["crash"]) and w == 0:
            open(os.path.join(OUT, "kill-server"), "w").close()
            time.sleep(30)  # the server's death ends this worker's next exchange; never gets here
    stats = strategy.stats()
    if MODE == "kill":
        # Without a staleness bound this worker can finish before the victim has even reached
        # its step: wait (bounded) until every server has noticed the loss, so the snapshot
        # below shows it; a server that never does leaves it "live" and the test fails.
        victim, deadline = int(ARGS["victim"]), time.monotonic() + 20

        def noticed(st):
            return all(any(x["rank"] == victim and x["state"] == "lost" for x in s["workers"]) for s in st["servers"])
        while not noticed(stats) and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = strategy.stats()
    result = {"rank": rank, "steps": STEPS - start, "start": start, "leads": leads,
              "seconds": time.monotonic() - t0, "servers": stats["servers"],
              "params": [p.detach().reshape(-1).tolist() for p in model.parameters()]}
    if MODE == "parity":  # one process on the concatenated batch, the same optimizer
        ref = build()
        ropt = optimizer(ref)
        for step in range(STEPS):
            x, y = batch(step, W)
            ropt.zero_grad()
            loss_fn(ref(x), y).backward()
            ropt.step()
        result["diff"] = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    write(f"worker-{rank}.json", result)
    dtrain.shutdown()


if __name__ == "__main__":
    main()
