"""Reading and checking exported SavedModels, and the version folders TF Serving watches.

TF Serving loads every all-digit folder under a model's base path (`<base>/<version>/`)
and ignores the rest; kiqa's exporters write into dot-folders beside it
(`TEMP_PREFIX`, `ASIDE_PREFIX`) and rename, so these functions read only finished
versions. Reading `saved_model.pb` needs no variables, so the checks are cheap.
"""

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from kiqa.contract import (
    ASSETS_EXTRA,
    BYTES_INPUT,
    BYTES_SIGNATURE,
    DIST_OUTPUT,
    ERROR_OUTPUT,
    LENIENT_SIGNATURE,
    METADATA_FILE,
    MOS_OUTPUT,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    RATING_LEVELS,
    SD_OUTPUT,
)
from kiqa.errors import ConfigError, ExportError, UntrustedExportError, VersionExistsError
from kiqa.serving import ops as serving_ops

# A version being written (`.tmp-<version>-<host>-<pid>`) and an old version waiting
# out an overwrite (`.old-...`): dot-folders, which TF Serving never loads.
TEMP_PREFIX = ".tmp-"
ASIDE_PREFIX = ".old-"


def list_versions(base_path):
    """The versions TF Serving would see under `base_path`: all-digit directory names.

    Args:
        base_path: a model base path.

    Returns:
        Sorted list of ints (empty when the folder is missing or has no versions).
    """
    base = Path(base_path)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and p.is_dir())


def check_saved_model(path, image_size=None, check_ops=True):
    """Checks an exported version like TF Serving and `saved_model_cli scan` would see it.

    Reads `saved_model.pb` only (no variables), so it is cheap.

    Args:
        path: a version directory (or the temporary directory before publishing).
        image_size: expected (height, width) of the pixel signature; None skips that.
        check_ops: refuse ops outside kiqa's allow list (`kiqa.serving.ops`). Only a
            caller who reviewed the model turns it off.

    Returns:
        dict with "signatures" ({name: {"inputs": {key: [dtype, shape]}, "outputs":
        ...}}) and "xla_must_compile_functions" (functions TF must XLA-compile; slow on
        CPU: the stock grouped Conv2D of `fast_depthwise=False` models).

    Raises:
        ExportError: unreadable file, no "serve" graph, wrong or missing signatures,
            or ops outside the allow list (`kiqa.serving.ops`), each named (and
            listed: an `UntrustedExportError` and its `refused_ops`).
    """
    meta_graph = read_meta_graph(path)
    signatures = describe_signatures(meta_graph)
    problems = []
    if image_size is None:  # any fixed size is fine: read it from the signature itself
        shape = signatures.get(PIXELS_SIGNATURE, {}).get("inputs", {}).get(PIXELS_INPUT, [None, []])[1]
        image_size = shape[1:3] if len(shape) == 4 else (-1, -1)
    height, width = (int(v) for v in image_size)
    expected = {
        BYTES_SIGNATURE: ({BYTES_INPUT: ["DT_STRING", [-1]]}, {MOS_OUTPUT: ["DT_FLOAT", [-1]]}),
        LENIENT_SIGNATURE: (
            {BYTES_INPUT: ["DT_STRING", [-1]]},
            {ERROR_OUTPUT: ["DT_STRING", [-1]], MOS_OUTPUT: ["DT_FLOAT", [-1]]},
        ),
        PIXELS_SIGNATURE: (
            {PIXELS_INPUT: ["DT_FLOAT", [-1, height, width, 3]]}, {MOS_OUTPUT: ["DT_FLOAT", [-1]]},
        ),
    }
    for name, (inputs, outputs) in expected.items():
        found = signatures.get(name)
        if found is None:
            problems.append(f"signature {name!r} is missing (found {sorted(signatures)})")
            continue
        # A distribution model's signatures add mos_sd and dist beside mos (kiqa.contract).
        with_distribution = {**outputs, SD_OUTPUT: ["DT_FLOAT", [-1]], DIST_OUTPUT: ["DT_FLOAT", [-1, RATING_LEVELS]]}
        if found["inputs"] != inputs or found["outputs"] not in (outputs, with_distribution):
            problems.append(
                f"signature {name!r} is {found['inputs']} -> {found['outputs']}, expected "
                f"{inputs} -> {outputs}"
            )
        if meta_graph.signature_def[name].method_name != "tensorflow/serving/predict":
            problems.append(f"signature {name!r} is not a Predict signature")
    refused = serving_ops.refused_ops(meta_graph) if check_ops else []
    if refused:
        problems.append(
            f"the graph uses ops outside kiqa's allow list {refused} (kiqa.serving.ops): a "
            f"SavedModel is a program, and these may touch the server's files, network or "
            f"logs; remove them from the model, or review them and extend the allow list"
        )
    if problems:
        message = f"SavedModel {path} failed its checks: " + "; ".join(problems)
        raise UntrustedExportError(message, refused_ops=refused) if refused else ExportError(message)
    return {
        "signatures": signatures,
        "xla_must_compile_functions": _count_xla_must_compile(meta_graph),
    }


