"""The ops a SavedModel may hold to be run by kiqa: an allow list, reviewed by hand.

A SavedModel is a program. Before `kiqa score` or `kiqa compare` runs one, and before
`kiqa export` publishes one, every op in its graph and in every function of its
function library (nested functions, `tf.cond`/`tf.while_loop` branches and tf.data
functions included: the library holds them all, flat) must be in `ALLOWED_OPS`; the
ops of the checkpoint saver's own functions may also be in `CHECKPOINT_OPS`. Anything
else is refused by name. A deny list cannot keep up: TF has dozens of ops that read or
write files (`ReadFile`, `TextLineDataset`, `TFRecordDataset`, `SaveV2`, `WriteFile`,
`MatchingFiles`, summary writers, `PyFunc`...) and gains more with every release.

Where the list comes from: the ops of kiqa's own exports, recorded from `kiqa export`
of the tiny test model and of ConvNeXt-Tiny (built without weights) in both its
depthwise forms (tests/test_serving_ops.py re-derives them and fails when an export
uses an op that is not here), plus what a reviewed kiqa export could legitimately need
(the other image decoders). Every op here computes on tensors in memory: none opens a
file, a socket or a process, or runs Python.

To extend it (a new layer, a new TF release): export the model, read the refused op
names from the error, check in TF's op documentation that each only computes on its
inputs (no file, network, process, Python or summary side effect), add it below with
a comment saying what needs it, and run tests/test_serving_ops.py. `safe_mode=False` skips
the check for one run of a SavedModel you trust.
"""

# Recorded from kiqa's exports (TF 2.21): the tiny test model, and ConvNeXt-Tiny in its
# fast (DepthwiseConv2D) and stock (grouped Conv2D) forms, all three signatures.
# Arithmetic, comparisons and shapes: the image function (kiqa.image.decode_image and
# kiqa.image.header's in-graph header and EXIF parsers) and the model.
_TRACED = {
    "Abs", "AddV2", "All", "Any", "ArgMin", "AsString", "Assert", "Cast", "ConcatV2",
    "Const", "Equal", "ExpandDims", "Fill", "FloorDiv", "FloorMod", "GatherV2", "Greater",
    "GreaterEqual", "Identity", "IsFinite", "LeftShift", "Less", "LessEqual", "LogicalAnd",
    "LogicalNot", "LogicalOr", "Maximum", "Minimum", "Mul", "Neg", "NoOp", "NotEqual",
    "Pack", "Placeholder", "Prod", "Range", "RealDiv", "Reshape", "ReverseV2", "Round",
    "ScatterNd", "Select", "SelectV2", "Shape", "Size", "Squeeze", "StopGradient",
    "StridedSlice", "Sub", "Sum", "TensorScatterUpdate", "Transpose", "Where",
    # Strings in memory: the header parsers read bytes with Substr and DecodeRaw, error
    # messages are joined.
    "DecodePaddedRaw", "DecodeRaw", "ReduceJoin", "StringJoin", "StringLength", "Substr",
    # Counting a JPEG's scans and a PNG's text chunks (kiqa.image.header._occurrences).
    "StringSplitV2",
    # Control flow and function calls (the called bodies are checked too).
    "Case", "If", "PartitionedCall", "StatefulPartitionedCall", "StatelessCase",
    "StatelessIf", "StatelessWhile",
    # tf.map_fn's tensor lists (in-memory).
    "TensorListFromTensor", "TensorListGetItem", "TensorListReserve", "TensorListSetItem",
    "TensorListStack",
    # The model's weights, read from memory (restored once at load by the saver).
    "ReadVariableOp", "VarHandleOp",
    # ConvNeXt and the head: Conv2D (also the stock grouped depthwise path, whose nested
    # jit_compile functions carry _XlaMustCompile, an attribute, not an op),
    # DepthwiseConv2dNative (kiqa's fast path), LayerNormalization (Mean, Rsqrt,
    # SquaredDifference), exact GELU (Erfc), Dense (MatMul, BiasAdd), ReLU.
    "BiasAdd", "Conv2D", "DepthwiseConv2dNative", "Erfc", "MatMul", "Mean", "Relu", "Rsqrt",
    "Sqrt", "SquaredDifference",
    # The distribution head (kiqa.distribution): softmax shares, their mean and spread.
    "Softmax", "Square",
    # Image decoding: DecodeImage (GIF, PNG, BMP, WebP), DecodeJpeg (at 1/2, 1/4, 1/8
    # scale too) and the antialiased resize.
    "DecodeImage", "DecodeJpeg", "ScaleAndTranslate",
    # tf.data in memory only: the bytes signatures decode each item in a dataset whose
    # ignore_errors drops an item the decoder refuses instead of failing the request. No
    # dataset op that reads or writes files (TextLineDataset, TFRecordDataset,
    # FixedLengthRecordDataset, snapshot, save, load, cache to a file) is allowed.
    "BatchDatasetV2", "FilterDataset", "IgnoreErrorsDataset", "ParallelMapDatasetV2",
    "OptionsDataset", "ReduceDataset", "TensorSliceDataset",
}

