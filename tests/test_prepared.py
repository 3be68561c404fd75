import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from helpers import collect
import tensorflow as tf
from PIL import Image

from kiqa.cli import prepare as prepare_cli
from kiqa.config import TrainConfig
from kiqa.data import koniq, prepared, synthetic
from kiqa.data.pipeline import make_dataset
from kiqa.data.validate import REJECT_COLUMNS
from kiqa.errors import ConfigError, DataError
from kiqa.fsutil import sha256_of

SIZE = (32, 48)
N = 40  # images used from the demo set (11 photos x 16 variants with one crop each)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    labels = synthetic.write_demo_dataset(tmp_path_factory.mktemp("demo") / "d", crops_per_photo=1)
    frame = koniq.read_labels(labels)
    frame = frame.head(N).copy()
    frame.attrs = dict(koniq.read_labels(labels).attrs)
    frame["path"] = [str(labels.parent / "images" / n) for n in frame.image_name]
    return labels, frame


@pytest.fixture(scope="module")
def store(demo, tmp_path_factory):
    labels, frame = demo
    out = tmp_path_factory.mktemp("prep") / "prepared"
    config = TrainConfig.demo(image_size=SIZE)
    return prepared.prepare_dataset(frame, labels.parent / "images", config, out, shards=3, progress=False)




def test_manifest_records_size_labels_and_every_image(demo, store):
    labels, frame = demo
    manifest = json.loads((store / prepared.MANIFEST).read_text())
    assert manifest["image_size"] == list(SIZE)
    assert manifest["max_pixels"] == TrainConfig.demo().max_pixels
    assert manifest["labels"]["path"] == str(labels.resolve())
    assert manifest["labels"]["sha256"] == sha256_of(labels)
    assert [e["image_name"] for e in manifest["images"]] == list(frame.image_name)
    assert [s["count"] for s in manifest["shards"]] == [14, 13, 13]
    assert sorted(p.name for p in store.glob("*.tfrecord")) == [s["file"] for s in manifest["shards"]]
    assert manifest["rejects"] == []


@pytest.fixture(scope="module")
def reference(demo):
    """make_dataset's evaluation pipeline over the demo files: the pixels to match."""
    _, frame = demo
    config = TrainConfig.demo(image_size=SIZE, batch_size=8, cache="none")
    dataset = make_dataset(frame.path, frame.mos, config, training=False, with_index=True)
    return dataset.element_spec, collect(dataset)


def test_eval_pixels_are_identical_to_make_dataset(demo, store, reference):
    _, frame = demo
    config = TrainConfig.demo(image_size=SIZE, batch_size=8, cache="none")
    store_set = prepared.open_prepared(store, config)
    assert store_set is not None
    dataset = store_set.dataset(frame.image_name, frame.mos, config, training=False, with_index=True)
    spec, expected = reference
    assert dataset.element_spec == spec
    got = collect(dataset)
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have, want)
    assert got[0].dtype == np.float32 and got[0].shape == (N, *SIZE, 3)


def test_a_subset_reads_only_its_rows_with_positions_in_the_subset(demo, store, reference):
    _, frame = demo
    config = TrainConfig.demo(image_size=SIZE, batch_size=4)
    rows = [1, 5, 6, 30, 39]
    part = frame.iloc[rows].reset_index(drop=True)
    store_set = prepared.open_prepared(store, config)
    images, mos, index = collect(store_set.dataset(part.image_name, part.mos, config, training=False, with_index=True))
    np.testing.assert_array_equal(index, np.arange(5))
    np.testing.assert_allclose(mos, part.mos, rtol=1e-6)
    np.testing.assert_array_equal(images, reference[1][0][rows])


def test_training_batches_equal_make_dataset_with_a_cache(demo, store):
    # Same shuffle (seeded buffer, a new order each epoch), same flips, same batches.
    _, frame = demo
    config = TrainConfig.demo(image_size=SIZE, batch_size=8, cache="memory", hflip=True, seed=3)
    reference = make_dataset(frame.path, frame.mos, config, training=True, epochs=2)
    store_set = prepared.open_prepared(store, config)
    candidate = store_set.dataset(frame.image_name, frame.mos, config, training=True, epochs=2)
    assert candidate.element_spec == reference.element_spec
    want, have = collect(reference), collect(candidate)
    np.testing.assert_array_equal(have[0], want[0])
    np.testing.assert_array_equal(have[1], want[1])
    epochs = [have[1][:len(frame)], have[1][len(frame):]]
    assert sorted(epochs[0]) == sorted(np.float32(frame.mos))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_mismatched_image_size_or_pixel_cap_is_refused_with_the_reason(store, caplog):
    other = TrainConfig.demo(image_size=(64, 96))
    assert prepared.open_prepared(store, other) is None
    assert "32x48" in caplog.text and "64x96" in caplog.text
    found, why = prepared.inspect_prepared(store, TrainConfig.demo(image_size=SIZE, max_pixels=1000))
    assert found is None and "max_pixels" in why
    found, why = prepared.inspect_prepared(store.parent / "nothing", TrainConfig.demo(image_size=SIZE))
    assert found is None and "no prepared set" in why


