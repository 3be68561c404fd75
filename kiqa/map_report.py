"""Quality-map outputs on disk: `kiqa map`'s per-image files and `kiqa compare`'s difference maps.

Per image (`write_image_map`): `<name>.map.png` (the photo as the model saw it with the
map over it, a colour bar in MOS points, the model and its provenance warning),
`<name>.map.npy` (the map, float32 [rows, cols]) and `<name>.map.json` (score, grid,
cell size, worst and best regions, the model). Per pair of folders (`compare_maps`):
`<name>.diff.png` / `.diff.npy` of A - B per cell, and `maps.json` with the share of
cells where A is better, per image and for the folder.
"""

import dataclasses
import itertools
import os
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from kiqa import maps, provenance as provenance_lib
from kiqa.scoring.compare import _pairing_key
from kiqa.contract import DEFAULT_MAX_BYTES
from kiqa.errors import ConfigError, ImageError
from kiqa.fsutil import write_atomically, write_json_atomically
from kiqa.scoring.files import find_images

MAP_SUFFIXES = (".map.png", ".map.npy", ".map.json")
DIFF_SUFFIXES = (".diff.png", ".diff.npy")
COMPARE_MAPS_FILE = "maps.json"
# Differences smaller than this (MOS points) count as ties: float noise is not a win.
TIE_POINTS = 1e-3


def model_entry(scorer) -> Dict:
    """What an output records about the model that made a map (kiqa.provenance.report_entry)."""
    return provenance_lib.report_entry(scorer.provenance, scorer.source, kind=scorer.kind,
                                       image_size=list(scorer.image_size))


def output_stem(out_dir: Path, path: str, taken: set) -> Path:
    """`out_dir/<file name without extension>`, made unique among this run's outputs."""
    stem = Path(path).stem or "image"
    candidate, n = stem, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}_{n}"
    taken.add(candidate)
    return out_dir / candidate


def _existing(stem: Path, suffixes: Sequence[str]) -> List[Path]:
    return [stem.with_name(stem.name + s) for s in suffixes if stem.with_name(stem.name + s).exists()]


