"""Tests for kiqa.model: the output contract, the loss, saving, weights and the fast depthwise path.

Most tests use a three-layer stand-in backbone at 32-64 px. The real ConvNeXt-Tiny (28M
parameters, random init: no network here) is built a handful of times at 64x64; each build
takes about half a second on CPU.
"""

import h5py
import keras
import numpy as np
import pytest

from kiqa import model as kiqa_model
from kiqa.config import TrainConfig
from kiqa.errors import LambdaLayerError, ModelError

CONFIG = TrainConfig(weights="none")


def small_backbone(pool=False):
    """A three-conv stand-in for ConvNeXt: 0-255 images -> feature map (or vector)."""
    image = keras.Input(shape=(None, None, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(image)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    if pool:
        x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(image, x, name="small_cnn")


def images(batch=2, height=32, width=48, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 255.0, (batch, height, width, 3)).astype("float32")


def randomize_head(model, seed=0):
    """Gives the head visible weights, so predictions differ from image to image."""
    dense = model.get_layer("head_dense")
    kernel = np.random.default_rng(seed).normal(0.0, 0.5, dense.kernel.shape).astype("float32")
    dense.kernel.assign(kernel)


@pytest.fixture
def model():
    keras.utils.set_random_seed(0)
    built = kiqa_model.build_model(CONFIG, backbone=small_backbone())
    randomize_head(built)
    return built


# --- output contract --------------------------------------------------------------------


def test_output_contract(model):
    assert model.inputs[0].name == "image"
    assert model.output_names == ["mos"]
    out = model(images())
    assert set(out) == {"mos"}
    mos = keras.ops.convert_to_numpy(out["mos"])
    assert mos.shape == (2,)
    assert mos.dtype == np.float32
    assert np.all(np.isfinite(mos))
    assert mos[0] != mos[1]


@pytest.mark.parametrize("size", [(32, 48), (64, 40), (37, 53)])
def test_fully_convolutional_any_size(model, size):
    mos = keras.ops.convert_to_numpy(model(images(3, *size))["mos"])
    assert mos.shape == (3,)
    assert np.all(np.isfinite(mos))


def test_head_starts_at_koniq_mean_and_maps_to_0_100():
    built = kiqa_model.build_model(CONFIG, backbone=small_backbone())
    dense = built.get_layer("head_dense")
    assert float(dense.bias.numpy()[0]) == pytest.approx(0.5873)
    # With a zero kernel the output is exactly the bias on the 0-100 scale.
    dense.kernel.assign(np.zeros(dense.kernel.shape, "float32"))
    mos = keras.ops.convert_to_numpy(built(images(4))["mos"])
    np.testing.assert_allclose(mos, 58.73, rtol=1e-6)
    # Set the bias to 0.2 and a constant feature weight: output = 100 * (0.2 + w . f).
    dense.bias.assign([0.2])
    features = keras.ops.convert_to_numpy(built.get_layer("pool")(built.get_layer("backbone")(images(4))))
    kernel = np.full(dense.kernel.shape, 0.01, "float32")
    dense.kernel.assign(kernel)
    expected = 100.0 * (0.2 + features @ kernel[:, 0])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(built(images(4))["mos"]), expected, rtol=1e-5)


def test_initial_predictions_stay_near_the_mean():
    keras.utils.set_random_seed(1)
    built = kiqa_model.build_model(CONFIG, backbone=small_backbone())
    mos = keras.ops.convert_to_numpy(built(images(8))["mos"])
    assert np.all(np.abs(mos - 58.73) < 5.0)
    assert np.ptp(mos) > 0.0  # not collapsed: correlations are defined from the start


def test_backbone_returning_a_vector_needs_no_pooling():
    built = kiqa_model.build_model(CONFIG, backbone=small_backbone(pool=True))
    assert "pool" not in [layer.name for layer in built.layers]
    assert keras.ops.convert_to_numpy(built(images())["mos"]).shape == (2,)


def test_backbone_with_wrong_output_rank_is_rejected():
    image = keras.Input(shape=(None, None, 3))
    sequence = keras.layers.Reshape((-1, 3))(image)  # [batch, pixels, 3]
    with pytest.raises(ModelError, match="feature map"):
        kiqa_model.build_model(CONFIG, backbone=keras.Model(image, sequence))


def test_dropout_only_when_configured():
    without = kiqa_model.build_model(CONFIG, backbone=small_backbone())
    with_dropout = kiqa_model.build_model(CONFIG.replace(dropout=0.3), backbone=small_backbone())
    assert "head_dropout" not in [layer.name for layer in without.layers]
    assert with_dropout.get_layer("head_dropout").rate == pytest.approx(0.3)


def test_backbone_has_a_stable_name_and_can_be_frozen(model):
    backbone = model.get_layer("backbone")
    head_weights = 2  # Dense kernel and bias
    kiqa_model.set_backbone_trainable(model, False)
    assert not backbone.trainable
    assert len(model.trainable_weights) == head_weights
    kiqa_model.set_backbone_trainable(model, True)
    assert len(model.trainable_weights) == head_weights + len(backbone.weights)


def test_set_backbone_trainable_needs_a_kiqa_model():
    with pytest.raises(ModelError, match="no layer named 'backbone'"):
        kiqa_model.set_backbone_trainable(small_backbone(), False)


# --- loss and training ------------------------------------------------------------------


def test_mos_loss_is_mse_on_the_normalised_scale():
    y_true = np.array([50.0, 80.0, 20.0], "float32")
    y_pred = np.array([60.0, 70.0, 20.0], "float32")
    # ((50-60)/100)^2 = 0.01, ((80-70)/100)^2 = 0.01, 0
    per_image = keras.ops.convert_to_numpy(kiqa_model.mos_loss(y_true, y_pred))
    np.testing.assert_allclose(per_image, [0.01, 0.01, 0.0], atol=1e-7)
    # [batch, 1] targets must not broadcast against [batch] predictions to [batch, batch].
    column = keras.ops.convert_to_numpy(kiqa_model.mos_loss(y_true[:, None], y_pred))
    np.testing.assert_allclose(column, per_image)


def test_compiled_loss_matches_numpy_for_dict_and_plain_targets(model):
    x = images(6)
    y = np.array([20.0, 35.0, 50.0, 65.0, 80.0, 95.0], "float32")
    predicted = keras.ops.convert_to_numpy(model(x)["mos"])
    expected = np.mean(((y - predicted) / 100.0) ** 2)
    for targets in ({"mos": y}, y, {"mos": y[:, None]}):
        # Compile per target layout: Keras retraces a compiled evaluate for a new target
        # rank with an unknown-rank spec and then fails (even with loss="mse").
        model.compile(optimizer="adam", loss={"mos": kiqa_model.mos_loss})
        result = model.evaluate(x, targets, batch_size=6, verbose=0, return_dict=True)
        assert result["loss"] == pytest.approx(expected, rel=1e-4)


def test_fit_with_dict_targets_lowers_the_loss():
    keras.utils.set_random_seed(0)
    built = kiqa_model.build_model(CONFIG, backbone=small_backbone())
    x = images(8)
    y = {"mos": np.full(8, 90.0, "float32")}
    built.compile(optimizer=keras.optimizers.Adam(1e-2), loss={"mos": kiqa_model.mos_loss})
    before = built.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    history = built.fit(x, y, epochs=15, batch_size=8, verbose=0)
    assert set(history.history) == {"loss"}
    after = built.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert after < before / 2


# --- saving and loading -----------------------------------------------------------------


def test_keras_file_round_trip_in_safe_mode(model, tmp_path):
    x = images(3, 40, 56)
    y = np.array([40.0, 60.0, 80.0], "float32")
    model.compile(optimizer="adam", loss={"mos": kiqa_model.mos_loss})
    model.fit(x, {"mos": y}, epochs=1, verbose=0)  # a trained model: optimizer state is saved too
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = kiqa_model.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x)["mos"]), keras.ops.convert_to_numpy(model(x)["mos"])
    )
    assert loaded.get_layer("backbone") is not None
    assert loaded.evaluate(x, {"mos": y}, verbose=0) == pytest.approx(
        model.evaluate(x, {"mos": y}, verbose=0), rel=1e-6
    )


