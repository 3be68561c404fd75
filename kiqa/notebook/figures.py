"""Image grids and first-layer kernels: what the model sees.

Images are read with `kiqa.image.load_image`, the function training uses, so a grid
shows the pixels the model saw (EXIF orientation applied, whole image, no crop).
TensorFlow is imported only by the functions that decode images or look into a model.
"""

import numpy as np
from matplotlib.figure import Figure

from kiqa.errors import ModelError


def plot_image_grid(paths, titles, image_size=(192, 256), columns=4, title=None):
    """Images in a grid with a caption under each, decoded as training decodes them.

    Args:
        paths: image files.
        titles: one caption per image.
        image_size: (height, width) each image is resized to (whole image, no crop).
        columns: images per row.
        title: figure title.

    Returns:
        A `matplotlib.figure.Figure`.

    Raises:
        ValueError: `paths` is empty or `titles` does not match it.
        ImageError: an image cannot be read or decoded (named).
    """
    from kiqa.image import load_image  # TensorFlow: only when images are shown

    paths, titles = list(paths), list(titles)
    if not paths or len(paths) != len(titles):
        raise ValueError(f"need one title per image and at least one image; got {len(paths)} images, {len(titles)} titles")
    columns = min(columns, len(paths))
    rows = -(-len(paths) // columns)
    height, width = image_size
    cell = 3.2
    fig = Figure(figsize=(cell * columns, cell * height / width * rows + 0.5 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, path, caption in zip(axes, paths, titles):
        pixels = np.asarray(load_image(path, image_size)).astype(np.uint8)
        ax.imshow(pixels)
        ax.set_title(caption, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def first_conv_kernels(model):
    """The kernels of the first convolution that sees the RGB pixels.

    For ConvNeXt this is the stem: a 4x4 convolution with stride 4 and 96 (Tiny,
    Small) to 256 (XLarge) filters; the paper's Figure 5 shows these.

    Args:
        model: a `keras.Model` (nested models are searched in layer order).

    Returns:
        (layer name, float32 array [height, width, 3, filters]).

    Raises:
        ModelError: the model has no convolution with 3 input channels.
    """
    import keras  # TensorFlow and Keras: only when a model is inspected

    def walk(layer):
        if isinstance(layer, keras.layers.Conv2D) and layer.built and layer.kernel.shape[2] == 3:
            return layer
        for child in getattr(layer, "layers", []):
            found = walk(child)
            if found is not None:
                return found
        return None

    layer = walk(model)
    if layer is None:
        raise ModelError(
            f"model {model.name!r} has no Conv2D layer with 3 input channels; pass a kiqa "
            "ConvNeXt model (kiqa.model.load_model on a run's model.keras)"
        )
    return layer.name, np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype=np.float32)


def kernel_grid(kernels, columns=16, scale=8, gap=2):
    """Tiles RGB convolution kernels into one image, each kernel stretched to 0..1.

    Each kernel is min-max scaled on its own (the usual way to show first-layer
    filters: it shows each filter's pattern and colour, not its magnitude), then
    enlarged `scale` times with nearest-neighbour pixels.

    Args:
        kernels: array [height, width, 3, filters].
        columns: kernels per row.
        scale: screen pixels per kernel pixel.
        gap: white pixels between kernels.

    Returns:
        float32 array [rows * (h * scale + gap) - gap, columns * (w * scale + gap) - gap, 3]
        in 0..1; kernel `i` is at row `i // columns`, column `i % columns`.

    Raises:
        ValueError: `kernels` is not [height, width, 3, filters].
    """
    kernels = np.asarray(kernels, dtype=np.float32)
    if kernels.ndim != 4 or kernels.shape[2] != 3:
        raise ValueError(f"expected kernels of shape [height, width, 3, filters], got {list(kernels.shape)}")
    height, width, _, count = kernels.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    tile_h, tile_w = height * scale, width * scale
    grid = np.ones((rows * (tile_h + gap) - gap, columns * (tile_w + gap) - gap, 3), np.float32)
    for index in range(count):
        kernel = kernels[..., index]
        low, high = float(kernel.min()), float(kernel.max())
        kernel = (kernel - low) / (high - low) if high > low else np.full_like(kernel, 0.5)
        tile = np.repeat(np.repeat(kernel, scale, axis=0), scale, axis=1)
        top, left = (index // columns) * (tile_h + gap), (index % columns) * (tile_w + gap)
        grid[top:top + tile_h, left:left + tile_w] = tile
    return grid


def plot_kernels(kernels, columns=16, title=None):
    """First-layer kernels as an image grid (see `kernel_grid`).

    Args:
        kernels: array [height, width, 3, filters].
        columns: kernels per row.
        title: figure title; default names the kernel shape.

    Returns:
        A `matplotlib.figure.Figure`.
    """
    grid = kernel_grid(kernels, columns=columns)
    width = min(14.0, 0.6 * min(columns, kernels.shape[3]) + 1.0)
    fig = Figure(figsize=(width, width * grid.shape[0] / grid.shape[1] + 0.6), layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    h, w, c, n = kernels.shape
    ax.set_title(title or f"first-layer kernels: {n} filters of {h}x{w}x{c}")
    return fig


def plot_quality_maps(model, image_size, paths, columns=4, title=None):
    """Images with their quality maps over them (`kiqa.maps`), a colour bar in MOS points.

    Args:
        model: a kiqa Keras model.
        image_size: (height, width) it scores at (the run's `config.image_size`).
        paths: image files.
        columns: images per row.
        title: figure title.

    Returns:
        (`matplotlib.figure.Figure`, list of `kiqa.maps.QualityMap`, one per image).

    Raises:
        ValueError: `paths` is empty.
        ImageError: an image cannot be read or decoded (named).
        QualityMapError: the model's head is not affine after its pooling.
    """
    from kiqa import maps  # TensorFlow: only when maps are made
    from kiqa.image import load_image

    paths = list(paths)
    if not paths:
        raise ValueError("need at least one image")
    function = maps.map_function(model, image_size)
    pixels = [np.asarray(load_image(path, image_size), np.float32) for path in paths]
    found = []
    for image in pixels:
        out = function(image[None])
        found.append(maps.QualityMap(values=np.asarray(out["quality_map"][0], np.float32),
                                     mos=float(out["mos"][0]), image_size=tuple(image_size)))
    low = min(float(q.values.min()) for q in found)
    high = max(max(float(q.values.max()) for q in found), low + 1.0)
    columns = min(columns, len(paths))
    rows = -(-len(paths) // columns)
    height, width = image_size
    fig = Figure(figsize=(3.2 * columns + 0.8, 3.2 * height / width * rows + 0.5 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    overlay = None
    for ax, image, quality in zip(axes, pixels, found):
        ax.imshow(image.astype(np.uint8), extent=(0, width, height, 0))
        overlay = ax.imshow(quality.values, extent=(0, width, height, 0), alpha=0.5, cmap="RdYlGn",
                            vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(f"MOS {quality.mos:.1f} (map {quality.values.min():.0f}-{quality.values.max():.0f})", fontsize=9)
    fig.colorbar(overlay, ax=list(axes), fraction=0.03, label="local MOS (0-100, higher is better)")
    if title:
        fig.suptitle(title)
    return fig, found
