"""A training run's folder (`RunDir`) and the one resolver from a model path to what it is.

Every command that takes a model path (`kiqa score`, `kiqa evaluate`, `kiqa export`,
`kiqa.load_scorer`) resolves it here, so they accept the same paths and find the same
`config.json`. TensorFlow-free: resolving a path reads no model.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import List, Optional, Tuple, Union

from kiqa.config import TrainConfig
from kiqa.contract import PROVENANCE_FILE
from kiqa.errors import ConfigError, ModelError, ModelNotFoundError, OutputIsInputError, RunExistsError

CONFIG_FILE = "config.json"
MODEL_FILE = "model.keras"
CHECKPOINTS = "checkpoints"
BEST_CHECKPOINT = f"{CHECKPOINTS}/best.keras"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
HISTORY_FILE = "history.csv"
SAVED_MODEL_FILE = "saved_model.pb"
ONNX_FILE = "model.onnx"
KINDS = ("keras", "savedmodel", "onnx")

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class RunDir:
    """A run folder as `kiqa train` writes it (its files need not all exist yet).

    Attributes:
        path: the folder.
    """

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def model_path(self) -> Path:
        """The final model, written when training ends."""
        return self.path / MODEL_FILE

    @property
    def best_checkpoint(self) -> Path:
        return self.path / BEST_CHECKPOINT

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def predictions_path(self) -> Path:
        return self.path / PREDICTIONS_FILE

    @property
    def history_path(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def provenance_path(self) -> Path:
        return self.path / PROVENANCE_FILE

    @property
    def is_finished(self) -> bool:
        """True when training wrote its config, final model and test metrics."""
        return all(p.is_file() for p in (self.config_path, self.model_path, self.metrics_path))

    def config(self) -> Optional[TrainConfig]:
        """The run's `TrainConfig`.

        Returns:
            The config, or None when the run has no config.json.

        Raises:
            ConfigError: config.json exists but is unusable.
        """
        return TrainConfig.load(self.config_path) if self.config_path.is_file() else None

    @classmethod
    def of_model_file(cls, model_file: PathLike) -> Optional["RunDir"]:
        """The run a `.keras` file belongs to.

        Args:
            model_file: the `.keras` file.

        Returns:
            The folder with config.json beside the file, or above `checkpoints/` (for
            `checkpoints/best.keras`); None when there is none.
        """
        model_file = Path(model_file)
        candidates = [model_file.parent]
        if model_file.parent.name == CHECKPOINTS:
            candidates.append(model_file.parent.parent)
        for folder in candidates:
            if (folder / CONFIG_FILE).is_file():
                return cls(folder)
        return None


@dataclasses.dataclass(frozen=True)
class ModelPath:
    """What a model path resolved to.

    Attributes:
        given: the path as the caller passed it.
        kind: "keras", "savedmodel" or "onnx".
        model: the `.keras` file, the SavedModel version folder, or the `model.onnx` file.
        run: the run the `.keras` file belongs to (its config.json), or None (exports
            carry their own metadata; a bare `.keras` file has none).
    """

    given: Path
    kind: str
    model: Path
    run: Optional[RunDir] = None

    def config(self) -> Optional[TrainConfig]:
        """The run's `TrainConfig`.

        Returns:
            The config, or None (no run, or an export).

        Raises:
            ModelError: the run's config.json exists but is unusable; names both files.
        """
        if self.run is None:
            return None
        try:
            return self.run.config()
        except ConfigError as err:
            raise ModelError(
                f"{self.run.config_path} (the config of model {self.model}) is unusable: {err}"
            ) from err

    @property
    def version_dir(self) -> Optional[Path]:
        """The export's version folder (SavedModel or ONNX), None for a `.keras` model."""
        if self.kind == "savedmodel":
            return self.model
        if self.kind == "onnx":
            return self.model.parent
        return None


def saved_model_versions(base: PathLike) -> List[Tuple[int, Path]]:
    """The integer-named subfolders of a model base path that hold a SavedModel.

    Args:
        base: the model base path (e.g. export/kiqa).

    Returns:
        (version, folder) pairs sorted by version; empty when `base` is no folder.
    """
    return _versions(Path(base), SAVED_MODEL_FILE)


def _versions(base, marker):
    if not base.is_dir():
        return []
    return sorted(
        (int(child.name), child) for child in base.iterdir()
        if child.name.isdigit() and (child / marker).is_file()
    )