def test_load_model_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.keras"
    with pytest.raises(ModelError, match="nope.keras"):
        kiqa_model.load_model(missing)
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"this is not a zip archive")
    with pytest.raises(ModelError, match="garbage.keras"):
        kiqa_model.load_model(garbage)
    wrong_suffix = tmp_path / "model.h5"
    wrong_suffix.write_bytes(b"")
    with pytest.raises(ModelError, match=r"model\.h5 is not a \.keras file"):
        kiqa_model.load_model(wrong_suffix)


def test_load_model_refuses_lambda_unless_unsafe(tmp_path):
    image = keras.Input(shape=(4,))
    doubled = keras.layers.Lambda(lambda t: t * 2.0)(image)
    path = tmp_path / "lambda.keras"
    keras.Model(image, doubled).save(path)
    with pytest.raises(LambdaLayerError, match="safe_mode=False") as raised:
        kiqa_model.load_model(path)
    assert "lambda.keras" in str(raised.value)
    loaded = kiqa_model.load_model(path, safe_mode=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(np.ones((1, 4), "float32"))), 2.0)


# --- mixed precision --------------------------------------------------------------------


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_output_is_float32(mixed_float16):
    built = kiqa_model.build_model(CONFIG, backbone=small_backbone())
    assert built.get_layer("backbone").layers[-1].compute_dtype == "float16"
    for name in ("pool", "head_dense", "to_mos_scale", "mos"):
        assert built.get_layer(name).compute_dtype == "float32"
    mos = built(images())["mos"]
    assert mos.dtype == "float32"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(mos)))


