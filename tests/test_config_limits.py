"""Issue 24 point 4: every config key is checked for type and sane range before anything runs,
through TrainConfig, --config files and kiqa-train's flags; label CSVs name the right lines."""

import json

import pytest

from kiqa.cli import train as train_cli
from kiqa.cli._common import EXIT_ERROR
from kiqa.config import TrainConfig
from kiqa.data.koniq import read_labels
from kiqa.data.labelled import read_labelled_csv
from kiqa.errors import ConfigError, DataError

# (key, JSON value, words the error must hold): wrong types, nulls, floats for ints,
# huge and non-finite numbers, sizes that cannot fit in memory.
BAD_VALUES = [
    ("image_size", "abc", "image_size must be [height, width]"),
    ("image_size", [384], "image_size must be [height, width]"),
    ("image_size", [384.5, 512], "image_size must be [height, width]"),
    ("image_size", [100000, 100000], "image_size must be at most"),
    ("image_size", [20000, 20000], "image_size must be at most"),
    ("train_crop", "big", "train_crop must be"),
    ("epochs", "10", "epochs must be a whole number"),
    ("epochs", 1e12, "epochs must be a whole number"),
    ("epochs", 10**12, "epochs must be between 1 and 10,000"),
    ("repeats", None, "repeats must be a whole number"),
    ("seed", 0.5, "seed must be a whole number"),
    ("seed", -1, "seed must be between 0"),
    ("seed", 2**40, "seed must be between 0"),
    ("max_pixels", 1e30, "max_pixels must be a whole number"),
    ("max_pixels", 10**30, "max_pixels must be between"),
    ("batch_size", 10**9, "batch_size must be between"),
    ("batch_size", True, "batch_size must be a whole number"),
    ("patience", [5], "patience must be a whole number"),
    ("learning_rate", "1e-4", "learning_rate must be a finite number"),
    ("learning_rate", 1e300, "learning_rate must be a positive finite number up to"),
    ("epsilon", -1.0, "epsilon must be a positive"),
    ("dropout", None, "dropout must be a finite number"),
    ("hflip", "yes", "hflip must be true or false"),
    ("hflip", 1, "hflip must be true or false"),
    ("split", 3, "split must be a string"),
    ("labels", {"nested": {"deeper": [1, 2]}}, "labels must be a string or null"),
    ("weights", ["imagenet"], "weights must be a string"),
]


@pytest.mark.parametrize("key, value, words", BAD_VALUES)
def test_a_bad_value_is_named_with_its_key(key, value, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("(", r"\(")):
        TrainConfig.demo(**{"weights": "none", key: value})


@pytest.mark.parametrize("key, value, words", BAD_VALUES[::3])
def test_a_bad_config_file_is_refused_by_kiqa_train_before_anything_runs(key, value, words, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({key: value}))
    assert train_cli.main(["--config", str(path), "--run-dir", str(tmp_path / "run")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ['{"learning_rate": NaN}', '{"learning_rate": Infinity}',
                                  '{"epochs": -Infinity}', '[' * 100000 + ']' * 100000, '{"a": 1'])
def test_non_finite_deeply_nested_or_broken_json_is_a_config_error(text, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="config file"):
        TrainConfig.load(path)


@pytest.mark.parametrize("flags, key", [
    (["--learning-rate", "nan"], "learning_rate"), (["--learning-rate", "inf"], "learning_rate"),
    (["--epochs", "1000000000000"], "epochs"), (["--batch-size", "1000000000"], "batch_size"),
    (["--image-size", "100000", "100000"], "image_size"), (["--image-size", "2048", "2048", "--batch-size", "64"],
                                                           "batch_size x image_size"),
])
def test_bad_flags_are_refused_naming_the_key(flags, key, tmp_path, capsys):
    assert train_cli.main([*flags, "--run-dir", str(tmp_path / "run"), "--weights", "none"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and not (tmp_path / "run").exists()


def test_sane_values_pass():
    config = TrainConfig.demo(weights="none", image_size=[1024, 1024], batch_size=32, seed=2**32 - 1,
                              epochs=10_000, learning_rate=1, max_pixels=10**9)
    assert config.image_size == (1024, 1024)


# --- label CSVs ------------------------------------------------------------------------------

def test_line_numbers_count_quoted_line_breaks_and_blank_lines(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('image_name,MOS_zscore,note\na.jpg,50,"two\nlines"\n\nb.jpg,50,x\nc.jpg,500,"x\ny\nz"\n'
                    'd.jpg,,x\n')
    with pytest.raises(DataError, match=r"line\(s\) \[6, 9\]"):  # 6: c.jpg, 9: d.jpg
        read_labels(path)
    good = tmp_path / "good.csv"
    good.write_text('image_name,MOS_zscore,note\na.jpg,50,"two\nlines"\nb.jpg,60,x\n')
    assert read_labels(good)["line"].tolist() == [2, 4]


def test_own_label_csv_lines_count_quoted_line_breaks(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('file,mos,note\na.jpg,3,"a\nb"\nb.jpg,x,y\n')
    with pytest.raises(DataError, match="lines 4"):
        read_labelled_csv(path, scale="1-5")


@pytest.mark.parametrize("header, column", [("image_name,MOS_zscore,MOS_zscore", "MOS_zscore"),
                                            ("image_name,image_name,MOS_zscore", "image_name")])
def test_a_column_named_twice_is_an_error_naming_it(header, column, tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(f"{header}\na.jpg,10,90\n")
    with pytest.raises(DataError, match=f"column '{column}' appears more than once"):
        read_labels(path)
    mine = tmp_path / "mine.csv"
    mine.write_text("file,mos,mos\na.jpg,3,4\n")
    with pytest.raises(DataError, match="column 'mos' appears more than once"):
        read_labelled_csv(mine, scale="1-5")
