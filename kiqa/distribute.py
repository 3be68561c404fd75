"""tf.distribute strategies for `kiqa-train --strategy`, the way TensorFlow documents them.

- one-device: `tf.distribute.OneDeviceStrategy` on the first GPU, else the CPU.
- mirrored: `tf.distribute.MirroredStrategy` over every local GPU (or, in tests, over
  logical CPU devices): synchronous data parallelism on one host.
- multi-worker: `tf.distribute.MultiWorkerMirroredStrategy` across hosts, configured
  through the `TF_CONFIG` environment variable (cluster + this task's type and index).
- auto: multi-worker when TF_CONFIG names more than one worker, mirrored when there is
  more than one GPU, else the default strategy.

The batch size in the config is the global batch: each of N replicas sees batch/N.
Only the chief writes the run directory; other workers write their checkpoints and
backups to a scratch folder, as TF's multi-worker guide prescribes (every worker must
save, because saving is a collective operation, but only the chief's copy is kept).
"""

import json
import os
import tempfile
from pathlib import Path

import tensorflow as tf

from kiqa.errors import ConfigError


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


def make_strategy(name):
    """Builds the tf.distribute strategy named by `--strategy`.

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
            "--strategy multi-worker needs TF_CONFIG with a cluster and this task, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
        )
    communication = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
    )
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication)


def is_chief(strategy):
    """True on the one worker whose files are kept (always true off multi-worker)."""
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
    resolver = strategy.cluster_resolver
    return Path(tempfile.gettempdir()) / f"kiqa-worker-{resolver.task_type}-{resolver.task_id}" / Path(run_dir).name
