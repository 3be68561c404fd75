import json

import pytest

from kiqa.config import TrainConfig
from kiqa.errors import ConfigError


def test_defaults_are_the_koniq_run():
    config = TrainConfig()
    assert config.image_size == (384, 512)
    assert config.split == "official"
    assert config.weights == "imagenet"
    assert config.variant == "tiny"


def test_demo_variant_is_small_and_overridable():
    config = TrainConfig.demo(weights="none", epochs=2)
    assert config.labels is None
    assert config.image_size[0] * config.image_size[1] < 384 * 512
    assert config.weights == "none" and config.epochs == 2
    assert config.resolved_run_dir.name == "demo"


def test_save_load_round_trip(tmp_path):
    config = TrainConfig.demo(image_size=(64, 96), seed=7)
    config.save(tmp_path / "config.json")
    loaded = TrainConfig.load(tmp_path / "config.json")
    assert loaded == config
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == [64, 96]


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("split", "kfold", "split must be one of"),
        ("variant", "huge", "variant must be one of"),
        ("monitor", "val_rmse", "monitor must be one of"),
        ("test_fraction", 1.5, "test_fraction"),
        ("image_size", (8, 8), "image_size"),
        ("batch_size", 0, "batch_size"),
    ],
)
def test_invalid_values_name_the_field(field, value, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**{field: value})


def test_repeated_split_needs_repeats():
    with pytest.raises(ConfigError, match="repeats"):
        TrainConfig(split="repeated", repeats=1)


def test_unknown_keys_in_a_config_file_are_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 3, "learning_rte": 0.1}))
    with pytest.raises(ConfigError, match="learning_rte"):
        TrainConfig.load(path)


def test_config_file_that_is_not_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("epochs: 3")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.load(path)


def test_changed_keys_names_the_fields_that_differ():
    config = TrainConfig.demo()
    assert config.changed_keys(config) == []
    assert config.changed_keys(config.replace(epochs=config.epochs + 1, seed=config.seed + 1)) == ["epochs", "seed"]