def resolve_model(model_ref: PathLike) -> ModelPath:
    """Resolves any model path a user passes.

    Accepted: a run folder (`model.keras` + `config.json`), a `.keras` file (its run is
    the folder with config.json beside it, or above `checkpoints/`), a SavedModel
    version folder or base path (its highest integer version), an ONNX export's
    `model.onnx`, version folder or base path (its highest version).

    Args:
        model_ref: the path.

    Returns:
        A `ModelPath`.

    Raises:
        ModelNotFoundError: (a ModelError) the path does not exist.
        ModelError: the path exists but is none of the layouts above; `path` names it.
    """
    given = Path(model_ref)
    if not given.exists():
        raise ModelNotFoundError(f"model {given} does not exist", path=str(given))
    if given.is_file():
        if given.suffix == ".onnx":
            return ModelPath(given, "onnx", given)
        if given.suffix == ".keras":
            return ModelPath(given, "keras", given, RunDir.of_model_file(given))
        raise ModelError(
            f"model {given} is not a .keras file, a .onnx file, a run folder or an export folder",
            path=str(given),
        )
    # ONNX first, as load_scorer always did: an ONNX base path may sit beside nothing else.
    if (given / ONNX_FILE).is_file():
        return ModelPath(given, "onnx", given / ONNX_FILE)
    onnx_versions = _versions(given, ONNX_FILE)
    if onnx_versions:
        return ModelPath(given, "onnx", onnx_versions[-1][1] / ONNX_FILE)
    if (given / MODEL_FILE).is_file():
        return ModelPath(given, "keras", given / MODEL_FILE, RunDir.of_model_file(given / MODEL_FILE))
    if (given / SAVED_MODEL_FILE).is_file():
        return ModelPath(given, "savedmodel", given)
    versions = saved_model_versions(given)
    if versions:
        return ModelPath(given, "savedmodel", versions[-1][1])
    if (given / BEST_CHECKPOINT).is_file():
        raise ModelError(
            f"run folder {given} has no {MODEL_FILE} (the run may not have finished); its best "
            f"checkpoint is {given / BEST_CHECKPOINT}",
            path=str(given),
        )
    raise ModelError(
        f"{given} is not a model: no {MODEL_FILE} (run folder), no {SAVED_MODEL_FILE} "
        f"(SavedModel version folder), no {ONNX_FILE} and no integer version folders holding "
        f"one (export base path); run folders are made by `kiqa train`, exports by `kiqa export`",
        path=str(given),
    )


def read_history(history_csv):
    """The per-epoch log of a run, tolerant of what a kill or a full disk leaves behind.

    Returns:
        A DataFrame with one row per epoch (the last row written for an epoch wins),
        empty when the file is missing, empty, truncated to nothing or unreadable.
    """
    import pandas as pd  # kiqa.run is imported by `import kiqa`'s lazy names: pandas only when read

    from kiqa.fsutil import PANDAS_READ_TEXT

    history_csv = Path(history_csv)
    try:
        history = pd.read_csv(history_csv, **PANDAS_READ_TEXT)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return pd.DataFrame({"epoch": pd.Series(dtype=int)})
    if "epoch" not in history.columns:
        return pd.DataFrame({"epoch": pd.Series(dtype=int)})
    history = history[pd.to_numeric(history["epoch"], errors="coerce").notna()]
    history = history.astype({"epoch": int})
    # A kill between the CSV row and the backup repeats an epoch on resume: keep the last.
    return history.drop_duplicates(subset="epoch", keep="last").reset_index(drop=True)


def completed_epochs(run_dir):
    """Epochs a run directory holds a record of (history rows and backups), 0 for none."""
    run_dir = Path(run_dir)
    count = max([len(read_history(h)) for h in run_dir.glob("**/history.csv")], default=0)
    for metadata in run_dir.glob("**/backup/training_metadata.json*"):
        try:
            count = max(count, int(json.loads(metadata.read_text())["epoch"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return count


def is_run_folder(folder):
    """Whether `folder` holds a kiqa run: a config.json that loads as a `TrainConfig`, or
    only the rejects.csv of a run whose image checks stopped it before its config."""
    if {child.name for child in folder.iterdir()} <= {"rejects.csv"}:
        return True
    try:
        TrainConfig.load(folder / "config.json")
    except ConfigError:
        return False
    return True


def check_run_folder(run_dir, config, overwrite, log):
    """Refuses to mix runs: a finished run, or a different config in a run that trained.

    A run that failed before its first completed epoch (a wrong label file, a part too
    small, a full disk at the first backup) holds nothing worth keeping: it is replaced.
    """
    if overwrite and run_dir.exists():
        # Only a run folder is removed: `--run-dir ~/photos --overwrite` must not delete photos.
        if run_dir.is_symlink() or not run_dir.is_dir() or (any(run_dir.iterdir()) and not is_run_folder(run_dir)):
            raise OutputIsInputError(
                f"{run_dir} is not a kiqa run folder (no readable config.json of a run in it), so it is "
                f"not replaced; it is left untouched: choose another run folder", path=str(run_dir))
        shutil.rmtree(run_dir)
    if (run_dir / "metrics.json").exists():
        raise RunExistsError(f"{run_dir} already holds a finished run (metrics.json)", run_dir, changed=())
    saved = run_dir / "config.json"
    if saved.exists():
        previous = TrainConfig.load(saved)
        if previous != config:
            changed = config.changed_keys(previous)
            if completed_epochs(run_dir) == 0:
                log(f"replacing {run_dir}: its earlier run completed no epoch (changed: {changed})")
                shutil.rmtree(run_dir)
                return
            raise RunExistsError(
                f"{run_dir} holds an unfinished run started with a different config "
                f"(changed: {changed}); rerun with the same settings to resume it",
                run_dir, changed, finished=False,
            )