def test_mixed_precision_convnext_runs_on_cpu(mixed_float16):
    built = kiqa_model.build_model(CONFIG.replace(variant="tiny"))
    mos = built(images(1, 64, 64))["mos"]
    assert mos.dtype == "float32"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(mos)))


# --- the real ConvNeXt-Tiny -------------------------------------------------------------


@pytest.fixture(scope="module")
def stock_tiny():
    """ConvNeXt-Tiny as keras.applications builds it (grouped Conv2D), random init.

    The layer-scale gammas start at 1e-6, which scales every block's depthwise branch
    down to nothing: a wrong depthwise kernel would leave the output unchanged. Setting
    them to 1 (trained ImageNet gammas are of order 0.1-1) makes the comparison bite.
    """
    keras.utils.set_random_seed(0)
    backbone = keras.applications.ConvNeXtTiny(include_top=False, weights=None, input_shape=(None, None, 3))
    scales = [layer for layer in backbone.layers if layer.name.endswith("_layer_scale")]
    assert len(scales) == 18
    for layer in scales:
        layer.gamma.assign(np.ones(layer.gamma.shape, "float32"))
    return backbone


@pytest.fixture(scope="module")
def fast_tiny(stock_tiny):
    return kiqa_model.fast_depthwise_backbone(stock_tiny)


def all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def grouped_convs(model):
    return [
        layer for layer in all_layers(model)
        if type(layer) is keras.layers.Conv2D and layer.groups > 1
    ]


def test_fast_depthwise_same_parameters_no_grouped_conv(stock_tiny, fast_tiny):
    assert len(grouped_convs(stock_tiny)) == 18
    assert grouped_convs(fast_tiny) == []
    depthwise = [layer for layer in all_layers(fast_tiny) if isinstance(layer, keras.layers.DepthwiseConv2D)]
    assert len(depthwise) == 18
    assert fast_tiny.count_params() == stock_tiny.count_params()
    assert {layer.name for layer in depthwise} == {layer.name for layer in grouped_convs(stock_tiny)}


def test_fast_depthwise_kernels_are_reshaped_copies(stock_tiny, fast_tiny):
    name = "convnext_tiny_stage_1_block_0_depthwise_conv"
    stock = stock_tiny.get_layer(name)
    fast = fast_tiny.get_layer(name)
    assert stock.kernel.shape == (7, 7, 1, 192)
    assert fast.kernel.shape == (7, 7, 192, 1)
    np.testing.assert_array_equal(fast.kernel.numpy()[:, :, :, 0], stock.kernel.numpy()[:, :, 0, :])
    np.testing.assert_array_equal(fast.bias.numpy(), stock.bias.numpy())
    dense = "convnext_tiny_stage_1_block_0_pointwise_conv_1"
    np.testing.assert_array_equal(
        fast_tiny.get_layer(dense).kernel.numpy(), stock_tiny.get_layer(dense).kernel.numpy()
    )


def test_fast_depthwise_outputs_equal_stock(stock_tiny, fast_tiny):
    x = images(2, 64, 64)
    stock = keras.ops.convert_to_numpy(stock_tiny(x))
    fast = keras.ops.convert_to_numpy(fast_tiny(x))
    assert stock.shape == fast.shape == (2, 2, 2, 768)
    # Measured: max abs difference 6.5e-6 at max |output| 4.0 (float32 round-off through
    # 18 blocks); one wrong depthwise kernel changes the output by ~50%.
    assert np.max(np.abs(fast - stock)) <= 1e-4 * np.max(np.abs(stock))


def test_fast_depthwise_keras_round_trip(fast_tiny, tmp_path):
    path = tmp_path / "fast.keras"
    fast_tiny.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert grouped_convs(loaded) == []
    x = images(1, 64, 64)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(fast_tiny(x))
    )


@pytest.fixture(scope="module")
def tiny_weights_file(stock_tiny, tmp_path_factory):
    """A local Keras weights file of a ConvNeXt-Tiny backbone (110 MB, written once)."""
    path = tmp_path_factory.mktemp("weights") / "tiny_backbone.weights.h5"
    stock_tiny.save_weights(path)
    return path


