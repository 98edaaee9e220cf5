"""The env contract, launcher by launcher."""

import pytest

from dtrain.comm.rendezvous import from_environ
from dtrain.errors import ConfigError


def test_no_launcher_is_a_world_of_one():
    e = from_environ({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "none")


def test_dtrain_run_variables():
    e = from_environ({"DTRAIN_RANK": "1", "DTRAIN_WORLD_SIZE": "4", "DTRAIN_LOCAL_RANK": "1",
                      "DTRAIN_LOCAL_SIZE": "2", "DTRAIN_MASTER_ADDR": "10.1.2.3", "DTRAIN_MASTER_PORT": "29500",
                      "DTRAIN_JOB_TOKEN": "abc"})
    assert (e.rank, e.world_size, e.local_rank, e.local_size) == (1, 4, 1, 2)
    assert (e.master_addr, e.master_port, e.token, e.launcher) == ("10.1.2.3", 29500, "abc", "dtrain-run")


def test_torchrun_variables_get_a_derived_token_and_a_warning():
    with pytest.warns(UserWarning, match="DTRAIN_JOB_TOKEN"):
        e = from_environ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert e.launcher == "torchrun" and e.token


def test_open_mpi_and_slurm_variables():
    e = from_environ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                      "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "5",
                      "DTRAIN_JOB_TOKEN": "t"})
    assert (e.rank, e.world_size, e.local_rank, e.local_size, e.launcher) == (3, 4, 1, 2, "openmpi")
    e = from_environ({"SLURM_PROCID": "2", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
                      "SLURM_NTASKS_PER_NODE": "4(x2)", "MASTER_ADDR": "h", "MASTER_PORT": "5",
                      "DTRAIN_JOB_TOKEN": "t"})
    assert (e.rank, e.world_size, e.local_size, e.launcher) == (2, 8, 4, "slurm")


def test_missing_master_address_names_the_fix():
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


@pytest.mark.parametrize("env", [{"RANK": "5", "WORLD_SIZE": "2"}, {"DTRAIN_RANK": "x", "DTRAIN_WORLD_SIZE": "2"}])
def test_inconsistent_values_raise(env):
    with pytest.raises(ConfigError):
        from_environ(dict(env, MASTER_ADDR="h", MASTER_PORT="1", DTRAIN_JOB_TOKEN="t"))


def test_a_store_fd_that_is_not_a_listening_socket_is_refused():
    with pytest.raises(ConfigError, match="DTRAIN_STORE_FD"):
        from_environ({"DTRAIN_RANK": "0", "DTRAIN_WORLD_SIZE": "2", "DTRAIN_MASTER_ADDR": "h",
                      "DTRAIN_MASTER_PORT": "1", "DTRAIN_JOB_TOKEN": "t", "DTRAIN_STORE_FD": "0"})


def test_network_interface_address(monkeypatch):
    from dtrain.comm import rendezvous
    assert rendezvous.interface_address("lo") == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"DTRAIN_IFNAME='nosuch0' has no IPv4 address.*interfaces: .*\blo\b"):
        rendezvous.interface_address("nosuch0")
    monkeypatch.delenv("DTRAIN_HOST_ADDR", raising=False)
    monkeypatch.setenv("DTRAIN_IFNAME", "lo")
    assert rendezvous._host_address() == "127.0.0.1"
    monkeypatch.setenv("DTRAIN_HOST_ADDR", "10.1.2.3")  # an explicit address wins
    assert rendezvous._host_address() == "10.1.2.3"
