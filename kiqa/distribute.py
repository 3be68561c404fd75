"""Distribution strategies for training (`TrainConfig.strategy`), per Keras backend.

TensorFlow backend (tf.distribute, the way TensorFlow documents it):

- one-device: `tf.distribute.OneDeviceStrategy` on the first GPU, else the CPU.
- mirrored: `tf.distribute.MirroredStrategy` over every local GPU (or, in tests, over
  logical CPU devices): synchronous data parallelism on one host.
- multi-worker: `tf.distribute.MultiWorkerMirroredStrategy` across hosts, configured
  through the `TF_CONFIG` environment variable (cluster + this task's type and index).
  Keras 3's `model.fit` cannot train under it (keras-team/keras issue 20585): training
  stops with that explanation; several hosts train with data-parallel on JAX.
- auto: multi-worker when TF_CONFIG names more than one worker, mirrored when there is
  more than one GPU, else the default strategy.

JAX backend (`keras.distribution`, the multi-host engine the Keras team supports):

- data-parallel: `keras.distribution.initialize` (one coordinator, N processes, this
  process' index: see `Cluster`) and `keras.distribution.DataParallel` over every device
  of every process. Variables are replicated; each process feeds its own share of each
  global batch, and XLA's SPMD partitioner reduces the gradients (and BatchNormalization's
  statistics) over the global batch, so N processes compute what one process computes
  on the whole batch.
- auto: data-parallel when the environment names more than one process, else one process
  without a distribution.

The batch size in the config is the global batch: each of N replicas sees batch/N.
Only the chief (TF) or process 0 (JAX) writes the run directory; other workers write
their checkpoints and backups to a scratch folder of their own. On TF that is what TF's
multi-worker guide prescribes (saving is a collective operation, but only the chief's copy
is kept); on JAX every process holds the same replicated weights, so every process keeps
its own backup and resumes from it, and the processes check that they resume at the same
epoch.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import tensorflow as tf

from kiqa.errors import ClusterError, ConfigError, StrategyError

BACKENDS = ("tensorflow", "jax")
# Which --strategy values each backend runs ("auto" everywhere).
BACKEND_STRATEGIES = {
    "tensorflow": ("auto", "one-device", "mirrored", "multi-worker"),
    "jax": ("auto", "data-parallel"),
}
# Keras' own variables, read by keras.distribution.initialize as well.
ADDRESS_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID",
)
# Seconds without a heartbeat after which JAX's coordination service declares a process
# dead and fails the others (JAX's default is 100). A killed worker then ends the job
# with an error in about this long instead of leaving its peers blocked in a collective.
HEARTBEAT_TIMEOUT_SECONDS = 30


def tf_config():
    """The parsed TF_CONFIG environment variable, or {} when unset."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({err}); see TF's multi-worker guide") from err


def _worker_count(config):
    cluster = config.get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def keras_backend():
    """The Keras backend of this process ("tensorflow", "jax", ...)."""
    import keras

    return keras.backend.backend()


def make_strategy(name, cluster=None):
    """Builds the strategy named by `TrainConfig.strategy` for this process' Keras backend.

    Args:
        name: "auto", "one-device", "mirrored", "multi-worker" (TensorFlow backend) or
            "data-parallel" (JAX backend).
        cluster: the `Cluster` of a multi-process JAX run; None reads it from the
            environment (`Cluster.from_environment`).

    Returns:
        A `tf.distribute.Strategy` on TensorFlow; a `JaxStrategy` on JAX.

    Raises:
        StrategyError: the strategy does not run on this backend.
        ConfigError: multi-worker without a usable TF_CONFIG.
        ClusterError: data-parallel over several processes without a coordinator.
    """
    backend = keras_backend()
    if backend not in BACKEND_STRATEGIES:
        raise StrategyError(f"kiqa trains on the TensorFlow or the JAX backend of Keras, not {backend!r}",
                            name, backend)
    if name not in BACKEND_STRATEGIES[backend]:
        other = next(b for b in BACKENDS if b != backend)
        raise StrategyError(
            f"the {name} strategy runs on the {other} backend of Keras; this process runs on {backend} "
            f"(which runs {', '.join(BACKEND_STRATEGIES[backend])})", name, backend,
            alternative="data-parallel" if backend == "jax" else "mirrored",
        )
    if backend == "tensorflow":
        return _tf_strategy(name)
    cluster = cluster if cluster is not None else Cluster.from_environment()
    if name == "auto" and (cluster.num_processes or 1) <= 1:
        return JaxStrategy()
    return JaxStrategy.data_parallel(cluster)


