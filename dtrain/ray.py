"""Running a dtrain job on a Ray cluster: one actor per rank, in a placement group.

    import dtrain.ray
    result = dtrain.ray.run(train, num_workers=4, args=(config,))        # rank 0's return value
    dtrain.ray.run(train, num_workers=8, resources_per_worker={"CPU": 4}, placement="SPREAD")

    dtrain-run --ray auto -n 4 train.py --lr 0.1                          # a script, the same way

Each actor gets the env contract (rank, world size, local rank and size among the actors
on its node, rank 0's address and a port rank 0 already holds, the job token, a host id per
Ray node), so `dtrain.init()` inside `fn` (or the script) works unchanged. Output comes
back through Ray with the rank in its prefix. When a rank fails (an exception, or its
actor dies) every actor is killed and RankFailed names the rank, with its traceback.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from dtrain.errors import ConfigError
from dtrain.launch.local import RankFailed, job_env


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("dtrain.ray needs Ray: pip install 'ray>=2.9' (or 'dtrain[all]')") from None
    return ray


class _Rank:
    """The body of one rank's actor (wrapped by ray.remote in run())."""

    def __init__(self, rank: int):
        self.rank = rank
        self.listener: Optional[socket.socket] = None

    def __repr__(self) -> str:  # Ray prefixes the actor's output with this
        return f"dtrain-rank{self.rank}"

    def where(self) -> Dict[str, Any]:
        """This actor's node, and for rank 0 an address and a listening port for the rendezvous."""
        ray = _ray()
        out = {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}
        if self.rank == 0:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind(("", 0))
            self.listener.listen(128)
            out["port"] = self.listener.getsockname()[1]
        return out

    def _environ(self, env: Dict[str, str]) -> None:
        os.environ.update(env)
        if self.listener is not None:
            os.environ["DTRAIN_STORE_FD"] = str(self.listener.fileno())

    def call(self, env: Dict[str, str], fn: Callable, args: Sequence, kwargs: Dict[str, Any]):
        import dtrain
        from dtrain.comm.api import abort_world
        self._environ(env)
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            abort_world(f"{type(e).__name__}: {e}")  # the others fail now, naming this rank
            raise
        if dtrain.is_initialized():
            dtrain.shutdown()
        return result

    def script(self, env: Dict[str, str], argv: List[str]) -> int:
        self._environ(env)
        fds = (self.listener.fileno(),) if self.listener is not None else ()
        p = subprocess.run(argv, env=dict(os.environ), pass_fds=fds)
        if p.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited with {p.returncode} on rank {self.rank}")
        return 0


def _contracts(places: List[Dict[str, Any]], token: str) -> List[Dict[str, str]]:
    """The env contract of every rank: ranks on one Ray node are one host (shared memory)."""
    n = len(places)
    by_node: Dict[str, List[int]] = {}
    for r, p in enumerate(places):
        by_node.setdefault(p["node"], []).append(r)
    addr, port = places[0]["ip"], places[0]["port"]
    out = []
    for r, p in enumerate(places):
        local = by_node[p["node"]]
        env = job_env(r, n, port, token, base={}, addr=addr, local_rank=local.index(r), local_size=len(local),
                      host_id=f"ray-node-{p['node']}")
        out.append(env)
    return out


def run(fn: Callable, num_workers: int, args: Sequence = (), kwargs: Optional[Dict[str, Any]] = None,
        resources_per_worker: Optional[Dict[str, float]] = None, use_gpu: bool = False, placement: str = "PACK",
        address: Optional[str] = None, timeout: Optional[float] = None) -> Any:
    """Runs fn(*args, **kwargs) on `num_workers` Ray actors as ranks of one dtrain job and
    returns rank 0's result.

    Args:
        resources_per_worker: each actor's Ray resources (default {"CPU": 1}, plus {"GPU": 1}
            with use_gpu).
        placement: "PACK" (as few nodes as possible) or "SPREAD" (one per node where it can),
            or Ray's STRICT_ variants.
        address: the Ray cluster to join when Ray is not initialised yet (default: RAY_ADDRESS,
            else a local instance).
        timeout: seconds for the whole job (None: no limit).

    Raises:
        RankFailed: a rank raised or its actor died; names the rank, with its traceback.
        ConfigError: bad arguments, or Ray is not installed.
    """
    return _launch(num_workers, lambda a, env: a.call.remote(env, fn, tuple(args), dict(kwargs or {})),
                   resources_per_worker, use_gpu, placement, address, timeout)


def run_script(argv: List[str], num_workers: int, **kw) -> int:
    """Runs a command (a training script) on every rank, as dtrain-run --ray does. Returns 0."""
    return _launch(num_workers, lambda a, env: a.script.remote(env, list(argv)), kw.get("resources_per_worker"),
                   kw.get("use_gpu", False), kw.get("placement", "PACK"), kw.get("address"), kw.get("timeout"))


def _failures(ray, refs, done) -> list:
    """(priority, rank, error) for each failed call in `done`: an actor that died (0) or a rank's
    own exception (1) before a CommError that only says a peer went away (2)."""
    from dtrain.errors import CommError
    out = []
    for ref in done:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            out.append((0, refs.index(ref), e))
        except Exception as e:  # noqa: BLE001 - a rank's failure, reported with its rank
            echo = isinstance(getattr(e, "cause", None), CommError) or "CommError" in str(e).splitlines()[-1]
            out.append((2 if echo else 1, refs.index(ref), e))
    return out


def _launch(n: int, submit, resources, use_gpu: bool, placement: str, address, timeout):
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"num_workers must be a positive integer, got {n!r}")
    strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    if placement not in strategies:
        raise ConfigError(f"placement {placement!r}: choose one of {', '.join(strategies)}")
    ray = _ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    bundle = dict(resources or {"CPU": 1})
    if use_gpu:
        bundle.setdefault("GPU", 1)
    pg = placement_group([bundle] * n, strategy=placement)
    try:
        ray.get(pg.ready(), timeout=timeout or 120)
    except Exception:  # noqa: BLE001 - Ray raises its own GetTimeoutError type
        remove_placement_group(pg)
        raise ConfigError(f"Ray could not place {n} workers of {bundle} ({placement}) within "
                          f"{timeout or 120} s: the cluster has {ray.cluster_resources()}; ask for fewer or "
                          "smaller workers") from None
    cls = ray.remote(_Rank)
    actors = [cls.options(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                          resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
                          scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
                          ).remote(i) for i in range(n)]
    try:
        places = ray.get([a.where.remote() for a in actors])
        envs = _contracts(places, secrets.token_hex(32))
        refs = [submit(a, env) for a, env in zip(actors, envs)]
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(refs)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                raise RankFailed(f"the job did not finish within {timeout} s (ranks "
                                 f"{[refs.index(p) for p in pending]} still running)", refs.index(pending[0]), None)
            failures = _failures(ray, refs, done)
            if failures:
                # The ranks that lost a peer fail too, usually first: give the cause a moment to
                # arrive, then report it rather than its echoes.
                more, pending = ray.wait(pending, num_returns=len(pending), timeout=3.0)
                failures += _failures(ray, refs, more)
                _, rank, err = min(failures)
                raise RankFailed(f"rank {rank} failed:\n{err}", rank, None)
        return ray.get(refs[0])
    finally:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)
