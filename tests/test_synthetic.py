import numpy as np
import pandas as pd
from PIL import Image
from scipy import stats

from kiqa.data import koniq, synthetic


def test_demo_dataset_is_koniq_format_with_monotone_scores(tmp_path):
    labels = synthetic.write_demo_dataset(tmp_path / "demo", crops_per_photo=1, seed=0)
    raw = pd.read_csv(labels)
    for column in ("image_name", "c1", "c5", "c_total", "MOS", "SD", "MOS_zscore"):
        assert column in raw.columns
    frame = koniq.read_labels(labels)
    assert frame.attrs["format"] == koniq.DOWNLOAD_FILE
    assert len(frame) == len(synthetic.PHOTOS) * (1 + 3 * synthetic.LEVELS)
    # Scores fall with severity within every photo and distortion.
    for (_, kind), group in raw[raw.level > 0].groupby(["source_image", "distortion"]):
        assert stats.spearmanr(group.level, group.MOS_zscore).statistic < -0.9
    means = raw.groupby("level").MOS_zscore.mean()
    assert list(means) == sorted(means, reverse=True)
    assert raw.MOS.between(1, 5).all() and raw.MOS_zscore.between(0, 100).all()


def test_images_are_real_jpegs_of_the_stated_size(tmp_path):
    labels = synthetic.write_demo_dataset(tmp_path / "demo", crops_per_photo=1, size=(96, 128))
    raw = pd.read_csv(labels)
    for name in raw.image_name[:5]:
        with Image.open(labels.parent / "images" / name) as image:
            assert image.format == "JPEG" and image.size == (128, 96)


def test_same_seed_same_data(tmp_path):
    a = pd.read_csv(synthetic.write_demo_dataset(tmp_path / "a", crops_per_photo=1, seed=5))
    b = pd.read_csv(synthetic.write_demo_dataset(tmp_path / "b", crops_per_photo=1, seed=5))
    pd.testing.assert_frame_equal(a, b)
    first = a.image_name[3]
    assert (tmp_path / "a/images" / first).read_bytes() == (tmp_path / "b/images" / first).read_bytes()


def test_noise_actually_degrades_the_image(tmp_path):
    labels = synthetic.write_demo_dataset(tmp_path / "demo", crops_per_photo=1)
    images = labels.parent / "images"
    clean = np.asarray(Image.open(images / "coffee_0_pristine0.jpg"), float)
    errors = [np.abs(np.asarray(Image.open(images / f"coffee_0_noise{k}.jpg"), float) - clean).mean()
              for k in range(1, 6)]
    assert errors == sorted(errors) and errors[-1] > 3 * errors[0]


def test_demo_dataset_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KIQA_HOME", str(tmp_path))
    labels = synthetic.demo_dataset()
    stamp = labels.stat().st_mtime_ns
    assert synthetic.demo_dataset() == labels and labels.stat().st_mtime_ns == stamp
    assert labels.parent == synthetic.default_demo_dir()