def test_dataset_refuses_names_it_cannot_serve(demo, store):
    _, frame = demo
    config = TrainConfig.demo(image_size=SIZE)
    store_set = prepared.open_prepared(store, config)
    with pytest.raises(DataError, match="not in the prepared set"):
        store_set.dataset(["nope.jpg"], [50.0], config, training=False)
    with pytest.raises(DataError, match="order"):
        store_set.dataset(list(frame.image_name[::-1]), list(frame.mos[::-1]), config, training=False)
    with pytest.raises(ConfigError, match="holds images at"):
        store_set.dataset(frame.image_name, frame.mos, config.replace(image_size=(64, 96)), training=False)


def test_failed_write_leaves_no_partial_folder_and_keeps_the_old_one(demo, store, tmp_path, monkeypatch):
    labels, frame = demo
    config = TrainConfig.demo(image_size=SIZE)
    out = tmp_path / "p"
    shutil.copytree(store, out)
    before = (out / prepared.MANIFEST).read_text()
    # Only the writing matters here: skip the checks and the real decoding (seconds of tracing).
    paths = list(frame.path)
    monkeypatch.setattr(prepared, "find_bad_images",
                        lambda *a, **k: (list(paths), pd.DataFrame(columns=REJECT_COLUMNS)))
    monkeypatch.setattr(prepared, "file_decoder", lambda size, max_pixels: lambda path: tf.zeros([*size, 3]))
    written = []

    def fail_on_the_second(*args, **kwargs):
        if written:
            raise OSError("disk full (simulated)")
        written.append(args)
        return b""

    monkeypatch.setattr(prepared, "_example", fail_on_the_second)
    with pytest.raises(OSError, match="disk full"):
        prepared.prepare_dataset(frame, labels.parent / "images", config, out, shards=2, progress=False)
    assert written  # it failed while writing shards, not before
    assert (out / prepared.MANIFEST).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p"]
    assert prepared.open_prepared(out, config) is not None


def test_replacing_user_data_is_refused(demo, tmp_path):
    labels, frame = demo
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a kiqa prepared set"):
        prepared.prepare_dataset(frame.head(2), labels.parent / "images", TrainConfig.demo(image_size=SIZE), out,
                                 progress=False)
    assert (out / "notes.txt").read_text() == "keep me"


def test_default_location_is_beside_the_labels(tmp_path):
    labels = tmp_path / "koniq" / "labels.csv"
    assert prepared.default_prepared_dir(labels, (384, 512)) == (tmp_path / "koniq" / "prepared-384x512").resolve()


