"""Real ranks over shared memory and TCP: every collective against a float64 reference."""

import pytest

from tests.multiproc import workers
from tests.multiproc.harness import ranks


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_all_collectives(world, transport):
    # DTRAIN_SHM_COMPRESSION=1 makes compression convert on shared memory too, so the wire path is tested.
    env = {"DTRAIN_TRANSPORT": transport, "DTRAIN_SHM_COMPRESSION": "1"}
    results = ranks(workers.all_collectives, world, 11 * world, env=env, timeout=280)
    digests = [d for d, _ in results]
    assert all(d == digests[0] for d in digests), "ranks hold different results"
    for _, transports in results:
        assert transports == [transport]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_layouts_async_and_groups(world):
    assert ranks(workers.layouts_and_async, world, timeout=100) == list(range(world))


@pytest.mark.timeout(120)
def test_bad_input_raises_config_error_naming_the_fix():
    results = ranks(workers.bad_inputs, 2, timeout=100)
    for messages in results:
        assert None not in messages, messages
        joined = "\n".join(messages)
        for needle in ("complex64", "bool", "median", "floating-point", "float32 tensors", "int4",
                       "meta", "torch.Tensor", "root 99", "divisible", "splits"):
            assert needle in joined, needle


@pytest.mark.parametrize("hosts, per_host", [(2, 2), (2, 3)])
def test_hierarchical_allreduce_across_fake_hosts(hosts, per_host):
    """Real processes, host ids faked per rank: shared memory within a host, TCP between hosts;
    the hierarchical path (chunked and pipelined at 9 MiB) agrees with the reference and is
    bitwise identical on every rank."""
    n = hosts * per_host
    results = ranks(workers.hierarchical, n, per_host, 7 * n, timeout=280)
    for r, (layout, transports, digests) in enumerate(results):
        assert layout, f"rank {r} did not see {hosts} hosts of {per_host}"
        assert transports == {j: ("shm" if j // per_host == r // per_host else "tcp") for j in range(n) if j != r}
        for hierarchy in ("flat", "hierarchical"):
            assert digests[hierarchy] == results[0][2][hierarchy], f"rank {r} disagrees ({hierarchy})"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize("world", [2, 3])
def test_sendrecv_swaps_without_deadlock(world, transport):
    results = ranks(workers.sendrecv_ring, world, env={"DTRAIN_TRANSPORT": transport}, timeout=180)
    for errors in results:
        assert errors[0] and "destination must be another rank" in errors[0], errors
        assert errors[1] and "a tensor and a rank for each side" in errors[1], errors
        assert errors[2] and "use one dtype" in errors[2], errors
