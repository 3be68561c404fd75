"""The distribution head: the 1-5 to 0-100 map, the loss, the judging metrics, the demo's
rater model, training, and its outputs through scoring and export."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kiqa import contract, distribution
from kiqa.config import TrainConfig
from kiqa.errors import ConfigError, DataError

# The seed of the large spread test (benchmarks/spread_seeds.py measures others).
SPREAD_SEED = 1

# ------------------------------------------------------------------ the map and moments


def test_koniq_map_is_the_fit_of_the_real_label_file(koniq_csv):
    """The documented constants are what the real file gives, not a guess."""
    frame = pd.read_csv(koniq_csv)
    shares = frame[["c1", "c2", "c3", "c4", "c5"]].to_numpy()
    fit = distribution.fit_mean_to_mos(shares, frame["MOS"])
    assert fit["n"] == 10073
    assert fit["slope"] == pytest.approx(contract.KONIQ_MOS_SLOPE, abs=1e-3)
    assert fit["intercept"] == pytest.approx(contract.KONIQ_MOS_INTERCEPT, abs=1e-3)
    assert fit["r"] == pytest.approx(distribution.KONIQ_FIT["r"], abs=1e-4)
    assert fit["residual_sd"] == pytest.approx(distribution.KONIQ_FIT["residual_sd"], abs=1e-3)
    assert fit["max_residual"] == pytest.approx(distribution.KONIQ_FIT["max_residual"], abs=1e-2)
    # The SD of the shares is KonIQ's SD column up to its sample (n - 1) correction.
    _, sd = distribution.rating_moments(shares)
    assert np.abs(sd - frame["SD"]).max() < 0.006
    assert np.abs(sd * np.sqrt(frame["c_total"] / (frame["c_total"] - 1)) - frame["SD"]).max() < 1e-6
    assert distribution.KONIQ_MEAN_SHARES == pytest.approx(shares.mean(0), abs=5e-4)


def test_map_and_moments_against_hand_computed_values():
    # All votes on 3: mean 3, spread 0, MOS 27.8174 * 3 - 29.2287 = 54.2235.
    mean, sd = distribution.rating_moments([0, 0, 1, 0, 0])
    assert (mean, sd) == (3.0, 0.0)
    assert distribution.mean_to_mos(3.0) == pytest.approx(54.2235)
    # Half on 1, half on 5: mean 3, SD 2 -> mos_sd 2 * 27.8174 = 55.6348 points.
    mean, sd = distribution.rating_moments([0.5, 0, 0, 0, 0.5])
    assert (mean, sd) == (3.0, 2.0)
    # 0.2 / 0.8 on 4 / 5: mean 4.8, SD sqrt(0.16) = 0.4.
    mean, sd = distribution.rating_moments([[0, 0, 0, 0.2, 0.8]])
    assert mean[0] == pytest.approx(4.8) and sd[0] == pytest.approx(0.4)


def test_rating_moments_layer_gives_mos_and_mos_sd_by_the_stated_rule():
    layer = distribution.RatingMoments()
    mos, sd = layer(np.array([[0.5, 0, 0, 0, 0.5], [0, 0, 0, 0.2, 0.8]], np.float32))
    np.testing.assert_allclose(mos, [54.2235, 27.8174 * 4.8 - 29.2287], atol=1e-3)
    np.testing.assert_allclose(sd, [55.6348, 27.8174 * 0.4], atol=1e-3)


# ------------------------------------------------------------------------------ the loss


def test_emd_loss_against_hand_computed_values():
    true = np.array([[1, 0, 0, 0, 0], [0, 0, 1, 0, 0]], np.float32)
    pred = np.array([[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]], np.float32)
    # CDFs 1,1,1,1,1 vs 0,1,1,1,1: one level differs by 1 -> mean 1/5; identical -> 0.
    np.testing.assert_allclose(distribution.emd_loss(true, pred), [0.2, 0.0], atol=1e-7)
    # Mass four levels off costs more than one level off (the order counts); KL-like
    # losses would give both the same value.
    far = distribution.emd_loss(np.array([[1, 0, 0, 0, 0]], np.float32), np.array([[0, 0, 0, 0, 1]], np.float32))
    np.testing.assert_allclose(far, [0.8], atol=1e-7)
    # A half split: CDFs .5,.5,.5,.5,1 vs 0,0,1,1,1 -> (.25 + .25 + .25 + .25 + 0) / 5.
    half = distribution.emd_loss(np.array([[0.5, 0, 0, 0, 0.5]], np.float32), np.array([[0, 0, 1, 0, 0]], np.float32))
    np.testing.assert_allclose(half, [0.2], atol=1e-7)


def test_rating_loss_adds_the_spread_term_against_hand_computed_values():
    # Same mean (3), different spread: squared EMD sees only a little of it.
    true = np.array([[0.5, 0, 0, 0, 0.5]], np.float32)  # SD 2 on 1-5
    pred = np.array([[0, 0, 1, 0, 0]], np.float32)  # SD 0
    plain = distribution.RatingLoss(spread_weight=0.0)(true, pred)
    np.testing.assert_allclose(plain, 0.2, atol=1e-6)  # squared EMD alone (as above)
    # + w * ((2 - 0) * 27.8174 / 100)^2 = 0.2 + w * 0.30953
    spread = (2 * contract.KONIQ_MOS_SLOPE / 100) ** 2
    np.testing.assert_allclose(distribution.RatingLoss(spread_weight=1.0)(true, pred), 0.2 + spread, rtol=1e-5)
    np.testing.assert_allclose(distribution.RatingLoss(spread_weight=0.5)(true, pred), 0.2 + spread / 2, rtol=1e-5)
    # One-level distributions one level apart: SD 0 and 0, so the spread term adds nothing.
    one = distribution.RatingLoss(spread_weight=30.0)(np.array([[1, 0, 0, 0, 0]], np.float32), np.array([[0, 1, 0, 0, 0]], np.float32))
    np.testing.assert_allclose(one, 0.2, atol=1e-6)
    # Its weight survives saving (a .keras file's compile config).
    restored = distribution.RatingLoss.from_config(distribution.RatingLoss(spread_weight=0.25).get_config())
    assert restored.spread_weight == 0.25


# --------------------------------------------------------------------- judging metrics


def test_emd_and_js_divergence_metrics():
    same = np.array([[0.1, 0.2, 0.4, 0.2, 0.1]])
    assert distribution.emd(same, same)[0] == 0 and distribution.js_divergence(same, same)[0] == pytest.approx(0)
    apart = distribution.js_divergence([[1, 0, 0, 0, 0]], [[0, 0, 0, 0, 1]])
    assert apart[0] == pytest.approx(1.0)  # disjoint: one bit
    assert distribution.emd([[1, 0, 0, 0, 0]], [[0, 0, 0, 0, 1]])[0] == pytest.approx(np.sqrt(0.8))


def test_intervals_are_quantiles_of_the_continuous_rating_distribution():
    # All votes on 3: the rating is uniform on [2.5, 3.5]; its central 50% is [2.75, 3.25].
    low = distribution.rating_quantiles([[0, 0, 1, 0, 0]], 0.25)
    high = distribution.rating_quantiles([[0, 0, 1, 0, 0]], 0.75)
    assert (low[0], high[0]) == pytest.approx((2.75, 3.25))
    mos_low, mos_high = distribution.intervals([[0, 0, 1, 0, 0]], 0.5)
    assert (mos_low[0], mos_high[0]) == pytest.approx((27.8174 * 2.75 - 29.2287, 27.8174 * 3.25 - 29.2287))


def test_coverage_of_a_perfect_prediction_is_nominal_for_the_votes_and_high_for_the_mos():
    rng = np.random.default_rng(0)
    shares = rng.dirichlet(np.ones(5) * 2, 400)
    mos = distribution.mean_to_mos(distribution.rating_moments(shares)[0])
    result = distribution.evaluate_distributions(shares, mos, shares)
    for level in ("0.5", "0.9"):
        entry = result["coverage"][level]
        assert entry["votes"] == pytest.approx(float(level), abs=1e-9)
        assert entry["votes_verdict"] == "calibrated"
    assert result["emd"] == 0 and result["sd_srcc"] == pytest.approx(1.0)
    # A too-narrow prediction (all mass on the middle level) is said to be too narrow.
    narrow = np.tile([0, 0, 1.0, 0, 0], (400, 1))
    judged = distribution.evaluate_distributions(shares, mos, narrow, predicted_sd=np.zeros(400) + 1e-6 * np.arange(400))
    assert judged["coverage"]["0.9"]["votes_verdict"] == "too narrow"
    assert any("90% interval is not calibrated for the true votes" in c for c in judged["cautions"])


def test_reliability_diagram_is_written(tmp_path):
    shares = np.random.default_rng(1).dirichlet(np.ones(5), 50)
    result = distribution.evaluate_distributions(shares, np.full(50, 50.0), shares)
    path = distribution.plot_reliability(result, tmp_path / "reliability.png")
    assert path.stat().st_size > 1000


# ---------------------------------------------------------------------- labels and demo


def test_both_koniq_layouts_carry_the_shares(tmp_path):
    from kiqa.data import koniq

    rows = "a.jpg,0.1,0.2,0.4,0.2,0.1,100"
    (tmp_path / "split.csv").write_text(f"image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,set\n{rows},55.0,1.1,training\n")
    (tmp_path / "download.csv").write_text(f"image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,MOS_zscore\n{rows},3.0,1.1,55.0\n")
    for name in ("split.csv", "download.csv"):
        frame = koniq.read_labels(tmp_path / name)
        np.testing.assert_allclose(koniq.require_shares(frame), [[0.1, 0.2, 0.4, 0.2, 0.1]], atol=1e-7)
        assert frame["mos"].iat[0] == 55.0


def test_shares_that_are_not_a_distribution_are_refused_by_line(tmp_path):
    from kiqa.data import koniq

    (tmp_path / "bad.csv").write_text(
        "image_name,c1,c2,c3,c4,c5,MOS_zscore\na.jpg,0.1,0.2,0.4,0.2,0.1,50\nb.jpg,0.5,0.5,0.5,0,0,50\n"
    )
    with pytest.raises(DataError, match=r"bad.csv: c1..c5 must be shares.*line\(s\) \[3\]"):
        koniq.require_shares(koniq.read_labels(tmp_path / "bad.csv"))
    (tmp_path / "none.csv").write_text("image_name,MOS_zscore\na.jpg,50\n")
    with pytest.raises(DataError, match="no rating distribution"):
        koniq.require_shares(koniq.read_labels(tmp_path / "none.csv"))


def test_demo_spread_follows_the_damage_and_its_kind(tmp_path):
    from kiqa.data import synthetic

    frame = pd.read_csv(synthetic.write_demo_dataset(tmp_path / "demo", crops_per_photo=1))
    by_level = frame[frame.distortion != "pristine"].groupby("level")["SD"].mean()
    assert frame[frame.distortion == "pristine"]["SD"].mean() < by_level[1] < by_level[3]
    by_kind = frame[frame.level >= 3].groupby("distortion")["SD"].mean()
    assert by_kind["noise"] > by_kind["jpeg"] > by_kind["blur"]
    # The scores are v2's: the rater model draws exactly the random numbers v2 drew.
    assert frame["MOS_zscore"].head(3).round(4).tolist() == pytest.approx([83.2808, 70.2420, 55.0564], abs=1e-4)  # v2, measured
    shares = frame[["c1", "c2", "c3", "c4", "c5"]].to_numpy()
    np.testing.assert_allclose(shares.sum(1), 1.0, atol=1e-9)
    # The shares' mean follows the score through KonIQ's line.
    mean, _ = distribution.rating_moments(shares)
    assert stats.pearsonr(distribution.mean_to_mos(mean), frame["MOS_zscore"]).statistic > 0.97


def test_head_is_a_checked_config_field():
    assert TrainConfig().head == "regression"
    with pytest.raises(ConfigError, match="head must be one of"):
        TrainConfig(head="ordinal")
    with pytest.raises(ConfigError, match="mos_loss_weight"):
        TrainConfig(head="distribution", mos_loss_weight=-1)
    with pytest.raises(ConfigError, match="sd_loss_weight"):
        TrainConfig(head="distribution", sd_loss_weight=-0.5)


# ----------------------------------------------------------------------------- training


@pytest.mark.large  # eight trainings of ~80 s each (12.5 min in all, 2-core machine): run with --run-large
def test_small_cnn_distribution_head_learns_the_spread_and_keeps_the_mos(tmp_path):
    """On demo photos it never saw, in each of the four folds (every photo held out once),
    the distribution head ranks the raters' spread (SRCC of mos_sd against the true spread
    well above 0) and its MOS SRCC stays within 0.05 of the regression head's, trained the
    same way on the same photos (tests/spread_proof.py, each run in a fresh deterministic
    process; benchmarks/spread_seeds.py runs it over seeds)."""
    import spread_proof
    from kiqa.scoring.scorer import load_scorer

    folds = range(len(spread_proof.demo_fit.FOLDS))
    spread = [spread_proof.train_in_subprocess(tmp_path, SPREAD_SEED, fold, "distribution") for fold in folds]
    regression = [spread_proof.train_in_subprocess(tmp_path, SPREAD_SEED, fold, "regression") for fold in folds]
    for run, plain in zip(spread, regression):
        print(f"fold {run['fold']} ({'+'.join(run['held_out'])}): SD SRCC {run['sd_srcc']:.3f}, EMD {run['emd']:.4f}, "
              f"JS {run['js']:.4f}, MOS SRCC {run['srcc']:.3f} (regression head {plain['srcc']:.3f})")
        assert run["n"] == plain["n"] == 256  # 2 photos x 8 crops x 16 versions
        assert run["sd_srcc"] > 0.5, run  # 0.67-0.88 here (docs/uncertainty.md)
        assert run["srcc"] >= plain["srcc"] - 0.05, (run, plain)
    assert np.mean([run["sd_srcc"] for run in spread]) > 0.65  # 0.79 here
    # A user's scorer of a saved run ranks the spread as the proof's figures said.
    labels = spread_proof.demo_fit.demo_labels(tmp_path, spread_proof.RECIPE)  # written by the first run
    test = pd.read_csv(labels)
    test = test[test.source_image.isin(spread[0]["held_out"])]
    table = load_scorer(spread[0]["run_dir"]).score_many([str(labels.parent / "images" / n) for n in test.image_name])
    assert stats.spearmanr(test["SD"], table["mos_sd"]).statistic == pytest.approx(spread[0]["sd_srcc"], abs=0.02)


@pytest.fixture(scope="session")
def distribution_run(tmp_path_factory):
    """(run dir, labels) of one tiny distribution-head run shared by this session's tests."""
    from helpers import demo_subset
    from kiqa.model import small_cnn
    from kiqa.train import train

    root = tmp_path_factory.mktemp("distribution-run")
    labels = demo_subset(root / "data", per_source=3)
    config = TrainConfig.demo(labels=str(labels), weights="none", image_size=(32, 32), batch_size=8, epochs=1,
                              patience=1, cache="none", run_dir=str(root / "run"), head="distribution")
    result = train(config, backbone=small_cnn((8, 16)), progress=False)
    return result, labels


