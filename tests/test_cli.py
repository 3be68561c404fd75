"""The commands users type, run in-process through their `main(argv)`."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from helpers import demo_subset
from kiqa import cli, console, provenance
from kiqa.cli import _common
from kiqa.cli import evaluate as evaluate_cli
from kiqa.cli import train as train_cli


@pytest.fixture(scope="module")
def convnext_run(tmp_path_factory):
    """`kiqa-train` as the README runs it, on a small demo subset: the real ConvNeXt path."""
    folder = tmp_path_factory.mktemp("cli")
    labels = demo_subset(folder, per_source=3)
    run_dir = folder / "run"
    argv = ["--labels", str(labels), "--weights", "none", "--image-size", "32", "32", "--epochs", "1",
            "--batch-size", "8", "--split", "random", "--run-dir", str(run_dir), "--quiet"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # capsys is per test; this fixture is per module
        code = train_cli.main(argv)
    (folder / "train-stderr.txt").write_text(err.getvalue())
    return labels, run_dir, argv, code


def test_umbrella_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in out
    assert cli.main(["no-such-command"]) == 2


def test_train_help_carries_domain_facts(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "0-100" in out and "MOS_zscore" in out and "--weights" in out


def test_kiqa_train_runs_convnext_end_to_end(convnext_run, capsys):
    labels, run_dir, _, code = convnext_run
    assert code == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["variant"] == "tiny" and config["weights"] == "none" and config["image_size"] == [32, 32]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n"] == len(pd.read_csv(run_dir / "predictions.csv"))
    assert (run_dir / "model.keras").stat().st_size > 50e6  # the real 28M-parameter ConvNeXt-Tiny
    record = provenance.read(run_dir / "provenance.json")
    assert (record.backbone, record.weights, record.data) == ("convnext-tiny", "none", "demo")


def test_kiqa_train_ends_with_the_plain_warning(convnext_run):
    _, run_dir, _, _ = convnext_run
    err = (run_dir.parent / "train-stderr.txt").read_text()
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warning == ["warning: " + provenance.read(run_dir / "provenance.json").warning()]
    assert "demo data" in warning[0] and "random weights" in warning[0]


def test_rerunning_a_finished_run_is_refused_with_the_fix(convnext_run, capsys):
    _, _, argv, _ = convnext_run
    assert train_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "finished run" in err and "--overwrite" in err


def test_bad_flags_name_the_field(tmp_path, capsys):
    assert train_cli.main(["--labels", str(tmp_path / "x.csv"), "--test-fraction", "2"]) == 1
    assert "test_fraction" in capsys.readouterr().err
    assert train_cli.main(["--labels", str(tmp_path / "missing.csv"), "--run-dir", str(tmp_path / "r")]) == 1
    assert "label file not found" in capsys.readouterr().err


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 7, "learning_rate": 0.01, "labels": "k.csv"}))
    args = train_cli.build_parser().parse_args(["--config", str(path), "--epochs", "3"])
    config = train_cli.resolve_config(args)
    assert (config.epochs, config.learning_rate, config.labels) == (3, 0.01, "k.csv")
    assert config.image_size == (384, 512)  # the KonIQ defaults, not the demo's
    demo = train_cli.resolve_config(train_cli.build_parser().parse_args([]))
    assert demo.labels is None and demo.name == "demo"


def test_kiqa_evaluate_reproduces_the_run_metrics(convnext_run, tmp_path, capsys):
    _, run_dir, _, _ = convnext_run
    out = tmp_path / "eval"
    assert evaluate_cli.main([str(run_dir), "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    first = json.loads((run_dir / "metrics.json").read_text())
    assert again["n"] == first["n"]
    assert again["srcc"] == pytest.approx(first["srcc"], abs=1e-6, nan_ok=True)
    captured = capsys.readouterr()
    assert (out / "scatter.png").is_file() and "PLCC" in captured.out
    assert "these scores are not meaningful quality predictions" in captured.err
    assert again["model"]["provenance"]["backbone"] == "convnext-tiny" and again["model"]["knows_quality"] is False


# ------------------------------------------------------------------ the console a user sees

TESTS = Path(__file__).resolve().parent
# What TF, absl and Keras print that kiqa hides or avoids (issue 15, item 3).
NOISE = re.compile(
    r"absl::InitializeLog|oneDNN|cuInit|cuda|TensorFlow binary is optimized|rebuild TensorFlow|"
    r"AVX|Unknown|ran out of data|shuffle=True|UserWarning|DeprecationWarning|^[IWEF]\d{4} ",
    re.I,
)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _run_cli(module, argv, env=None, small_backbone=True, cwd=None):
    """A kiqa command's real `main` in a fresh Python process (TF imported from scratch)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KIQA_VERBOSE")}
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent)])
    environment.update(env or {})
    options = [module] + (["--small-backbone"] if small_backbone else [])
    return subprocess.run(
        [sys.executable, str(TESTS / "cli_driver.py"), *options, "--", *argv], cwd=cwd,
        env=environment, capture_output=True, text=True, timeout=900,
    )


