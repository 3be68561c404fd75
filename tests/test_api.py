"""The public API (`import kiqa`): load_scorer -> Scorer.score / score_many, lazy names."""

import importlib
import inspect
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import kiqa
from kiqa.cli import score as score_cli
from kiqa.cli._common import EXIT_PARTIAL
from kiqa.errors import ConfigError, ImageError
from kiqa.serving import export

import helpers


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("api") / "run"
    # head_scale: scores differ by points between images, so a mix-up shows.
    helpers.make_tiny_run(run, seed=1, head_scale=50.0)
    return run


@pytest.fixture(scope="module")
def scorer(run_dir):
    return kiqa.load_scorer(run_dir)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Five generated photos and one truncated JPEG."""
    folder = tmp_path_factory.mktemp("api-photos")
    names = helpers.write_generated_images(folder, 5, seed=3)
    good = (folder / names[0]).read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 3])
    return folder, names


def test_score_of_a_path_and_of_its_bytes(scorer, photos):
    folder, names = photos
    path = folder / names[0]
    mos = scorer.score(path)
    assert isinstance(mos, float) and 0.0 <= mos <= 100.0
    assert scorer.score(str(path)) == mos
    assert scorer.score(path.read_bytes()) == mos
    # Another image scores differently (the tiny model's head is scaled to make it so).
    assert scorer.score(folder / names[1]) != mos


def test_score_of_a_bad_file_raises_the_reason(scorer, photos, tmp_path):
    folder, _ = photos
    with pytest.raises(ImageError, match="broken.jpg"):
        scorer.score(folder / "broken.jpg")
    with pytest.raises(ImageError, match="image bytes"):
        scorer.score(b"not an image")
    with pytest.raises(ImageError, match="missing.jpg.*cannot read"):
        scorer.score(tmp_path / "missing.jpg")


def test_score_many_gives_a_bad_file_a_row_and_equals_kiqa_scores_csv(scorer, run_dir, photos, tmp_path):
    folder, names = photos
    paths = [str(folder / name) for name in sorted([*names, "broken.jpg"])]
    table = scorer.score_many([*paths, str(tmp_path / "missing.jpg")], batch_size=2)
    assert list(table.columns) == ["path", "mos", "error"]
    assert list(table["path"]) == [*paths, str(tmp_path / "missing.jpg")]
    failed = table[table["error"].notna()]
    assert set(failed["path"]) == {str(folder / "broken.jpg"), str(tmp_path / "missing.jpg")}
    assert failed["mos"].isna().all() and all(isinstance(e, str) and e for e in failed["error"])
    assert table.loc[table["error"].isna(), "mos"].between(0, 100).all()

    out = tmp_path / "scores.csv"
    assert score_cli.main([str(folder), "--model", str(run_dir), "--out", str(out), "--quiet"]) == EXIT_PARTIAL
    csv = pd.read_csv(out, keep_default_na=False)
    expected = table.iloc[:-1]
    assert list(csv["path"]) == list(expected["path"])
    np.testing.assert_array_equal(
        [float(v) if v != "" else math.nan for v in csv["mos"]], expected["mos"].to_numpy()
    )
    assert list(csv["error"]) == [e or "" for e in expected["error"]]


def test_score_many_takes_bytes_and_paths_mixed(scorer, photos):
    folder, names = photos
    contents = (folder / names[2]).read_bytes()
    table = scorer.score_many([contents, folder / names[2], b""])
    assert list(table["path"]) == ["<bytes 0>", str(folder / names[2]), "<bytes 2>"]
    assert table["mos"][0] == table["mos"][1] and math.isnan(table["mos"][2])
    assert table["error"][2]


def test_the_scorer_is_the_forward_pass_of_evaluation(run_dir, scorer, photos):
    from kiqa.evaluate import predict_paths
    from kiqa.model import load_model

    folder, names = photos
    paths = [str(folder / name) for name in names]
    config = kiqa.TrainConfig.load(run_dir / "config.json").replace(cache="none")
    by_model = predict_paths(load_model(run_dir / "model.keras"), paths, config)
    by_scorer = predict_paths(scorer, paths, config)
    np.testing.assert_array_equal(by_model, by_scorer)
    np.testing.assert_allclose(scorer.score_many(paths)["mos"], by_scorer, atol=1e-4)


def test_train_and_evaluate_are_modules_and_functions(run_dir, tmp_path):
    from kiqa import evaluate as evaluate_module
    from kiqa import train as train_module

    assert train_module is kiqa.train and callable(kiqa.train) and kiqa.train.TrainResult
    assert evaluate_module is kiqa.evaluate and evaluate_module.predict_paths
    bare = tmp_path / "bare.keras"
    shutil.copy(run_dir / "model.keras", bare)
    # Calling the module calls kiqa.evaluate.evaluate, which needs a run config to know the data.
    with pytest.raises(ConfigError, match="bare.keras has no run config"):
        kiqa.evaluate(bare)
    assert kiqa.export_model is export.export_model and kiqa.Scorer.score_many


def test_import_kiqa_does_not_import_tensorflow():
    code = (
        "import sys, kiqa; kiqa.TrainConfig; kiqa.RunDir; "
        "print('tensorflow' in sys.modules, 'pandas' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["False", "False"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        kiqa.nothing


# ---------------------------------------------------------------- types and docstrings

# What the exported names take and return, beyond themselves (their methods are public too).
RETURNED_CLASSES = (("kiqa.run", "ModelPath"), ("kiqa.train", "TrainResult"),
                    ("kiqa.serving.export", "ExportOptions"), ("kiqa.provenance", "Provenance"))


def _public_face():
    """(qualified name, function, is a property) of every exported function and public method."""
    objects = {name: getattr(kiqa, name) for name in kiqa.__all__ if name != "__version__"}
    for name in ("train", "evaluate"):  # callable modules: the function of their name
        objects[name] = getattr(objects[name], name)
    for module, name in RETURNED_CLASSES:
        objects[name] = getattr(importlib.import_module(module), name)
    for name, obj in objects.items():
        if not inspect.isclass(obj):
            yield name, obj, False
            continue
        for attribute, member in vars(obj).items():
            if attribute.startswith("_"):
                continue
            if isinstance(member, property):
                yield f"{name}.{attribute}", member.fget, True
            elif inspect.isfunction(getattr(member, "__func__", member)):  # method, classmethod, staticmethod
                yield f"{name}.{attribute}", getattr(member, "__func__", member), False


def test_the_public_face_is_annotated_and_documented():
    """Every parameter and return annotated; Google-style Args/Returns/Raises where they apply."""
    problems = []
    for name, function, is_property in _public_face():
        signature = inspect.signature(function)
        params = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
        unannotated = [p.name for p in params if p.annotation is inspect.Parameter.empty]
        if unannotated or signature.return_annotation is inspect.Signature.empty:
            problems.append(f"{name}: unannotated {unannotated or 'return'}")
        doc = inspect.getdoc(function) or ""
        needs = {
            "Args:": bool(params),
            "Returns:": signature.return_annotation not in (None, "None") and not is_property,
            "Raises:": re.search(r"^\s+raise \w", inspect.getsource(function), re.M) is not None,
        }
        problems += [f"{name}: no {section}" for section, needed in needs.items() if needed and section not in doc]
    assert problems == []
def _python_api_stderr(tmp_path, env_extra):
    """stderr of a fresh process that imports kiqa, loads a scorer and scores bad files."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = tmp_path / "use_kiqa.py"
    script.write_text(textwrap.dedent(f"""
        import kiqa
        scorer = kiqa.load_scorer({str(tmp_path / "run")!r})
        frame = scorer.score_many({[str(tmp_path / n) for n in ("cut.jpg", "good.jpg")]!r})
        print(frame["error"].notna().tolist())
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KIQA_VERBOSE")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), **env_extra)
    process = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0 and process.stdout.strip() == "[True, False]", process.stderr[-2000:]
    return process.stderr


def test_python_api_hides_tf_start_up_and_decode_log_lines_like_the_cli(tmp_path):
    # Issue 20.6: `import kiqa; kiqa.load_scorer(...)` printed absl/oneDNN/cuInit lines, and
    # every bad file in score_many added "Local rendezvous is aborting" and JPEG log lines.
    import re

    helpers.make_tiny_run(tmp_path / "run")
    (name,) = helpers.write_generated_images(tmp_path / "photos", 1)
    good = (tmp_path / "photos" / name).read_bytes()
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    log_line = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|Local rendezvous", re.M)
    assert log_line.findall(_python_api_stderr(tmp_path, {})) == []
    # The same switch as the CLI shows everything.
    assert log_line.search(_python_api_stderr(tmp_path, {"KIQA_VERBOSE": "1"}))