# Not in today's exports but reviewed for a kiqa export that could need them: the
# single-format decoders and the JPEG header reader (a change of the image function,
# e.g. decoding only a GIF's first frame), a tf.while_loop that is not stateless, the
# tanh GELU approximation and exact GELU's other form, NaN checks.
_REVIEWED = {
    "DecodeBmp", "DecodeGif", "DecodePng", "DecodeWebP", "ExtractJpegShape", "While",
    "Tanh", "Erf", "Pow", "IsNan", "Max", "Min", "Tile", "ZerosLike", "OnesLike",
    "TensorListLength", "TensorListElementShape",
}

ALLOWED_OPS = frozenset(_TRACED | _REVIEWED)

# Every SavedModel's checkpoint saver (tf.saved_model.save writes a save and a restore
# function; TF Serving runs the restore one once at load, on the version's own
# variables/ folder). These ops are allowed only in what the MetaGraph's saver_def
# reaches and no signature reaches: SaveV2 or RestoreV2 in a signature would read or
# write whatever path a request names.
CHECKPOINT_OPS = frozenset({
    "AssignVariableOp", "DisableCopyOnRead", "MergeV2Checkpoints", "RestoreV2", "SaveV2",
    "ShardedFilename", "StaticRegexFullMatch",
})


def _called_functions(node, library):
    """Names of the library functions a node calls: as its op type or in its attrs."""
    called = set()
    if node.op in library:
        called.add(node.op)
    for value in node.attr.values():
        if value.HasField("func"):
            called.add(value.func.name)
        called.update(f.name for f in value.list.func)
    return called


def _node_name(tensor_name):
    return tensor_name.lstrip("^").split(":")[0]


def _reach(start, nodes, library):
    """(root node names, function names) reached from `start` node names."""
    seen_nodes, seen_functions = set(), set()
    todo = [n for n in start if n in nodes]
    while todo:
        name = todo.pop()
        if name in seen_nodes:
            continue
        seen_nodes.add(name)
        node = nodes[name]
        todo.extend(_node_name(i) for i in node.input if _node_name(i) in nodes)
        seen_functions |= _function_closure(_called_functions(node, library), library)
    return seen_nodes, seen_functions


def _function_closure(names, library):
    """`names` and every function their bodies call, recursively."""
    found, todo = set(), [n for n in names if n in library]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for node in library[name].node_def:
            todo.extend(f for f in _called_functions(node, library) if f not in found)
    return found


def refused_ops(meta_graph):
    """The ops of a MetaGraphDef that are not allowed, by name.

    Args:
        meta_graph: a `MetaGraphDef` proto (its graph and whole function library are
            read; nothing is run).

    Returns:
        Sorted list of op type names outside `ALLOWED_OPS` (and, in the checkpoint
        saver's own functions, outside `CHECKPOINT_OPS`); empty when the graph passes.
    """
    graph = meta_graph.graph_def
    library = {f.signature.name: f for f in graph.library.function}
    nodes = {n.name: n for n in graph.node}
    saver = meta_graph.saver_def
    saver_start = [_node_name(t) for t in (saver.save_tensor_name, saver.restore_op_name, saver.filename_tensor_name) if t]
    saver_nodes, saver_functions = _reach(saver_start, nodes, library)
    # Held to the strict list: everything a signature reaches (so a saver_def pointing
    # at a signature's node gains nothing), everything outside the saver, and every
    # function the saver does not reach.
    signature_start = [
        _node_name(info.name)
        for signature in meta_graph.signature_def.values()
        for info in (*signature.inputs.values(), *signature.outputs.values())
    ]
    signature_nodes, _ = _reach(signature_start, nodes, library)
    strict_nodes = (set(nodes) - saver_nodes) | signature_nodes
    _, strict_functions = _reach(strict_nodes, nodes, library)
    strict_functions |= set(library) - saver_functions
    refused = set()

    def check(node_defs, allowed):
        refused.update(n.op for n in node_defs if n.op not in library and n.op not in allowed)

    saver_allowed = ALLOWED_OPS | CHECKPOINT_OPS
    for name, node in nodes.items():
        check([node], ALLOWED_OPS if name in strict_nodes else saver_allowed)
    for name, function in library.items():
        check(function.node_def, ALLOWED_OPS if name in strict_functions else saver_allowed)
    return sorted(refused)