def test_distribution_run_reports_spread_and_calibration(distribution_run):
    result, _ = distribution_run
    judged = result.metrics["distribution"]
    assert set(judged) >= {"emd", "js", "sd_plcc", "sd_srcc", "coverage", "interval_rule", "cautions"}
    assert judged["n"] == result.metrics["n"] and 0 <= judged["emd"] < 0.9 and 0 <= judged["js"] <= 1
    assert set(judged["coverage"]) == {f"{level:.1f}" for level in distribution.COVERAGE_LEVELS}
    assert (result.run_dir / "reliability.png").stat().st_size > 1000
    predictions = pd.read_csv(result.run_dir / "predictions.csv")
    assert [c for c in predictions.columns if c.startswith("predicted_")] == [
        "predicted_mos", "predicted_mos_sd"] + [f"predicted_p{k}" for k in range(1, 6)]
    np.testing.assert_allclose(predictions[[f"predicted_p{k}" for k in range(1, 6)]].sum(axis=1), 1, atol=1e-3)
    history = pd.read_csv(result.run_dir / "history.csv")
    assert {"dist_loss", "mos_loss"} <= set(history.columns)


def test_scorer_gives_every_output_of_a_distribution_model(distribution_run):
    from kiqa.scoring.scorer import load_scorer

    result, labels = distribution_run
    scorer = load_scorer(result.run_dir)
    assert scorer.distribution
    images = sorted((labels.parent / "images").glob("*.jpg"))[:3]
    table = scorer.score_many([*images, labels])  # the CSV is no image: an error row
    assert list(table.columns) == ["path", "mos", *contract.DISTRIBUTION_COLUMNS, "error"]
    assert table["mos_sd"][:3].notna().all() and np.isnan(table.loc[3, ["mos_sd", "p1"]].astype(float)).all()
    shares = table.loc[:2, list(contract.SHARE_COLUMNS)].to_numpy(float)
    mean, sd = distribution.rating_moments(shares)
    # mos and mos_sd follow from the shares by the stated rule (to the CSV's 4 decimals).
    np.testing.assert_allclose(table["mos"][:3], distribution.mean_to_mos(mean), atol=2e-3)
    np.testing.assert_allclose(table["mos_sd"][:3], contract.KONIQ_MOS_SLOPE * sd, atol=2e-3)
    assert scorer.score(images[0]) == table["mos"][0]