def render_map(pixels: np.ndarray, values: np.ndarray, path: Path, title: str, colour_label: str,
               warning: Optional[str], difference: bool = False) -> None:
    """Writes a PNG: the photo with the map over it (nearest cells), a labelled colour bar.

    Args:
        pixels: float32 [height, width, 3] 0..255 (the image as the model saw it).
        values: [rows, cols] map in MOS points.
        path: PNG to write (atomically).
        title: first line of the figure's title (the image, its score, the model).
        colour_label: the colour bar's label (its unit).
        warning: the model's provenance warning, printed under the image, or None.
        difference: a diverging colour scale centred on 0 (A - B maps).
    """
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    height, width = pixels.shape[:2]
    fig = Figure(figsize=(6.4, 4.6 + (0.5 if warning else 0)))
    axis = fig.subplots()
    axis.imshow(np.clip(pixels, 0, 255).astype(np.uint8), extent=(0, width, height, 0))
    if difference:
        limit = max(float(np.max(np.abs(values))), 0.5)
        style = dict(cmap="RdBu", vmin=-limit, vmax=limit)
    else:
        low, high = float(np.min(values)), float(np.max(values))
        middle, half = (low + high) / 2, max((high - low) / 2, 0.5)  # at least one point of range
        style = dict(cmap="RdYlGn", vmin=middle - half, vmax=middle + half)
    overlay = axis.imshow(values, extent=(0, width, height, 0), alpha=0.5, interpolation="nearest", **style)
    axis.set_axis_off()
    axis.set_title(title, fontsize=8)
    bar = fig.colorbar(overlay, ax=axis, fraction=0.046, pad=0.02)
    bar.set_label(colour_label, fontsize=8)
    if warning:
        fig.text(0.01, 0.01, "\n".join(textwrap.wrap("warning: " + warning, 110)), fontsize=6, color="darkred",
                 va="bottom")
    fig.tight_layout(rect=(0, 0.08 if warning else 0, 1, 1))
    dpi = 100  # not the MOS scale
    write_atomically(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"), suffix=".png")


def _save_npy(path: Path, values: np.ndarray) -> None:
    # The temporary name must end in .npy, or np.save appends it and the rename misses.
    write_atomically(Path(path), lambda tmp: np.save(tmp, values.astype(np.float32)), suffix=".npy")


@dataclasses.dataclass(frozen=True)
class MapResult:
    """One image's outcome in `write_maps`: its files, or why it has none."""

    path: str
    files: Tuple[str, ...] = ()
    summary: Optional[Dict] = None
    error: Optional[str] = None


def write_image_map(scorer, image: str, stem: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> MapResult:
    """Maps one image and writes its PNG, `.npy` and JSON next to `stem`.

    Raises:
        ImageError: the image cannot be read or decoded.
        QualityMapError: the model has no map.
    """
    quality, pixels = maps.map_image(scorer, image, max_bytes=max_bytes)
    return write_map_files(image, quality, pixels, stem, model_entry(scorer), scorer.source)


def write_map_files(image: str, quality: "maps.QualityMap", pixels: np.ndarray, stem: Path, model: Dict,
                    source: str, size_known: bool = True) -> MapResult:
    """Writes `<stem>.map.png`, `.map.npy` and `.map.json` of one map.

    Args:
        image: the image's path (named in the figure and the JSON).
        quality: its `kiqa.maps.QualityMap`.
        pixels: the photo to draw under the map, float32 [h, w, 3] 0..255 (any size: the
            map is stretched over it).
        stem: output path without the suffixes.
        model: the model's `kiqa.provenance.report_entry` (its warning goes on the figure).
        source: what to call the model in the figure.
        size_known: `quality.image_size` is the model's input size (False for a served
            map, whose export size a gRPC client cannot read: the JSON then leaves the
            size and cell size in pixels out; the boxes are fractions either way).
    """
    summary = {"image": str(image), **quality.summary(), "model": model}
    if not size_known:
        summary["image_size"] = summary["cell_size_pixels"] = None
    png, npy, js = (stem.with_name(stem.name + s) for s in MAP_SUFFIXES)
    title = (f"{Path(image).name}: MOS {quality.mos:.2f}, map {quality.grid[0]}x{quality.grid[1]} cells\n"
             f"model {source}")
    render_map(pixels, quality.values, png, title, "local MOS (0-100, higher is better)", model["warning"])
    _save_npy(npy, quality.values)
    write_json_atomically(js, summary, sort_keys=True)
    return MapResult(str(image), (str(png), str(npy), str(js)), summary)


def served_maps(client, paths: Sequence[str], out_dir, record, overwrite: bool = False,
                max_bytes: int = DEFAULT_MAX_BYTES) -> List[MapResult]:
    """`write_maps` through a TF Serving endpoint (what `kiqa predict` writes when asked for maps).

    The server decodes each file; the photo under the map is decoded here by the same
    function at the map's grid times `_SERVED_CELL_PIXELS` (the export's own size is not
    readable over gRPC), for the figure only.

    Args:
        client: a connected `kiqa.serving.client.ServingClient`.
        paths: image files (already listed).
        out_dir: output folder (created).
        record: the served model's `kiqa.provenance.Provenance`, or None.
        overwrite: replace earlier outputs of the same name.
        max_bytes: per-file byte cap.

    Returns:
        One `MapResult` per path.

    Raises:
        ServingError: a failure that is not one file's fault (no server, no signature).
    """
    import tensorflow as tf

    from kiqa.image import decode_image, describe_decode_error, read_image_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = f"{client.server}/{client.model_name}"
    model = provenance_lib.report_entry(record, source, kind="served")
    taken: set = set()
    results = []
    for path in paths:
        stem = output_stem(out, path, taken)
        existing = _existing(stem, MAP_SUFFIXES)
        if existing and not overwrite:
            results.append(MapResult(str(path), error=f"{existing[0]} exists from an earlier run; kept"))
            continue
        try:
            contents = read_image_bytes(path, max_bytes=max_bytes)
            mos, values = client.quality_map(contents, name=str(path))
            size = (values.shape[0] * _SERVED_CELL_PIXELS, values.shape[1] * _SERVED_CELL_PIXELS)
            pixels = np.asarray(decode_image(contents, size), np.float32)
        except ImageError as err:
            results.append(MapResult(str(path), error=str(err)))
            continue
        except tf.errors.OpError as err:  # the server decoded it; a local decoder may still refuse
            results.append(MapResult(str(path), error=f"{path}: {describe_decode_error(err, path)}"))
            continue
        quality = maps.QualityMap(values=values, mos=mos, image_size=size)
        results.append(write_map_files(path, quality, pixels, stem, model, source, size_known=False))
    return results


# Pixels per map cell of the photo drawn under a served map.
_SERVED_CELL_PIXELS = 16


def write_maps(scorer, images: Sequence[str], out_dir, overwrite: bool = False,
               max_bytes: int = DEFAULT_MAX_BYTES) -> List[MapResult]:
    """Maps every image file (folders are searched like `kiqa score`); a bad file is a
    result with an error, never the end of the job.

    Args:
        scorer: a loaded `kiqa.scoring.scorer.Scorer` (Keras model or SavedModel).
        images: image files and folders.
        out_dir: output folder (created).
        overwrite: replace earlier outputs of the same name (else such an image gets an
            error naming the file, and the earlier map is kept).
        max_bytes: per-file byte cap.

    Returns:
        One `MapResult` per image file, in input order.

    Raises:
        QualityMapError: the model has no map (nothing is written).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    taken: set = set()
    results = []
    for path, listing_error in find_images(images):
        if listing_error:
            results.append(MapResult(path, error=listing_error))
            continue
        stem = output_stem(out, path, taken)
        existing = _existing(stem, MAP_SUFFIXES)
        if existing and not overwrite:
            results.append(MapResult(path, error=f"{existing[0]} exists from an earlier run; kept", files=()))
            continue
        try:
            results.append(write_image_map(scorer, path, stem, max_bytes))
        except ImageError as err:
            results.append(MapResult(path, error=str(err)))
    return results


def _paired_files(folder: str, ignore_extension: bool) -> Dict[str, str]:
    """Relative pairing key -> file path of every image in `folder` (as compare pairs them)."""
    files = {}
    for path, error in find_images([folder]):
        if not error:
            files[_pairing_key(os.path.relpath(path, folder), ignore_extension)] = path
    return files


def compare_maps(scorer, folders: Sequence[str], labels: Sequence[str], keys: Sequence[str], out_dir,
                 ignore_extension: bool = False, max_bytes: int = DEFAULT_MAX_BYTES) -> Dict:
    """For every pair of folders (first minus second), the A - B map of each paired image.

    Writes `<out>/maps/<A>-vs-<B>/<name>.diff.png` and `.diff.npy` and `<out>/maps.json`.

    Args:
        scorer: a loaded `kiqa.scoring.scorer.Scorer`.
        folders: the compared folders, in order.
        labels: their labels (as `kiqa.scoring.compare.folder_labels` made them).
        keys: the paired relative paths (`compare_folders`' common images).
        out_dir: compare's output folder.
        ignore_extension: keys are relative paths without extension.
        max_bytes: per-file byte cap.

    Returns:
        The `maps.json` content: per pair, the share of cells where A is better, where
        B is, and ties, over all paired images, and per image.

    Raises:
        QualityMapError: the model has no map.
        ConfigError: fewer than two folders.
    """
    if len(folders) < 2:
        raise ConfigError(f"difference maps need at least two folders, got {len(folders)}")
    out = Path(out_dir)
    files = [_paired_files(folder, ignore_extension) for folder in folders]
    pairs = {(i, j): {"a": labels[i], "b": labels[j], "images": [], "errors": []}
             for i, j in itertools.combinations(range(len(folders)), 2)}
    warning = provenance_lib.warning_for(scorer.provenance)
    for key in keys:
        found: Dict[int, Tuple[maps.QualityMap, np.ndarray]] = {}
        errors = {}
        for index, table in enumerate(files):
            try:
                found[index] = maps.map_image(scorer, table[key], max_bytes=max_bytes)
            except (ImageError, KeyError) as err:
                errors[index] = str(err)
        for (i, j), pair in pairs.items():
            if i not in found or j not in found:
                pair["errors"].append({"path": key, "error": errors.get(i) or errors.get(j)})
                continue
            diff = maps.difference_map(found[i][0], found[j][0])
            folder = out / "maps" / f"{labels[i]}-vs-{labels[j]}"
            folder.mkdir(parents=True, exist_ok=True)
            stem = folder / _safe_name(key)
            title = (f"{key}: {labels[i]} - {labels[j]} per cell (MOS {found[i][0].mos:.2f} vs "
                     f"{found[j][0].mos:.2f})\nmodel {scorer.source}")
            render_map(found[i][1], diff, stem.with_name(stem.name + ".diff.png"), title,
                       f"MOS {labels[i]} - {labels[j]} (points; > 0: {labels[i]} better)", warning, difference=True)
            _save_npy(stem.with_name(stem.name + ".diff.npy"), diff)
            pair["images"].append({
                "path": key, "mean_diff": round(float(diff.mean()), 4),
                "a_better_share": round(float(np.mean(diff > TIE_POINTS)), 4),
                "cells": int(diff.size), "a_better_cells": int(np.sum(diff > TIE_POINTS)),
                "b_better_cells": int(np.sum(diff < -TIE_POINTS)),
                "diff_png": str(stem.with_name(stem.name + ".diff.png")),
                "diff_npy": str(stem.with_name(stem.name + ".diff.npy")),
            })
    summary = {"model": model_entry(scorer), "difference": "first minus second folder of each pair, per map cell, "
               "MOS points; positive means the first is better there", "tie_points": TIE_POINTS, "pairs": []}
    for pair in pairs.values():
        cells = sum(item["cells"] for item in pair["images"])
        a_cells = sum(item["a_better_cells"] for item in pair["images"])
        b_cells = sum(item["b_better_cells"] for item in pair["images"])
        summary["pairs"].append({
            **{k: pair[k] for k in ("a", "b")},
            "n_images": len(pair["images"]), "cells": cells,
            "a_better_share": round(a_cells / cells, 4) if cells else None,
            "b_better_share": round(b_cells / cells, 4) if cells else None,
            "tie_share": round((cells - a_cells - b_cells) / cells, 4) if cells else None,
            "images": pair["images"], "errors": pair["errors"],
        })
    write_json_atomically(out / COMPARE_MAPS_FILE, summary, sort_keys=True)
    return summary


def _safe_name(key: str) -> str:
    """A relative path as one file name (sub/x.png -> sub__x.png)."""
    return key.replace(os.sep, "__").replace("/", "__")