def _assert_quiet_demo_run(process, run_dir, demo_home):
    assert process.returncode == 0, process.stderr[-3000:]
    # Progress bars redraw with \r and colour with ANSI escapes: read them as lines of text.
    out, err = (ANSI.sub("", text.replace("\r", "\n")) for text in (process.stdout, process.stderr))
    noisy = [line for line in (out + "\n" + err).splitlines() if NOISE.search(line)]
    assert noisy == []
    # Keras knows the epoch's length: "3/3", never "1/Unknown".
    assert re.search(r"\b(\d+)/\1 ", out), out[-2000:]
    notes = [line for line in err.splitlines() if ": note: " in line]
    assert any("built-in demo data" in n for n in notes) and any("random weights" in n for n in notes)
    assert len(notes) == len(set(notes)), notes  # each note once
    assert all(line.startswith("kiqa-train: note: ") for line in notes)
    labels, images = demo_home / "labels.csv", demo_home / "images"
    lines = out.splitlines()
    steps = lines[lines.index("next steps:") + 1:]
    assert steps[0].split() == ["kiqa", "score", str(images), "--model", str(run_dir), "--out",
                                str(run_dir / "scores.csv")]
    assert steps[1].split() == ["kiqa", "evaluate", str(run_dir), "--part", "test"]  # held out only
    assert steps[2].split()[:3] == ["kiqa", "export", str(run_dir)]
    assert f"the demo data: {labels}" in steps[3]
    # Issue 20.8: the README's sample of this console is what training prints (numbers aside).
    shown = _console_shape(lines[lines.index(f"results in {run_dir}"):], run_dir, demo_home.parent)
    assert shown == _console_shape(_readme_sample()[1:], "runs/demo", "~/.cache/kiqa")


def _readme_sample():
    text = (TESTS.parent / "README.md").read_text()
    start = text.index("```text\n", text.index("The end of a demo run")) + len("```text\n")
    return text[start:text.index("```", start)].splitlines()


def _console_shape(lines, run_dir, demo_parent):
    """Lines with paths shortened and numbers masked; cautions (they depend on the numbers) left out."""
    shape = []
    for line in lines:
        line = line.replace(str(run_dir), "RUN").replace(str(demo_parent), "HOME")
        if not line.strip() or line.strip().startswith("caution:"):
            continue
        shape.append(re.sub(r"-?\d+(\.\d+)?", "#", line.replace("  (unreliable, see below)", "")))
    return shape


def test_kiqa_train_demo_console_is_quiet_and_says_what_next(tmp_path):
    """The README's first command, in a fresh process, read line by line (small CNN for speed)."""
    from kiqa.data import synthetic

    run_dir = tmp_path / "run"
    # The demo data where kiqa-train looks for it, one crop per photo instead of four (speed).
    synthetic.write_demo_dataset(synthetic_demo_dir(tmp_path / "home"), crops_per_photo=1)
    process = _run_cli("kiqa.cli.train", ["--weights", "none", "--epochs", "1", "--image-size", "32", "32",
                                          "--run-dir", str(run_dir)], env=_activated(KIQA_HOME=str(tmp_path / "home")))
    _assert_quiet_demo_run(process, run_dir, synthetic_demo_dir(tmp_path / "home"))


@pytest.mark.large
def test_kiqa_train_demo_console_with_convnext(tmp_path):
    run_dir = tmp_path / "run"
    process = _run_cli("kiqa.cli.train", ["--weights", "none", "--epochs", "1", "--run-dir", str(run_dir)],
                       env=_activated(KIQA_HOME=str(tmp_path / "home")), small_backbone=False)
    _assert_quiet_demo_run(process, run_dir, synthetic_demo_dir(tmp_path / "home"))


def _activated(**env):
    """The environment of a user who activated the venv, as the README says: its bin first on PATH."""
    return {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]), **env}


def synthetic_demo_dir(home):
    from kiqa.data import synthetic

    return home / synthetic.default_demo_dir().name


