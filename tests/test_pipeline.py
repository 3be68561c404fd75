import numpy as np
import pytest

from helpers import collect

from kiqa.config import TrainConfig
from kiqa.data import koniq, synthetic
from kiqa.data.pipeline import make_dataset
from kiqa.image import load_image

SIZE = (32, 48)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    labels = synthetic.write_demo_dataset(tmp_path_factory.mktemp("demo") / "d", crops_per_photo=1)
    frame = koniq.read_labels(labels)
    frame["path"] = [str(labels.parent / "images" / n) for n in frame.image_name]
    return frame.head(40)




def test_eval_pipeline_matches_the_eager_image_function(demo):
    config = TrainConfig.demo(image_size=SIZE, batch_size=8)
    images, mos, index = collect(make_dataset(demo.path, demo.mos, config, training=False, with_index=True))
    np.testing.assert_array_equal(index, np.arange(len(demo)))
    np.testing.assert_allclose(mos, demo.mos, rtol=1e-6)
    for i in (0, 17, 39):
        np.testing.assert_array_equal(images[i], load_image(demo.path[i], SIZE).numpy())
    assert images.dtype == np.float32 and images.shape == (40, *SIZE, 3)


@pytest.mark.parametrize("cache", ["none", "memory", "file"])
def test_training_pipeline_shuffles_per_epoch_reproducibly(demo, cache, tmp_path):
    cache = str(tmp_path / "cache") if cache == "file" else cache
    config = TrainConfig.demo(image_size=SIZE, batch_size=8, cache=cache, hflip=False, seed=1)
    both = collect(make_dataset(demo.path, demo.mos, config, training=True, epochs=2))[1]
    first, second = both[:len(demo)], both[len(demo):]
    assert sorted(first) == sorted(second) == sorted(np.float32(demo.mos))
    assert not np.array_equal(first, second)  # reshuffled every epoch
    again = collect(make_dataset(demo.path, demo.mos, config, training=True))[1]
    np.testing.assert_array_equal(first, again)  # same seed, same order
    # Epoch 1 alone (a run resumed after epoch 0) is epoch 1 of the uninterrupted run.
    resumed = collect(make_dataset(demo.path, demo.mos, config, training=True, epochs=2, first_epoch=1))[1]
    np.testing.assert_array_equal(resumed, second)


def test_a_resumed_epoch_flips_the_same_images(demo):
    config = TrainConfig.demo(image_size=SIZE, batch_size=8, cache="none", hflip=True, seed=3)
    whole = collect(make_dataset(demo.path, demo.mos, config, training=True, epochs=3))[0]
    resumed = collect(make_dataset(demo.path, demo.mos, config, training=True, epochs=3, first_epoch=2))[0]
    np.testing.assert_array_equal(whole[2 * len(demo):], resumed)
    assert not np.array_equal(whole[:len(demo)], whole[len(demo):2 * len(demo)])


def test_cached_images_equal_uncached_ones(demo, tmp_path):
    plain = TrainConfig.demo(image_size=SIZE, batch_size=8)
    for cache in ("memory", str(tmp_path / "c")):
        cached = plain.replace(cache=cache)
        a = collect(make_dataset(demo.path, demo.mos, plain, training=False))[0]
        dataset = make_dataset(demo.path, demo.mos, cached, training=False)
        collect(dataset)  # fill the cache
        np.testing.assert_array_equal(a, collect(dataset)[0])


def test_hflip_only_mirrors(demo):
    config = TrainConfig.demo(image_size=SIZE, batch_size=40, hflip=True, cache="none", seed=0)
    plain = {float(m): img for img, m in zip(*collect(make_dataset(demo.path, demo.mos, config.replace(hflip=False), training=False))[:2])}
    images, mos, _ = collect(make_dataset(demo.path, demo.mos, config, training=True))
    flipped = 0
    for image, score in zip(images, mos):
        original = plain[float(score)]
        if np.array_equal(image, original):
            continue
        np.testing.assert_array_equal(image, original[:, ::-1])
        flipped += 1
    assert 5 < flipped < 35  # about half


def test_one_bad_file_does_not_stop_the_training_pipeline(demo, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    paths = list(demo.path[:10]) + [str(bad)]
    config = TrainConfig.demo(image_size=SIZE, batch_size=4)
    images, mos, index = collect(make_dataset(paths, np.arange(11.0), config, training=False, with_index=True))
    assert len(images) == 10 and 10 not in index


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_training_epochs_have_a_known_length_even_when_a_file_goes_bad(demo, tmp_path, cache):
    """Keras reads the step count ("3/3", not "1/Unknown"); the safety net keeps it true."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    paths = list(demo.path[:10]) + [str(bad)]
    config = TrainConfig.demo(image_size=SIZE, batch_size=4, cache=cache)
    dataset = make_dataset(paths, np.arange(11.0), config, training=True, with_index=True)
    assert int(dataset.cardinality()) == 3  # ceil(11 / 4)
    for _ in range(2):  # two epochs: the memory cache is filled by the first one, then read
        images, _, index = collect(dataset)
        assert len(images) == 11 and 10 not in index  # the gap is filled by a good image
        assert set(index.tolist()) == set(range(10))  # every good image in every epoch