def test_kiqa_score_csv_has_the_distribution_columns_and_resumes(distribution_run, tmp_path, capsys):
    import csv

    from kiqa.cli import score as score_cli
    from kiqa.contract import DISTRIBUTION_CSV_COLUMNS
    from kiqa.scoring.table import read_scores

    result, labels = distribution_run
    images = sorted((labels.parent / "images").glob("*.jpg"))[:4]
    out = tmp_path / "scores.csv"
    assert score_cli.main([*map(str, images[:2]), "--model", str(result.run_dir), "--out", str(out)]) == 0
    assert score_cli.main([*map(str, images), "--model", str(result.run_dir), "--out", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    assert tuple(rows[0]) == DISTRIBUTION_CSV_COLUMNS == ("path", "mos", "mos_sd", "p1", "p2", "p3", "p4", "p5", "error")
    assert len(rows) == 5 and "2 from an earlier run" in capsys.readouterr().out
    assert all(float(row[2]) >= 0 and abs(sum(map(float, row[3:8])) - 1) < 1e-3 for row in rows[1:])
    assert set(read_scores(out)) == {str(p) for p in images}


def test_a_regression_csv_is_not_resumed_by_a_distribution_model(distribution_run, tmp_path):
    from kiqa.errors import NotScoresCsvError
    from kiqa.scoring.scorer import load_scorer
    from kiqa.scoring.table import score_paths

    from kiqa import provenance

    result, labels = distribution_run
    image = sorted((labels.parent / "images").glob("*.jpg"))[0]
    out = tmp_path / "scores.csv"
    out.write_text(f"path,mos,error\n{image},50.0000,\n")
    scorer = load_scorer(result.run_dir)
    # A sidecar naming this very model: the model check passes, the layout check must refuse.
    identity = scorer.identity()
    provenance.write_sidecar(out, scorer.provenance, identity["source"],
                             **{k: v for k, v in identity.items() if k != "source"})
    with pytest.raises(NotScoresCsvError, match="this model writes .*'mos_sd'"):
        score_paths([image], scorer, out, progress=False)
    assert out.read_text() == f"path,mos,error\n{image},50.0000,\n"


@pytest.fixture(scope="session")
def distribution_export(distribution_run, tmp_path_factory):
    from kiqa.serving.export import export_model

    result, _ = distribution_run
    return export_model(result.run_dir, base_path=tmp_path_factory.mktemp("dist-export") / "kiqa")


def test_savedmodel_signatures_carry_every_output_within_parity(distribution_run, distribution_export):
    import json

    import tensorflow as tf

    from kiqa.scoring.scorer import load_scorer

    result, labels = distribution_run
    info = json.loads((distribution_export / "assets.extra" / "kiqa.json").read_text())
    parity = info["parity"] if "parity" in info else info
    text = json.dumps(parity)
    assert "max_abs_diff_mos_sd" in text and "max_abs_diff_dist" in text
    loaded = tf.saved_model.load(str(distribution_export))
    for name in (contract.BYTES_SIGNATURE, contract.LENIENT_SIGNATURE, contract.PIXELS_SIGNATURE):
        assert {"mos", "mos_sd", "dist"} <= set(loaded.signatures[name].structured_outputs), name
    images = sorted((labels.parent / "images").glob("*.jpg"))[:3]
    lenient = loaded.signatures[contract.LENIENT_SIGNATURE](
        image_bytes=tf.constant([images[0].read_bytes(), b"not an image"]))
    assert np.isnan(lenient["dist"].numpy()[1]).all() and np.isfinite(lenient["dist"].numpy()[0]).all()
    exported = load_scorer(distribution_export).score_many(images)
    local = load_scorer(result.run_dir).score_many(images)
    for column in ("mos", *contract.DISTRIBUTION_COLUMNS):
        np.testing.assert_allclose(exported[column], local[column], atol=2e-3, err_msg=column)


def test_compare_judges_differences_against_the_predicted_spread(distribution_run, tmp_path):
    import shutil

    from kiqa.scoring.compare import compare_folders
    from kiqa.scoring.scorer import load_scorer

    result, labels = distribution_run
    images = sorted((labels.parent / "images").glob("*.jpg"))
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, chosen in ((a, images[:3]), (b, images[3:6])):
        folder.mkdir()
        for i, image in enumerate(chosen):
            shutil.copy(image, folder / f"{i}.jpg")
    compared = compare_folders([a, b], load_scorer(result.run_dir), tmp_path / "cmp", progress=False,
                               n_resamples=200)
    spread = compared.pairs[0]["spread"]
    per_image = pd.read_csv(tmp_path / "cmp" / "per_image.csv")
    pooled = np.sqrt((per_image["mos_sd_a"] ** 2 + per_image["mos_sd_b"] ** 2) / 2)
    np.testing.assert_allclose(per_image["diff_in_spreads"], per_image["diff"] / pooled, atol=1e-3)
    assert spread["beyond_spread_fraction"] == pytest.approx(np.mean(per_image["diff"].abs() > pooled))
    assert spread["mean_spread"] == pytest.approx(pooled.mean(), abs=1e-3)


def test_kiqa_predict_through_serve_dev_returns_every_output(distribution_run, distribution_export, tmp_path):
    from kiqa.cli import predict as predict_cli
    from kiqa.scoring.scorer import load_scorer
    from kiqa.serving.devserver import DevServer

    result, labels = distribution_run
    images = sorted((labels.parent / "images").glob("*.jpg"))[:3]
    out = tmp_path / "served.csv"
    with DevServer(distribution_export.parent, port=0, warmup=False) as server:
        code = predict_cli.main([*map(str, images), str(labels), "--server", server.address, "--out", str(out),
                                  "--timeout", "600"])  # a loaded test machine
    assert code != 0  # the label file is no image: a failed row, the others scored
    served = pd.read_csv(out)
    assert list(served.columns) == ["path", "mos", *contract.DISTRIBUTION_COLUMNS, "error"]
    assert served.loc[3, ["mos", "mos_sd", "p1"]].isna().all() and isinstance(served.loc[3, "error"], str)
    local = load_scorer(result.run_dir).score_many(images)
    for column in ("mos", *contract.DISTRIBUTION_COLUMNS):
        np.testing.assert_allclose(served[column][:3], local[column], atol=2e-3, err_msg=column)


@pytest.fixture(scope="session")
def distribution_onnx(distribution_run, tmp_path_factory):
    """The ONNX export (version folder) of `distribution_run`'s model."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    from kiqa.serving.onnx import export_onnx

    result, _ = distribution_run
    return export_onnx(result.run_dir, base_path=tmp_path_factory.mktemp("dist-onnx") / "kiqa-onnx")


def test_onnx_export_carries_every_output_within_parity(distribution_run, distribution_onnx):
    from kiqa.scoring.scorer import load_scorer
    from kiqa.serving import artifact

    result, labels = distribution_run
    version = distribution_onnx
    parity = artifact.read_metadata(version)["parity"]
    assert {"onnxruntime_vs_keras", "onnxruntime_vs_keras_mos_sd", "onnxruntime_vs_keras_dist"} <= set(parity)
    assert parity["onnxruntime_vs_keras_dist"]["images"] == 5 * parity["onnxruntime_vs_keras"]["images"]
    images = sorted((labels.parent / "images").glob("*.jpg"))[:3]
    onnx = load_scorer(version, engine="onnxruntime")
    assert onnx.distribution
    exported, local = onnx.score_many(images), load_scorer(result.run_dir).score_many(images)
    for column in ("mos", *contract.DISTRIBUTION_COLUMNS):
        np.testing.assert_allclose(exported[column], local[column], atol=2e-3, err_msg=column)


@pytest.mark.parametrize("engine", ["openvino", "openvino-bf16"])
def test_openvino_engines_give_every_output_like_onnxruntime(engine, distribution_run, distribution_onnx, tmp_path,
                                                             capsys):
    """The bf16 engine splits the model after the pool and runs the head in f32: all three
    head outputs come back. (On a CPU without bf16 OpenVINO computes in f32 anyway.)"""
    pytest.importorskip("openvino")
    from kiqa.cli import score as score_cli
    from kiqa.scoring.scorer import load_scorer
    from kiqa.serving.engines import BF16_TOLERANCE

    result, labels = distribution_run
    images = sorted((labels.parent / "images").glob("*.jpg"))[:4]
    reduced = engine == "openvino-bf16"
    scorer = load_scorer(distribution_onnx, engine=engine, **({"parity_images": images} if reduced else {}))
    assert scorer.distribution and scorer.engine == engine
    table = scorer.score_many(images)
    assert list(table.columns) == list(contract.DISTRIBUTION_CSV_COLUMNS)
    reference = load_scorer(distribution_onnx, engine="onnxruntime").score_many(images)
    # f32: ONNX Runtime's and OpenVINO's kernels differ by float rounding (the CSV's 4
    # decimals); bf16: the gate's bound (shares: 5 points, where bf16 features could move them).
    bounds = dict.fromkeys(("mos", "mos_sd"), BF16_TOLERANCE if reduced else 2e-3)
    bounds.update(dict.fromkeys(contract.SHARE_COLUMNS, 0.05 if reduced else 2e-3))
    for column, bound in bounds.items():
        np.testing.assert_allclose(table[column], reference[column], atol=bound, err_msg=column)
    if reduced:
        spread = scorer.precision_parity["mos_sd"]
        assert spread["max_abs_diff"] <= spread["tolerance"] == BF16_TOLERANCE
    out = tmp_path / "scores.csv"
    assert score_cli.main([*map(str, images), "--model", str(distribution_onnx), "--engine", engine,
                           "--out", str(out), "--quiet"]) == 0
    written = pd.read_csv(out)
    assert tuple(written.columns) == contract.DISTRIBUTION_CSV_COLUMNS
    assert ("mos_sd vs float32: max |d|" in capsys.readouterr().out) == reduced
    np.testing.assert_allclose(written["mos_sd"], table["mos_sd"], atol=1e-4)


def _keras_outputs(run_dir, pixels):
    from kiqa.model import load_model

    outputs = load_model(run_dir / "model.keras")(pixels, training=False)
    return {key: np.asarray(value, np.float64) for key, value in outputs.items()}


def _pixels(labels, count=4):
    from kiqa.image import load_image

    images = sorted((labels.parent / "images").glob("*.jpg"))[:count]
    return np.stack([load_image(image, (32, 32)).numpy() for image in images])


def test_litert_export_carries_every_output_within_parity(distribution_run, tmp_path):
    from kiqa.serving import artifact, litert

    result, labels = distribution_run
    version = litert.export_litert(result.run_dir, base_path=tmp_path / "kiqa-litert")
    info = artifact.read_metadata(version)
    assert [output["name"] for output in info["extra_outputs"]] == ["mos_sd", "dist"]
    keras_outputs = _keras_outputs(result.run_dir, pixels := _pixels(labels))
    for variant, (file_name, tolerance) in litert.VARIANTS.items():
        figures = info["parity"]
        assert figures[f"{variant}_vs_keras_mos_sd"]["max_abs_diff"] <= tolerance, variant
        assert figures[f"{variant}_vs_keras_dist"]["tolerance"] == pytest.approx(tolerance / contract.KONIQ_MOS_SLOPE)
        assert figures[f"{variant}_vs_keras_dist"]["images"] == 5 * figures[f"{variant}_vs_keras"]["images"]
        outputs = litert.run_interpreter_outputs(litert.load_interpreter(version / file_name), pixels)
        assert outputs["mos"].shape == outputs["mos_sd"].shape == (len(pixels),)
        assert outputs["dist"].shape == (len(pixels), 5)
        for key, bound in (("mos", tolerance), ("mos_sd", tolerance), ("dist", tolerance / contract.KONIQ_MOS_SLOPE)):
            np.testing.assert_allclose(outputs[key], keras_outputs[key].reshape(outputs[key].shape), atol=bound,
                                       err_msg=f"{variant} {key}")
        np.testing.assert_array_equal(litert.run_interpreter(litert.load_interpreter(version / file_name), pixels),
                                      outputs["mos"])


def test_kiqa_train_head_flag_reaches_the_config():
    from kiqa.cli.train import build_parser, resolve_config

    args = build_parser().parse_args(["--head", "distribution", "--backbone", "small-cnn", "--mos-loss-weight", "0.5",
                                      "--sd-loss-weight", "2"])
    config = resolve_config(args)
    assert (config.head, config.mos_loss_weight, config.sd_loss_weight) == ("distribution", 0.5, 2.0)
    assert resolve_config(build_parser().parse_args([])).head == "regression"