def test_a_users_own_tf_log_level_is_respected(tmp_path):
    """TF_CPP_MIN_LOG_LEVEL=0 set by the user: TF's start-up log lines are shown again."""
    process = _run_cli("kiqa.cli.score", [str(tmp_path / "none.jpg"), "--model", str(tmp_path / "no-model")],
                       env={"TF_CPP_MIN_LOG_LEVEL": "0"}, small_backbone=False)
    assert re.search(r"^[IW]\d{4} ", process.stderr, re.M), process.stderr[-2000:]
    assert process.stderr.rstrip().splitlines()[-1].startswith("kiqa score: error: ")


def test_tf_start_up_output_is_filtered_by_level():
    captured = "\n".join([
        console._ABSL_PREAMBLE,
        "I0000 00:00:1796157819.484412    6572 port.cc:153] oneDNN custom operations are on.",
        "I0000 00:00:1796158318.586844   14362 cpu_feature_guard.cc:227] This TensorFlow binary is optimized",
        "To enable the following instructions: AVX2 AVX512F, rebuild TensorFlow with the appropriate flags.",
        "E0000 00:00:1796157826.611808    6572 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
        "/x/y.py:3: UserWarning: something a library says",
        "Traceback (most recent call last):",
    ])
    assert console.filter_tf_output(captured, 3) == captured.splitlines()[-2:]
    assert console.filter_tf_output(captured, 2) == captured.splitlines()[-3:]
    assert console.filter_tf_output(captured, 0) == captured.splitlines()[1:]


def _error_line(capsys):
    """The last `error:` line on stderr (a `hint:` line with the command's remedy may follow it)."""
    return [line for line in capsys.readouterr().err.rstrip().splitlines() if ": error: " in line][-1]


def test_every_entry_point_names_itself_in_errors(tmp_path, capsys):
    """One style: the program the user typed, then `error:` (`kiqa-train: error: ...`)."""
    scripts = {}
    for line in (TESTS.parent / "setup.cfg").read_text().split("console_scripts =")[1].splitlines()[1:]:
        if "=" not in line:
            break
        name, target = (part.strip() for part in line.split("="))
        scripts[name] = target.split(":")[0]
    assert scripts.pop("kiqa") == "kiqa.cli"
    for name, module in scripts.items():
        assert _common.program_name(module) == name
    for command, (module, _) in cli.COMMANDS.items():
        expected = next((n for n, m in scripts.items() if m == module), f"kiqa {command}")
        assert _common.program_name(module) == expected
    missing = str(tmp_path / "missing.csv")
    assert train_cli.main(["--labels", missing, "--run-dir", str(tmp_path / "r")]) == 1
    assert _error_line(capsys).startswith("kiqa-train: error: label file not found")
    assert evaluate_cli.main([str(tmp_path / "no-run"), "--labels", missing]) == 1
    assert _error_line(capsys).startswith("kiqa-evaluate: error: ")
    assert cli.main(["train", "--labels", missing, "--run-dir", str(tmp_path / "r")]) == 1
    assert _error_line(capsys).startswith("kiqa train: error: label file not found")
    assert cli.main(["prepare", missing]) == 1
    assert _error_line(capsys).startswith("kiqa prepare: error: ")
    assert cli.main(["score", str(tmp_path), "--model", str(tmp_path / "no-model")]) == 1
    assert _error_line(capsys).startswith("kiqa score: error: ")


# Library modules whose error messages a command shows as they are (the flags they name must
# be that command's): checked with the command modules' own raise/stderr texts below.
SHOWN_BY = {
    "kiqa/data/validate.py": ("train", "evaluate"),
    "kiqa/serving/client.py": ("predict",),
}
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w-])")
# Where a clause naming another command ends: "kiqa fetch-koniq DIR (then --labels ...)".
_CLAUSE_END = re.compile(r"[;(),`\n]|\. |: ")
# "kiqa prepare LABELS --out DIR", "kiqa-train --verbose": flags after a command name are that command's.
_NAMED_COMMAND = re.compile(r"\bkiqa(?:-| )(" + "|".join(sorted(cli.COMMANDS, key=len, reverse=True)) + r")\b")


