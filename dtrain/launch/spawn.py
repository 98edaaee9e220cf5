"""dtrain.launch.run(fn, nprocs=N): call a function on N fresh processes (tests, notebooks)."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import secrets
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence

from dtrain.errors import CommTimeout
from dtrain.launch.local import RankFailed, describe_exit, job_env, store_listener


def _child(fn, args, rank, env, conn, listener):
    os.environ.clear()
    os.environ.update(env)
    if listener is not None:  # rank 0 serves the rendezvous store on the socket the parent bound
        os.environ["DTRAIN_STORE_FD"] = str(listener.detach())
    try:
        result = fn(*args)
        # Plain pickle, not multiprocessing's: torch would share a tensor's storage through a
        # file descriptor that dies with this process before the parent reads it.
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException as e:  # report everything, SystemExit included, to the parent
        conn.send_bytes(pickle.dumps(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
    finally:
        conn.close()


_START_METHODS = ("spawn", "forkserver")


def run(fn: Callable[..., Any], nprocs: int, args: Sequence[Any] = (), timeout: Optional[float] = None,
        env: Optional[dict] = None, start_method: str = "spawn") -> List[Any]:
    """Runs ``fn(*args)`` on `nprocs` new processes that form one dtrain job.

    `fn` must be importable (defined at module level). Each process gets the env
    contract, so ``dtrain.init()`` inside `fn` joins the job.

    `start_method` is "spawn" (a fresh interpreter per rank, as torch.multiprocessing.spawn)
    or "forkserver": one server process per calling process imports torch once and forks
    every later rank from it, saving the ~1.4 s import per rank when a process calls run()
    many times (a test suite). Ranks from the server see the environment of the first
    call's time when torch is imported (OMP_NUM_THREADS and the like); `env` and
    os.environ at each call still reach the rank before `fn` runs. Unix only.

    Returns:
        The list of each rank's return value, in rank order.

    Raises:
        RankFailed: a rank raised or died; the message holds its traceback. The
            other ranks are stopped.
        CommTimeout: `timeout` seconds passed first.

    Example::

        def work():
            dtrain.init()
            return dtrain.allreduce(torch.ones(1)).item()

        dtrain.launch.run(work, nprocs=2)   # [2.0, 2.0]
    """
    if start_method not in _START_METHODS:
        raise ValueError(f"dtrain.launch.run: start_method={start_method!r} is not one of {_START_METHODS}; "
                         f"use \"spawn\" (the default) or \"forkserver\"")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # Read by the server when it starts (the first forkserver run of this process); later calls
        # reuse the running server, which already holds torch.
        ctx.set_forkserver_preload(["torch"])
    token = secrets.token_hex(32)
    listener = store_listener()
    port = listener.getsockname()[1]
    base = dict(os.environ)
    base.update(env or {})
    procs, conns = [], []
    try:
        for rank in range(nprocs):
            e = job_env(rank, nprocs, port, token, base)
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(fn, tuple(args), rank, e, child, listener if rank == 0 else None),
                            daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
    finally:
        listener.close()

    results: List[Any] = [None] * nprocs
    pending = set(range(nprocs))
    start = time.monotonic()
    try:
        while pending:
            for r in list(pending):
                if conns[r].poll():
                    try:
                        status, value = pickle.loads(conns[r].recv_bytes())
                    except EOFError:
                        status, value = "error", "the process closed its pipe without a result"
                    if status == "error":
                        raise RankFailed(f"rank {r} failed:\n{value}", r, procs[r].exitcode)
                    results[r] = value
                    pending.discard(r)
                elif procs[r].exitcode is not None and not conns[r].poll():
                    raise RankFailed(f"rank {r} died ({describe_exit(procs[r].exitcode)}) without a result",
                                     r, procs[r].exitcode)
            if timeout is not None and time.monotonic() - start > timeout:
                raise CommTimeout(f"dtrain.launch.run: rank(s) {sorted(pending)} still running after {timeout} s")
            time.sleep(0.01)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return results
