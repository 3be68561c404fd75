"""Command-line entry points. The only place in kiqa that parses arguments or prints.

`kiqa <command> ...` dispatches to one module per command; each also has its own
console script where users expect one (`kiqa-train`, `kiqa-evaluate`, `kiqa-export`).
Every module has `main(argv=None) -> int`, so tests call them in-process.
"""

import importlib
import sys

# command -> (module, one-line help). Modules are imported lazily: `kiqa --help` must
# not wait for TensorFlow.
COMMANDS = {
    "train": ("kiqa.cli.train", "fine-tune ConvNeXt on KonIQ-10k or the built-in demo data"),
    "evaluate": ("kiqa.cli.evaluate", "re-evaluate a saved model on any split of a KonIQ-format set"),
    "export": ("kiqa.cli.export", "export a model as a TF Serving SavedModel version, atomically"),
    "predict": ("kiqa.cli.predict", "score images through a TF Serving endpoint over gRPC"),
    "serve-dev": ("kiqa.cli.serve_dev", "local development gRPC server speaking TF Serving's API (not TF Serving)"),
    "score": ("kiqa.cli.score", "score files and folders of images with a local model"),
    "score-beam": ("kiqa.cli.score_beam", "score images on Apache Beam (Dataflow, Flink, Spark, local)"),
    "map": ("kiqa.cli.map", "quality maps: where in each image the model finds damage (PNG, .npy, JSON)"),
    "compare": ("kiqa.cli.compare", "compare two or more folders of images (e.g. SR outputs) without references"),
    "fetch-koniq": ("kiqa.cli.fetch", "download and verify KonIQ-10k"),
    "prepare": ("kiqa.cli.prepare", "decode and resize a KonIQ-format set once into TFRecord shards"),
}


def _usage():
    lines = ["usage: kiqa <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `kiqa <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None):
    """The `kiqa` umbrella command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from kiqa import __version__

        print(f"kiqa {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"kiqa: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(argv[1:], prog=f"kiqa {command}")