def test_local_weights_file_loads(stock_tiny, tiny_weights_file):
    path = tiny_weights_file
    built = kiqa_model.build_model(CONFIG.replace(weights=str(path)))
    backbone = built.get_layer("backbone")
    # Loaded first, converted afterwards: the depthwise kernels carry the file's values.
    conv = "convnext_tiny_stage_0_block_2_depthwise_conv"
    assert isinstance(backbone.get_layer(conv), keras.layers.DepthwiseConv2D)
    np.testing.assert_array_equal(
        backbone.get_layer(conv).kernel.numpy()[:, :, :, 0],
        stock_tiny.get_layer(conv).kernel.numpy()[:, :, 0, :],
    )
    # Every one of the 180 variables came from the file (in layer order; a depthwise
    # kernel (7, 7, C, 1) reshapes to the grouped (7, 7, 1, C) exactly).
    stock_weights = [v.numpy() for v in stock_tiny.weights]
    loaded_weights = [v.numpy() for v in backbone.weights]
    assert len(loaded_weights) == len(stock_weights) == 180
    for stock, loaded in zip(stock_weights, loaded_weights):
        np.testing.assert_array_equal(loaded.reshape(stock.shape), stock)


def test_keras_applications_notop_h5_format_loads(stock_tiny, tmp_path):
    # keras' own convnext_tiny_notop.h5 is in the legacy (Keras 2) h5 layout, which Keras 3
    # matches layer by layer in order; write one the same way to prove the path works offline.
    legacy = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")
    path = tmp_path / "convnext_tiny_notop.h5"
    with h5py.File(path, "w") as handle:
        legacy.save_weights_to_hdf5_group(handle, stock_tiny)
    built = kiqa_model.build_model(CONFIG.replace(weights=str(path), fast_depthwise=False))
    name = "convnext_tiny_stage_3_block_1_depthwise_conv"
    loaded = built.get_layer("backbone").get_layer(name)
    np.testing.assert_array_equal(loaded.kernel.numpy(), stock_tiny.get_layer(name).kernel.numpy())


def test_missing_weights_file_names_the_file(tmp_path):
    path = tmp_path / "missing.weights.h5"
    with pytest.raises(ModelError, match="missing.weights.h5") as raised:
        kiqa_model.build_model(CONFIG.replace(weights=str(path)))
    assert "ConvNeXt-Tiny" in str(raised.value)


def test_weights_of_another_variant_are_rejected(tiny_weights_file):
    path = tiny_weights_file
    with pytest.raises(ModelError, match="tiny_backbone.weights.h5") as raised:
        kiqa_model.build_model(CONFIG.replace(variant="small", weights=str(path)))
    assert "ConvNeXt-Small" in str(raised.value)
    # The fact is the library's; kiqa-train adds --variant (tests/test_train.py).
    assert "the variant the file was saved from" in str(raised.value)
    assert (raised.value.problem, raised.value.variant) == ("mismatch", "small")


def test_not_a_weights_file_is_rejected(tmp_path):
    path = tmp_path / "notes.weights.h5"
    path.write_text("not hdf5")
    with pytest.raises(ModelError, match="notes.weights.h5"):
        kiqa_model.build_model(CONFIG.replace(weights=str(path)))


def test_imagenet_without_network_explains_the_alternatives(monkeypatch, tmp_path, capsys):
    # keras.applications downloads through keras.src.utils.file_utils.get_file (the function
    # behind keras.utils.get_file); make it fail as it does offline, whatever the network.
    import keras.src.utils.file_utils as file_utils

    def offline(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(ModelError) as raised:
        kiqa_model.build_model(TrainConfig(weights="imagenet"))
    message = str(raised.value)
    assert "could not download the ImageNet weights for ConvNeXt-Tiny" in message
    assert "Name or service not known" in message
    # The fix in Python's words; kiqa-train states it once in flags instead (issue 20.8: it
    # repeated the library's alternatives in broken grammar).
    assert "weights='none'" in message and "random initial weights" in message
    assert "local Keras weights file" in message
    assert (raised.value.problem, raised.value.weights) == ("download", "imagenet")
    assert "convnext_tiny_notop.h5" in message
    assert raised.value.facts.startswith("could not download") and "weights" not in raised.value.facts[40:]
    from kiqa.cli import train as train_cli

    monkeypatch.setattr(train_cli, "select_backend", lambda backend: None)
    code = train_cli.main(["--weights", "imagenet", "--epochs", "1", "--run-dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("local Keras weights file") == 1 and "weights=" not in err
    assert "--weights PATH" in err and "--weights none" in err


def test_unknown_variant_is_rejected():
    with pytest.raises(ModelError, match="unknown ConvNeXt variant 'huge'"):
        kiqa_model.build_backbone("huge", "none")


def test_variant_table_covers_the_config_choices():
    from kiqa.config import VARIANTS

    assert set(kiqa_model.CONVNEXT_VARIANTS) == set(VARIANTS)