def _tf_strategy(name):
    """Builds the tf.distribute strategy named by `TrainConfig.strategy`.

    Args:
        name: "auto", "one-device", "mirrored" or "multi-worker".

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ConfigError: multi-worker without a usable TF_CONFIG.
    """
    # Physical devices only: listing logical ones starts the TF runtime, after which
    # multi-worker collectives can no longer be configured.
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        if _worker_count(tf_config()) > 1:
            name = "multi-worker"
        elif len(gpus) > 1:
            name = "mirrored"
        else:
            return tf.distribute.get_strategy()
    if name != "multi-worker":
        gpus = tf.config.list_logical_devices("GPU")
    if name == "one-device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    config = tf_config()
    if _worker_count(config) < 1 or "task" not in config:
        raise ConfigError(
            "the multi-worker strategy needs TF_CONFIG with a cluster and this task, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
        )
    communication = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
    )
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication)


def is_chief(strategy):
    """True on the one worker whose files are kept (always true off multi-worker)."""
    if isinstance(strategy, JaxStrategy):
        return strategy.process_id == 0
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    has_chief = "chief" in (resolver.cluster_spec().as_dict() or {})
    return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)


def writable_run_dir(run_dir, strategy):
    """The run directory on the chief; a per-worker scratch folder elsewhere."""
    if is_chief(strategy):
        return Path(run_dir)
    if isinstance(strategy, JaxStrategy):
        # Named after the whole path: two runs with the same folder name (runs/a/demo,
        # runs/b/demo) must not share a scratch folder, or the second would find the
        # first's config and refuse to start.
        where = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"kiqa-process-{strategy.process_id}" / f"{Path(run_dir).name}-{where}"
    resolver = strategy.cluster_resolver
    return Path(tempfile.gettempdir()) / f"kiqa-worker-{resolver.task_type}-{resolver.task_id}" / Path(run_dir).name


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process stands in a multi-process JAX run.

    Attributes:
        coordinator_address: host:port of process 0's coordination service.
        num_processes: processes in the job (one per host, or one per GPU).
        process_id: this process' index, 0 .. num_processes - 1; process 0 writes the run
            directory.
    """

    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    @classmethod
    def from_environment(cls, environ=None, coordinator_address=None, num_processes=None, process_id=None):
        """The cluster from the given values, else from what the launcher put in the environment.

        Each value is taken from, in order: the argument (a flag); Keras' own variables
        (KERAS_DISTRIBUTION_JOB_ADDRESSES, _NUM_PROCESSES, _PROCESS_ID); SLURM
        (SLURM_PROCID, SLURM_NTASKS, the first host of SLURM_JOB_NODELIST on the port JAX
        derives from SLURM_JOB_ID); a Kubernetes Indexed Job or JobSet (JOB_COMPLETION_INDEX
        for the index; the address and count come from the pod spec's Keras variables).

        Args:
            environ: the environment (default `os.environ`).
            coordinator_address: host:port, or a comma-separated list whose first entry is
                the coordinator (Keras' job-addresses form).
            num_processes: process count.
            process_id: this process' index.

        Returns:
            A `Cluster`; fields nobody set stay None.

        Raises:
            ClusterError: a count or an index that is not a whole number.
        """
        env = os.environ if environ is None else environ
        address = coordinator_address or env.get(ADDRESS_ENV) or _slurm_coordinator(env)
        count = num_processes if num_processes is not None else _int_env(env, NUM_PROCESSES_ENV, "SLURM_NTASKS")
        index = process_id if process_id is not None else _int_env(
            env, PROCESS_ID_ENV, "SLURM_PROCID", "JOB_COMPLETION_INDEX")
        if address and "," in address:
            address = address.split(",")[0].strip()  # Keras' list form: the first job coordinates
        return cls(address or None, count, index)

    def check(self):
        """Raises ClusterError unless all three values are set and consistent."""
        missing = [label for label, value in (("coordinator address", self.coordinator_address),
                                              ("number of processes", self.num_processes),
                                              ("process index", self.process_id)) if value is None]
        if missing:
            raise ClusterError(
                f"a data-parallel run over several processes needs the coordinator's host:port, the number "
                f"of processes and this process' index; missing: {', '.join(missing)} (environment: "
                f"{ADDRESS_ENV}, {NUM_PROCESSES_ENV}, {PROCESS_ID_ENV}, or SLURM's own variables)",
                missing,
            )
        if not 0 <= self.process_id < self.num_processes:
            raise ClusterError(
                f"process index {self.process_id} is outside 0..{self.num_processes - 1} "
                f"for {self.num_processes} processes", ("process index",),
            )


def _int_env(env, *names):
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            try:
                return int(raw)
            except ValueError as err:
                raise ClusterError(f"{name}={raw!r} is not a whole number", (name,)) from err
    return None


def _slurm_coordinator(env):
    """host:port of SLURM's first node (as JAX's own SLURM detection chooses them), or None."""
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    job = env.get("SLURM_JOB_ID", "").strip()
    if not nodes or not job.isdigit():
        return None
    return f"{first_host(nodes)}:{int(job) % 2**12 + (65535 - 2**12 + 1)}"


def first_host(node_list):
    """The first host of a SLURM node list: "gpu[003-006,9],cpu1" -> "gpu003"."""
    node_list = node_list.strip()
    cut = next((i for i, ch in enumerate(node_list) if ch in ",["), len(node_list))
    if cut == len(node_list) or node_list[cut] == ",":
        return node_list[:cut]
    ranges = node_list[cut + 1:]
    end = next((i for i, ch in enumerate(ranges) if ch in ",-]"), len(ranges))
    return node_list[:cut] + ranges[:end]


class JaxStrategy:
    """The JAX backend's counterpart of a tf.distribute strategy, as `kiqa.train` uses one.

    Without a distribution it is one process on its default device. With
    `keras.distribution.DataParallel` the model's variables are replicated over every
    device of every process, and each process feeds its own share of each global batch
    (`shard`).

    Attributes:
        distribution: the `keras.distribution.DataParallel`, or None for one process.
        num_processes: processes in the job.
        process_id: this process' index.
    """

    def __init__(self, distribution=None, num_processes=1, process_id=0):
        self.distribution, self.num_processes, self.process_id = distribution, num_processes, process_id

    @classmethod
    def data_parallel(cls, cluster):
        """Joins the cluster (several processes) and builds DataParallel over all devices.

        Raises:
            ClusterError: several processes without a complete `Cluster`.
        """
        import keras

        if (cluster.num_processes or 1) > 1:
            cluster.check()
            _initialize(cluster)
        # auto_shard_dataset=False: `shard` splits the batches itself, after dropping the
        # epoch's last, short batch (Keras' own sharding would hand the processes short
        # batches of different sizes, and they would fall out of step).
        distribution = keras.distribution.DataParallel(auto_shard_dataset=False)
        import jax

        return cls(distribution, jax.process_count(), jax.process_index())

    @property
    def num_replicas_in_sync(self):
        return len(self.distribution.device_mesh.devices.flatten()) if self.distribution else 1

    def scope(self):
        """The context in which variables are made and `fit` runs (the distribution's scope)."""
        return self.distribution.scope() if self.distribution else contextlib.nullcontext()

    @contextlib.contextmanager
    def local(self):
        """Runs the block without the distribution: models made in it live on this process
        alone, so one process can predict without its peers (validation, evaluation)."""
        from keras.src.distribution import distribution_lib

        previous = distribution_lib.distribution()
        distribution_lib.set_distribution(None)
        try:
            yield
        finally:
            distribution_lib.set_distribution(previous)

    def shard(self, dataset, global_batch):
        """This process' part of a training dataset of global batches.

        Every process builds the same dataset (same files, same seeded order). Short
        batches (an epoch's last) are dropped: every step needs the same global batch on
        every process. Each global batch of B is then cut into `num_processes` pieces of
        B/num_processes, and this process keeps piece `process_id`: the processes together
        see exactly the batch one process would see.

        Args:
            dataset: batched `tf.data.Dataset` of (images, targets), batches of `global_batch`.
            global_batch: the config's batch size.

        Returns:
            The dataset of this process' pieces (all the dataset when there is one process).

        Raises:
            ConfigError: a global batch that the processes cannot share evenly.
        """
        full = dataset.filter(lambda images, *rest: tf.shape(images)[0] == global_batch)
        if self.num_processes == 1:
            return full
        if global_batch % self.num_processes:
            raise ConfigError(
                f"batch size {global_batch} cannot be shared evenly by {self.num_processes} processes; "
                f"use a multiple of {self.num_processes}"
            )
        piece = global_batch // self.num_processes
        return full.rebatch(piece).shard(self.num_processes, self.process_id).prefetch(tf.data.AUTOTUNE)

    def agree(self, value):
        """The values of an integer on every process, in process order ([value] for one process)."""
        if self.num_processes == 1:
            return [int(value)]
        import numpy as np
        from jax.experimental import multihost_utils

        return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value))).ravel()]


def _initialize(cluster):
    """`keras.distribution.initialize` with CPU collectives and a heartbeat timeout.

    Keras' initialize forwards only the address, the count and the index to
    `jax.distributed.initialize`; the heartbeat timeout is JAX's, so JAX's distributed
    client is started here first with it (Keras then finds it started and only seeds its
    random generator across the processes).
    """
    import jax

    # CPU processes (tests, CPU clusters) need a cross-process collective implementation;
    # gloo is JAX's CPU default in recent versions and harmless on GPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address, num_processes=cluster.num_processes,
            process_id=cluster.process_id, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS,
        )
    from keras.src.backend.jax import distribution_lib as jax_distribution_lib

    jax_distribution_lib.initialize_rng()