def test_cli_lists_rejects_and_a_changed_source_makes_the_set_stale(tmp_path, capsys):
    data = tmp_path / "set"
    images = data / "images"
    images.mkdir(parents=True)
    rows = ["image_name,MOS_zscore"]
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 80, 120)).save(images / f"{i}.jpg")
        rows.append(f"{i}.jpg,{20 * (i + 1)}")
    (images / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    rows += ["corrupt.jpg,50", "missing.jpg,50"]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    argv = [str(data / "labels.csv"), "--image-size", "32", "48", "--quiet"]

    assert prepare_cli.main(argv, prog="kiqa prepare") == 3  # finished, but inputs failed
    err = capsys.readouterr().err
    assert "corrupt.jpg" in err and "missing.jpg" in err
    target = data / "prepared-32x48"  # the default: beside the labels
    config = TrainConfig.demo(image_size=(32, 48))
    store_set = prepared.open_prepared(target, config)
    assert store_set.image_names == ["0.jpg", "1.jpg", "2.jpg"]
    assert sorted(store_set.rejects.image_name) == ["corrupt.jpg", "missing.jpg"]

    (images / "0.jpg").unlink()  # deleting sources is fine: the pixels are stored
    assert prepared.open_prepared(target, config) is not None
    Image.new("RGB", (64, 48), (0, 0, 0)).save(images / "1.jpg", quality=50)
    found, why = prepared.inspect_prepared(target, config)
    assert found is None and "1.jpg" in why and "kiqa prepare" in why

    # Preparing again replaces the stale set in place.
    assert prepare_cli.main(argv, prog="kiqa prepare") == 3
    assert prepared.open_prepared(target, config).image_names == ["1.jpg", "2.jpg"]
    assert sorted(p.name for p in data.iterdir()) == ["images", "labels.csv", "prepared-32x48"]
    assert os.path.isfile(target / prepared.MANIFEST)


def test_a_set_decoded_by_an_older_image_function_is_not_used(tmp_path):
    import json as _json

    from kiqa.config import TrainConfig
    from kiqa.data import koniq, synthetic
    from kiqa.data.prepared import inspect_prepared, prepare_dataset

    labels = synthetic.write_demo_dataset(tmp_path / "demo", crops_per_photo=1, size=(32, 48))
    frame = koniq.read_labels(labels).head(6)
    config = TrainConfig.demo(image_size=(32, 48))
    out = prepare_dataset(frame, labels.parent / "images", config, tmp_path / "prep", progress=False)
    assert inspect_prepared(out, config)[0] is not None
    manifest = out / "manifest.json"
    data = _json.loads(manifest.read_text())
    data["decode_version"] = 1
    manifest.write_text(_json.dumps(data))
    prepared, why = inspect_prepared(out, config)
    assert prepared is None and "older kiqa image function" in why


def test_prepare_warns_when_it_upscales_with_sizes_and_disk_cost(tmp_path, capsys):
    """64x48 sources prepared at 96x128 (issue 15, item 9): said before the work, with the fix."""
    data = tmp_path / "small"
    (data / "images").mkdir(parents=True)
    rows = ["image_name,MOS_zscore"]
    for i in range(4):
        Image.new("RGB", (64, 48), (50 * i, 90, 30)).save(data / "images" / f"{i}.jpg")
        rows.append(f"{i}.jpg,{20 * (i + 1)}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    assert prepare_cli.main([str(data / "labels.csv"), "--image-size", "96", "128", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert ("kiqa prepare: warning: 4 of 4 images are smaller than 96x128 (source sizes: 48x64 (4)) "
            "and are upscaled when prepared: the prepared set takes 0 MB on disk") in err
    assert "--image-size 48 64" in err
    paths = [str(data / "images" / f"{i}.jpg") for i in range(4)]
    assert prepared.find_upscaled(paths, (96, 128)) == {(48, 64): 4}
    assert prepared.find_upscaled(paths, (48, 128)) == {(48, 64): 4}  # one side is enough
    assert prepared.find_upscaled(paths, (32, 48)) == {}  # downscaling is the normal case
    assert prepared.UpscaleWarning({(48, 64): 4}, 4, (96, 128)).disk_bytes == 4 * 96 * 128 * 3


def test_train_reads_a_set_prepared_elsewhere(tmp_path, capsys):
    """`kiqa prepare --out DIR` then `kiqa-train --prepared DIR` (issue 15, item 9)."""
    from kiqa.model import small_cnn
    from kiqa.cli import train as train_cli
    from kiqa.train import train

    demo = synthetic.write_demo_dataset(tmp_path / "demo", crops_per_photo=1, size=(32, 48))
    labels = demo.parent / "subset.csv"
    pd.read_csv(demo).groupby("source_image").head(5).to_csv(labels, index=False)  # 40 of 128 (speed)
    elsewhere = tmp_path / "elsewhere" / "prep"
    assert prepare_cli.main([str(labels), "--image-size", "32", "48", "--out", str(elsewhere), "--quiet"]) == 0
    args = train_cli.build_parser().parse_args(
        ["--labels", str(labels), "--prepared", str(elsewhere), "--image-size", "32", "48", "--split", "random",
         "--epochs", "1", "--batch-size", "16", "--run-dir", str(tmp_path / "run")])
    config = train_cli.resolve_config(args)
    assert config.prepared == str(elsewhere)
    result = train(config, backbone=small_cnn((8,)), progress=False)
    assert result.prepared_dir == elsewhere
    # A named set that does not match is an error, not a silent fallback to decoding.
    code = train_cli.main(["--labels", str(labels), "--prepared", str(elsewhere), "--image-size", "32", "32",
                           "--split", "random", "--run-dir", str(tmp_path / "run2"), "--quiet"])
    assert code == 1
    assert "kiqa-train: error: the prepared set" in capsys.readouterr().err
    assert train_cli.main(["--prepared", str(elsewhere), "--quiet"]) == 1  # the demo has no label file
    assert "--prepared needs --labels" in capsys.readouterr().err