def _message_texts(path):
    """The string pieces of every `raise`, `parser.error(...)` and `print(..., file=sys.stderr)`."""
    import ast

    texts = []
    for node in ast.walk(ast.parse(Path(path).read_text())):
        target = None
        if isinstance(node, ast.Raise):
            target = node.exc
        elif isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Attribute) and node.func.attr == "error")
            or (isinstance(node.func, ast.Name) and node.func.id == "print"
                and any(k.arg == "file" for k in node.keywords))
        ):
            target = node
        if target is None:
            continue
        pieces = [n.value for n in ast.walk(target) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        texts.append(" ".join(pieces))
    if path.endswith("client.py"):  # its gRPC error table is raised by name
        source = Path(path).read_text()
        texts.append(source[source.index("_ERROR_MESSAGES = {"):source.index("class _MissingSignature")])
    return texts


def _flags_named(text, own_command):
    """(command, flag) for each --flag in a message: after `kiqa <command>`, that command's."""
    found, command = [], own_command
    marks = [*_FLAG.finditer(text), *_NAMED_COMMAND.finditer(text), *_CLAUSE_END.finditer(text)]
    for match in sorted(marks, key=lambda m: m.start()):
        if match.re is _NAMED_COMMAND:
            command = match.group(1)
        elif match.re is _CLAUSE_END:
            command = own_command
        else:
            found.append((command, match.group(0)))
    return found


def test_every_flag_an_error_names_is_accepted_by_that_commands_parser():
    """Issue 20.5: `kiqa evaluate` suggested --max-bad-fraction, which it rejected."""
    import importlib

    sources = {}
    for command, (module, _) in cli.COMMANDS.items():
        sources.setdefault(module.replace(".", "/") + ".py", []).append(command)
    for library, commands in SHOWN_BY.items():
        sources.setdefault(library, []).extend(commands)
    missing = []
    for path, commands in sources.items():
        for own in commands:
            for text in _message_texts(path):
                for command, flag in _flags_named(text, own):
                    if command not in cli.COMMANDS:
                        continue
                    parser = importlib.import_module(cli.COMMANDS[command][0]).build_parser()
                    if flag not in parser._option_string_actions:
                        missing.append(f"{path}: {command} has no {flag} ({text[:80]!r})")
    assert missing == [], "\n".join(missing)


def test_printed_next_steps_run_as_printed_without_activating_the_venv(tmp_path, monkeypatch):
    """Issue 20.5: the README's `.venv/bin/kiqa-train` printed `kiqa score ...`: command not found."""
    import shlex
    import shutil
    import types

    from helpers import make_tiny_run, write_generated_images
    from kiqa.cli import export as export_cli
    from kiqa.config import TrainConfig

    run = tmp_path / "run"
    make_tiny_run(run)
    images = tmp_path / "images"
    write_generated_images(images, 2)
    config = TrainConfig.load(run / "config.json").replace(labels=str(tmp_path / "labels.csv"), images=str(images))
    result = types.SimpleNamespace(run_dir=run, model_path=run / "model.keras")
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "kiqa").is_file():
        pytest.skip("kiqa's console scripts are not installed beside this Python")
    user_path = os.pathsep.join(p for p in ["/usr/local/bin", "/usr/bin", "/bin"]
                                if shutil.which("kiqa", path=p) is None)

    monkeypatch.setenv("PATH", user_path)  # a user who did not activate the venv
    steps = [line.strip() for line in train_cli.next_steps(result, config)[1:4]]
    assert all(step.startswith(shlex.quote(str(bin_dir / "kiqa")) + " ") for step in steps), steps
    env = {"PATH": user_path, "HOME": str(tmp_path), "PYTHONPATH": str(TESTS.parent)}
    process = subprocess.run(steps[0], shell=True, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-2000:]
    assert "2 files: 2 scored, 0 failed" in process.stdout
    # The other two as their parsers read them (running them needs a KonIQ split and an export).
    evaluate_cli.build_parser().parse_args(shlex.split(steps[1])[2:])
    export_cli.build_parser().parse_args(shlex.split(steps[2].split("#")[0])[2:])

    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), user_path]))  # activated: the bare name
    assert train_cli.next_steps(result, config)[1].strip().startswith("kiqa score ")


def test_a_mistyped_labels_path_points_to_fetch_koniq(tmp_path, capsys):
    """Issue 20.8: "label file not found" alone; the file may simply never have been downloaded."""
    from helpers import make_tiny_run

    make_tiny_run(tmp_path / "run")
    typo = tmp_path / "koniq10k_distributions_set.csv"
    for main, argv in [(evaluate_cli.main, [str(tmp_path / "run"), "--labels", str(typo), "--quiet"]),
                       (train_cli.main, ["--labels", str(typo), "--run-dir", str(tmp_path / "new"), "--quiet"])]:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"label file not found: {typo}" in err and "kiqa fetch-koniq DIR" in err and "--labels" in err