def describe_signatures(meta_graph):
    """Signature inputs and outputs of a MetaGraphDef as plain data.

    Args:
        meta_graph: a `MetaGraphDef` proto.

    Returns:
        {name: {"inputs": {key: [dtype name, shape]}, "outputs": {...}}}, with -1 for
        unknown dimensions (as `saved_model_cli show` prints them).
    """
    def tensors(infos):
        return {
            key: [_dtype_name(info.dtype), [int(d.size) for d in info.tensor_shape.dim]]
            for key, info in sorted(infos.items())
        }

    return {
        name: {"inputs": tensors(sig.inputs), "outputs": tensors(sig.outputs)}
        for name, sig in sorted(meta_graph.signature_def.items())
        if not name.startswith("__")  # __saved_model_init_op is bookkeeping, not a signature
    }


def ops_used(meta_graph):
    """Every op type in a MetaGraphDef: its graph and all its library functions (calls
    of library functions by name are not ops and are left out)."""
    functions = {f.signature.name for f in meta_graph.graph_def.library.function}
    ops = {node.op for node in meta_graph.graph_def.node}
    for function in meta_graph.graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return ops - functions


def stored_parameter_count(path):
    """Numbers stored in a SavedModel's variables checkpoint (the object graph excluded).

    Args:
        path: a version directory.

    Returns:
        int, the sum of the stored variables' sizes; equals the model's parameter count
        when every weight is stored once.
    """
    prefix = str(Path(path) / "variables" / "variables")
    return sum(
        int(np.prod(shape))
        for name, shape in tf.train.list_variables(prefix)
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    )


def read_export_metadata(path):
    """Reads `assets.extra/kiqa.json` of a version directory.

    Raises:
        ExportError: the file is missing or not JSON (not a kiqa export).
    """
    file = Path(path) / ASSETS_EXTRA / METADATA_FILE
    try:
        return json.loads(file.read_text())
    except OSError as err:
        raise ExportError(f"{file} not found: {path} is not a kiqa export (run kiqa export)") from err
    except json.JSONDecodeError as err:
        raise ExportError(f"{file} is not valid JSON: {err}") from err


def read_meta_graph(path):
    """The "serve" MetaGraphDef of a SavedModel directory (what TF Serving loads).

    Raises:
        ExportError: no readable saved_model.pb, or no "serve" graph in it.
    """
    file = Path(path) / "saved_model.pb"
    try:
        saved_model = saved_model_pb2.SavedModel.FromString(file.read_bytes())
    except OSError as err:
        raise ExportError(f"{file} cannot be read: {err.strerror}") from err
    except Exception as err:  # protobuf's DecodeError has no stable import path
        raise ExportError(f"{file} is not a SavedModel: {err}") from err
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ExportError(f"{file} has no MetaGraph tagged 'serve', which TF Serving loads")


def _dtype_name(enum_value):
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(enum_value)


def _count_xla_must_compile(meta_graph):
    return sum(
        1
        for function in meta_graph.graph_def.library.function
        if function.attr.get("_XlaMustCompile") is not None and function.attr["_XlaMustCompile"].b
    )


def choose_version(base, version, overwrite):
    existing = list_versions(base)
    if version is None:
        return (existing[-1] + 1) if existing else 1
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ConfigError(f"version must be a positive integer, got {version!r}")
    version = int(version)
    if version in existing and not overwrite:
        raise VersionExistsError(
            f"version {version} already exists in {base} (versions: {existing}); pick another "
            f"version (next free: {existing[-1] + 1}), or allow overwriting to replace it",
            base=str(base), version=version, existing=existing, next_free=existing[-1] + 1,
        )
    return version


def host_name():
    return socket.gethostname().replace("/", "_")


def recover_interrupted(base):
    """Cleans up after exports on this host that were killed: their pid is gone.

    `.tmp-*` directories are deleted. An `.old-<version>-*` directory (a kill during an
    overwrite, between its two renames) is put back if its version is missing.
    """
    suffix = f"-{host_name()}"
    for path in base.iterdir():
        prefix = next((p for p in (TEMP_PREFIX, ASIDE_PREFIX) if path.name.startswith(p)), None)
        if prefix is None or not path.is_dir():
            continue
        head, _, pid = path.name.rpartition("-")
        if not pid.isdigit() or not head.endswith(suffix) or _alive(int(pid)):
            continue
        version = head[len(prefix) : -len(suffix)]
        if prefix == ASIDE_PREFIX and version.isdigit() and not (base / version).exists():
            os.rename(path, base / version)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
