"""Tests for kiqa.scoring.compare and `kiqa compare`: pairing, statistics, outputs, ranking, CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kiqa.cli import compare as compare_cli
from kiqa.cli._common import EXIT_ERROR, EXIT_PARTIAL
from kiqa.scoring.compare import (
    bootstrap_mean_ci,
    compare_folders,
    folder_labels,
    paired_stats,
    wilcoxon_test,
    win_rate,
)
from kiqa.errors import ConfigError, DataError, ScoresFromAnotherModelError
from kiqa.scoring.scorer import load_scorer

import helpers

SIZE = helpers.EXPORT_SIZE
NAMES = [f"img{i:02d}.jpg" for i in range(8)] + ["sub/img08.jpg", "sub/img09.jpg"]


def make_tiny_run(run_dir):
    """A run directory with a tiny-backbone model whose scores differ by points between images."""
    helpers.make_tiny_run(run_dir, seed=2, head_scale=50.0)
    return run_dir


def recompress(source, target, quality):
    """Copies a folder of JPEGs as JPEGs at another quality (a worse 'system')."""
    for path in sorted(source.rglob("*.jpg")):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").save(out, "JPEG", quality=quality)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("compare") / "run")


@pytest.fixture(scope="module")
def scorer(run_dir):
    return load_scorer(run_dir)


@pytest.fixture(scope="module")
def systems(tmp_path_factory):
    """A: clean photos-like images; B: A at JPEG quality 5 with one image missing, one
    extra and one corrupt; C: A at quality 40."""
    root = tmp_path_factory.mktemp("systems")
    a, b, c = root / "sys_a", root / "sys_b", root / "sys_c"
    rng = np.random.default_rng(0)
    for i, name in enumerate(NAMES):
        path = a / name
        path.parent.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:48, 0:64]
        base = np.stack([x * 4 + i * 9, y * 5, (x * y) % 97], axis=-1)
        pixels = np.clip(base % 256 + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=95)
    recompress(a, b, quality=5)
    recompress(a, c, quality=40)
    (b / "img07.jpg").unlink()  # missing in B: img07 of A is unpaired
    (b / "only_b.jpg").write_bytes((b / "img00.jpg").read_bytes())  # extra in B
    (b / "img06.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")  # corrupt in B
    return a, b, c


def test_statistics_edge_cases():
    zeros = wilcoxon_test(np.zeros(6))
    assert zeros["p_value"] == 1.0 and "all differences are zero" in zeros["note"]
    single = wilcoxon_test([2.0])
    assert single["p_value"] is None and "at least 2 pairs" in single["note"]
    shifted = wilcoxon_test(np.linspace(1, 3, 20))
    assert shifted["p_value"] < 0.001
    assert bootstrap_mean_ci([], 100) == (None, None)
    assert bootstrap_mean_ci([4.0, 4.0, 4.0], 200) == (4.0, 4.0)
    data = np.random.default_rng(1).normal(2.0, 1.0, 50)
    low, high = bootstrap_mean_ci(data, 2000, seed=3)
    assert low < data.mean() < high and (low, high) == bootstrap_mean_ci(data, 2000, seed=3)
    assert bootstrap_mean_ci(data, 2000, seed=4) != (low, high)
    assert bootstrap_mean_ci([7.5], 100) == (7.5, 7.5)
    # The same interval as the hand-written percentile bootstrap it replaced (independent
    # resamples, same data), within Monte-Carlo error.
    rng = np.random.default_rng(5)
    means = data[rng.integers(0, data.size, size=(20_000, data.size))].mean(axis=1)
    reference = np.quantile(means, [0.025, 0.975])
    assert np.allclose(bootstrap_mean_ci(data, 20_000, seed=6), reference, atol=0.03)
    assert win_rate([1, 2, 3], [1, 0, 5]) == pytest.approx(0.5)  # one win, one tie, one loss
    same = paired_stats([50.0, 60.0], [50.0, 60.0], n_resamples=100)
    assert same["mean_diff"] == 0.0 and same["tie_fraction"] == 1.0 and same["wilcoxon"]["p_value"] == 1.0
    assert folder_labels(["x/out", "y/out", "z/my run/"]) == ["out", "out-2", "my_run"]


def test_two_folders_pair_by_relative_path(systems, scorer, tmp_path):
    a, b, _ = systems
    result = compare_folders([a, b], scorer, tmp_path / "cmp", progress=False, n_resamples=500, seed=1)
    assert result.labels == ("sys_a", "sys_b")
    expected_common = sorted(set(NAMES) - {"img06.jpg", "img07.jpg"})
    per_image = pd.read_csv(result.files["per_image"])
    assert per_image["path"].tolist() == expected_common == sorted(per_image["path"])
    assert result.n_common == len(expected_common)
    assert result.n_failed == 1

    unpaired = pd.read_csv(result.files["unpaired"])
    reasons = {(row.folder, row.path): row.reason for row in unpaired.itertuples()}
    assert "no scored counterpart in sys_b" in reasons[("sys_a", "img07.jpg")]
    assert "no scored counterpart in sys_a" in reasons[("sys_b", "only_b.jpg")]
    assert "could not be scored" in reasons[("sys_b", "img06.jpg")]
    assert "no scored counterpart in sys_b" in reasons[("sys_a", "img06.jpg")]
    assert result.n_unpaired == 3

    # Per-image numbers match the per-folder score CSVs, and the summary matches them.
    scores_a = pd.read_csv(result.files["scores-sys_a"])
    scores_a["path"] = [os.path.relpath(p, a) for p in scores_a["path"]]
    merged = per_image.merge(scores_a[["path", "mos"]], on="path")
    np.testing.assert_allclose(merged["mos_sys_a"], merged["mos"], atol=1e-4)
    np.testing.assert_allclose(per_image["diff"], per_image["mos_sys_a"] - per_image["mos_sys_b"], atol=2e-4)
    pair = result.pairs[0]
    assert (pair["a"], pair["b"], pair["n"]) == ("sys_a", "sys_b", len(expected_common))
    assert pair["mean_diff"] == pytest.approx(per_image["diff"].mean(), abs=1e-3)
    assert pair["median_diff"] == pytest.approx(per_image["diff"].median(), abs=1e-3)
    assert pair["mean_a"] - pair["mean_b"] == pytest.approx(pair["mean_diff"], abs=1e-6)
    assert pair["ci_low"] <= pair["mean_diff"] <= pair["ci_high"]
    fractions = (pair["a_better_fraction"], pair["b_better_fraction"], pair["tie_fraction"])
    assert all(0.0 <= f <= 1.0 for f in fractions) and sum(fractions) == pytest.approx(1.0)
    assert pair["a_better_fraction"] == pytest.approx((per_image["diff"] > 0).mean())
    assert 0.0 <= pair["wilcoxon"]["p_value"] <= 1.0
    assert result.ranking is None and "ranking" not in result.files

    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["n_common"] == result.n_common
    assert saved["pairs"][0]["mean_diff"] == pytest.approx(pair["mean_diff"])
    assert saved["model"]["kind"] == "keras" and saved["folders"][1]["n_failed"] == 1
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # Issue 20.4: the figure carries the model's provenance warning, and the difference is
    # weighed against the model's own error (unknown here: a bare tiny model).
    from PIL import Image
    from kiqa.plots import WARNING_KEY

    assert Image.open(tmp_path / "cmp" / "compare.png").text[WARNING_KEY].startswith("unknown provenance")
    assert "own test error is unknown" in saved["pairs"][0]["context"]["text"]

    # Rerunning reuses the scores (resume) and gives the same numbers.
    again = compare_folders([a, b], scorer, tmp_path / "cmp", progress=False, n_resamples=500, seed=1)
    assert all(s.n_skipped == s.n_files for s in again.summaries)
    assert again.pairs[0]["mean_diff"] == pair["mean_diff"] and again.pairs[0]["ci_low"] == pair["ci_low"]
    # ... but not with another model (or size): its scores must not be mixed with these.
    other = dataclasses.replace(scorer, image_size=(40, 56))
    with pytest.raises(ScoresFromAnotherModelError, match="holds scores from another model") as refused:
        compare_folders([a, b], other, tmp_path / "cmp", progress=False)
    assert refused.value.previous["image_size"] != refused.value.current["image_size"]


def test_three_folders_give_a_ranking(systems, scorer, tmp_path):
    a, b, c = systems
    result = compare_folders([a, b, c], scorer, tmp_path / "rank", progress=False, n_resamples=200)
    assert len(result.pairs) == 3
    expected_pairs = [("sys_a", "sys_b"), ("sys_a", "sys_c"), ("sys_b", "sys_c")]
    assert [(p["a"], p["b"]) for p in result.pairs] == expected_pairs
    ranking = pd.read_csv(result.files["ranking"])
    assert sorted(ranking["label"]) == ["sys_a", "sys_b", "sys_c"]
    assert ranking["rank"].tolist() == [1, 2, 3]
    assert ranking["mean_mos"].is_monotonic_decreasing
    rows = {row["label"]: row for row in result.ranking}
    for x, y in [("sys_a", "sys_b"), ("sys_a", "sys_c"), ("sys_b", "sys_c")]:
        assert rows[x][f"win_rate_vs_{y}"] + rows[y][f"win_rate_vs_{x}"] == pytest.approx(1.0)
    per_image = pd.read_csv(result.files["per_image"])
    assert len(per_image) == result.n_common == len(NAMES) - 2  # images scored in all three
    for label in ("sys_a", "sys_b", "sys_c"):
        assert rows[label]["mean_mos"] == pytest.approx(per_image[f"mos_{label}"].mean(), abs=1e-3)
    assert (tmp_path / "rank" / "compare.png").stat().st_size > 10_000


def test_ignore_extension_pairs_png_with_jpg(systems, scorer, tmp_path):
    a, _, _ = systems
    pngs, jpgs = tmp_path / "pngs", tmp_path / "jpgs"
    pngs.mkdir()
    jpgs.mkdir()
    for name in ("img00", "img01", "img02"):
        # The same bytes under a .png name: decode_image reads the format from the bytes.
        (pngs / f"{name}.png").write_bytes((a / f"{name}.jpg").read_bytes())
        (jpgs / f"{name}.jpg").write_bytes((a / f"{name}.jpg").read_bytes())
    with pytest.raises(DataError, match="no image is scored in all.*6 of the unpaired images differ only by their extension") as info:
        compare_folders([pngs, jpgs], scorer, tmp_path / "strict", progress=False)
    assert "--ignore-extension" not in str(info.value)  # the library states facts; the CLI names flags
    assert info.value.extension_pairable[0] == ("pngs", "img00.png")
    result = compare_folders([pngs, jpgs], scorer, tmp_path / "loose", progress=False,
                             ignore_extension=True, n_resamples=100)
    assert result.n_common == 3
    pair = result.pairs[0]
    assert pair["mean_diff"] == 0.0 and pair["tie_fraction"] == 1.0
    assert pair["wilcoxon"]["p_value"] == 1.0 and (pair["ci_low"], pair["ci_high"]) == (0.0, 0.0)


def test_bad_folder_arguments(systems, scorer, tmp_path):
    a, b, _ = systems
    with pytest.raises(ConfigError, match="at least two folders"):
        compare_folders([a], scorer, tmp_path / "x")
    with pytest.raises(ConfigError, match="bootstrap resamples must be at least 1"):
        compare_folders([a, b], scorer, tmp_path / "x", n_resamples=0)
    with pytest.raises(DataError, match="same folder is given twice"):
        compare_folders([a, a / ".." / a.name], scorer, tmp_path / "x")
    with pytest.raises(DataError, match="missing is not a folder"):
        compare_folders([a, tmp_path / "missing"], scorer, tmp_path / "x")


def test_cli_compare(systems, run_dir, tmp_path, capsys):
    a, b, _ = systems
    out = tmp_path / "cli"
    code = compare_cli.main([str(a), str(b), "--model", str(run_dir), "--out", str(out), "--quiet",
                             "--bootstrap", "200"])
    captured = capsys.readouterr()
    assert code == EXIT_PARTIAL  # one corrupt file in B
    assert "8 images scored in all 2 folders; 3 unpaired, 1 failed" in captured.out
    assert "sys_a vs sys_b (8 images)" in captured.out and "Wilcoxon" in captured.out
    assert "img06.jpg" in captured.err
    assert {"per_image.csv", "unpaired.csv", "compare.json", "compare.png"} <= set(os.listdir(out))
    with pytest.raises(SystemExit) as exit_info:
        compare_cli.main([str(a), "--model", str(run_dir), "--out", str(out)])
    assert exit_info.value.code == 2
    code = compare_cli.main([str(a), str(tmp_path / "nowhere"), "--model", str(run_dir), "--out", str(out)])
    assert code == EXIT_ERROR and "nowhere is not a folder" in capsys.readouterr().err
    # Another image size over the same --out: the CLI names the flag that rescores.
    code = compare_cli.main([str(a), str(b), "--model", str(run_dir), "--out", str(out), "--quiet",
                             "--bootstrap", "50", "--image-size", "40", "56"])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "holds scores from another model" in err and "--no-skip" in err


def test_suggests_ignore_extension_when_only_some_images_pair(systems, scorer, run_dir, tmp_path, capsys):
    """Two images pair by name, two more only without their extension: the hint still comes."""
    a, _, _ = systems
    left, right = tmp_path / "left", tmp_path / "right"
    left.mkdir()
    right.mkdir()
    for name in ("img00", "img01", "img02", "img03"):
        (left / f"{name}.jpg").write_bytes((a / f"{name}.jpg").read_bytes())
        suffix = ".jpg" if name in ("img00", "img01") else ".png"
        (right / f"{name}{suffix}").write_bytes((a / f"{name}.jpg").read_bytes())
    (right / "extra.jpg").write_bytes((a / "img04.jpg").read_bytes())  # unpaired, with no twin at all
    result = compare_folders([left, right], scorer, tmp_path / "some", progress=False, n_resamples=50)
    assert result.n_common == 2 and result.n_unpaired == 5
    assert result.extension_pairable == (("left", "img02.jpg"), ("left", "img03.jpg"),
                                         ("right", "img02.png"), ("right", "img03.png"))
    loose = compare_folders([left, right], scorer, tmp_path / "loose", progress=False, n_resamples=50,
                            ignore_extension=True)
    assert loose.n_common == 4 and loose.extension_pairable == ()
    code = compare_cli.main([str(left), str(right), "--model", str(run_dir), "--out", str(tmp_path / "cli"),
                             "--quiet", "--bootstrap", "50"])
    err = capsys.readouterr().err
    assert code == 0
    assert "4 unpaired image(s) differ only by their extension (e.g. left: img02.jpg)" in err
    assert "pass --ignore-extension" in err


def test_importing_the_plotting_modules_leaves_the_users_backend_alone():
    code = (
        "import matplotlib; matplotlib.use('svg'); import kiqa.plots, kiqa.scoring.compare; "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_difference_is_weighed_against_the_models_test_rmse():
    from kiqa.scoring.compare import effect_context
    from kiqa.provenance import Provenance

    record = Provenance(data="koniq", split="official", backbone="convnext-tiny", weights="imagenet",
                        test_metrics={"plcc": 0.9, "srcc": 0.9, "rmse": 8.0, "n": 2015})
    context = effect_context(0.12, record)
    assert context["ratio"] == 0.12 / 8.0 and "0.01x the model's test RMSE (8.00 MOS points)" in context["text"]
    assert "smaller than the model's own error" in context["text"]
    assert effect_context(0.12, None)["test_rmse"] is None
