"""Where a data-parallel process stands (kiqa.distribute.Cluster) and which backend runs
which strategy. No JAX needed: these run in the default suite."""

import pytest

from kiqa.distribute import Cluster, first_host, make_strategy
from kiqa.errors import ClusterError, StrategyError


def test_flags_win_over_the_environment():
    env = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234", "KERAS_DISTRIBUTION_NUM_PROCESSES": "4",
           "KERAS_DISTRIBUTION_PROCESS_ID": "3"}
    assert Cluster.from_environment(env) == Cluster("10.0.0.1:1234", 4, 3)
    given = Cluster.from_environment(env, coordinator_address="127.0.0.1:9", num_processes=2, process_id=0)
    assert given == Cluster("127.0.0.1:9", 2, 0)


def test_keras_list_of_job_addresses_names_the_coordinator_first():
    env = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234,10.0.0.2:2345"}
    assert Cluster.from_environment(env).coordinator_address == "10.0.0.1:1234"


def test_slurm_maps_to_procid_ntasks_and_the_first_node():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[003-006,9],cpu1",
           "SLURM_JOB_ID": "4097"}
    cluster = Cluster.from_environment(env)
    # The port JAX's own SLURM detection derives from the job id: 4097 % 4096 + 61440.
    assert cluster == Cluster("gpu003:61441", 8, 5)


@pytest.mark.parametrize("nodes, first", [("node001", "node001"), ("node001,host2", "node001"),
                                          ("node[001-015],host2", "node001"), ("n[7,9-11]", "n7")])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert first_host(nodes) == first


def test_kubernetes_indexed_job_gives_the_index():
    env = {"JOB_COMPLETION_INDEX": "1", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
           "KERAS_DISTRIBUTION_JOB_ADDRESSES": "train-0.train:1234"}
    assert Cluster.from_environment(env) == Cluster("train-0.train:1234", 2, 1)


def test_a_missing_or_inconsistent_cluster_names_what_is_missing():
    with pytest.raises(ClusterError) as raised:
        Cluster(num_processes=2).check()
    assert raised.value.missing == ("coordinator address", "process index")
    with pytest.raises(ClusterError, match="outside 0..1"):
        Cluster("127.0.0.1:1", 2, 2).check()
    with pytest.raises(ClusterError, match="SLURM_NTASKS='two'"):
        Cluster.from_environment({"SLURM_NTASKS": "two"})


def test_data_parallel_on_tensorflow_is_refused_with_the_fact():
    with pytest.raises(StrategyError, match="runs on the jax backend") as raised:
        make_strategy("data-parallel")
    assert (raised.value.strategy, raised.value.backend) == ("data-parallel", "tensorflow")
