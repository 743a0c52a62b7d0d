"""PNG previews: acquired vs generated slices and a long-axis reslice of input vs output;
the evaluation's per-study figure; training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .stack import SaxStack


def _to_uint8(image, low, high):
    return (np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def _labelled(image_u8, text, zoom=1):
    """Image (x, y) shown with rows = y, enlarged ``zoom`` times, with a caption strip on top."""
    tile = Image.fromarray(image_u8.T)
    tile = tile.resize((tile.width * zoom, tile.height * zoom), Image.NEAREST)
    canvas = Image.new("L", (tile.width, tile.height + 14), 0)
    canvas.paste(tile, (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), text, fill=255)
    return canvas


def _row(tiles, gap=4):
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    height = max(t.height for t in tiles)
    row = Image.new("L", (width, height), 32)
    x = 0
    for t in tiles:
        row.paste(t, (x, 0))
        x += t.width + gap
    return row


def _stack_rows(rows, gap=6):
    width = max(r.width for r in rows)
    canvas = Image.new("L", (width, sum(r.height for r in rows) + gap * (len(rows) - 1)), 32)
    top = 0
    for r in rows:
        canvas.paste(r, (0, top))
        top += r.height + gap
    return canvas


def _reslice(stack: SaxStack, array, y, low, high):
    """Long-axis plane at row ``y`` as uint8 (x, height), nearest-neighbour stretched so that
    millimetres are square: each slice shows as a band as thick as the slice step."""
    plane = _to_uint8(array[:, y, :], low, high)  # (x, z)
    extent_mm = stack.slice_spacing * stack.shape[2]
    height = max(1, int(round(extent_mm / stack.pixel_spacing[1])))
    return np.asarray(Image.fromarray(plane.T).resize((plane.shape[0], height), Image.NEAREST)).T


def save_preview(input_stack: SaxStack, output_stack: SaxStack, path, phase=0, max_tiles=6):
    """Write a PNG: top, acquired slices and the generated slices between them; bottom, a
    long-axis reslice (the plane through the middle row, slices running down) of the input
    and of the output, at the same scale."""
    factor = (output_stack.shape[2] - 1) // max(input_stack.shape[2] - 1, 1)
    low, high = np.percentile(input_stack.array[..., phase], [0.5, 99.5])
    out = output_stack.array[..., phase]
    zoom = max(1, 200 // max(input_stack.shape[:2]))  # small crops are hard to see at 1:1
    centre = input_stack.shape[2] // 2
    k0 = max(0, min(centre - 1, input_stack.shape[2] - 2))
    tiles = []
    for j in range(factor + 1):
        kind = "acquired" if j in (0, factor) else "generated"
        idx = k0 * factor + j
        tiles.append(_labelled(_to_uint8(out[:, :, idx], low, high), f"{kind} z={idx}", zoom))
        if len(tiles) >= max_tiles and j < factor:
            last = (k0 + 1) * factor
            tiles[-1] = _labelled(_to_uint8(out[:, :, last], low, high), f"acquired z={last}", zoom)
            break
    y = input_stack.shape[1] // 2
    bottom = _row(
        [
            _labelled(
                _reslice(input_stack, input_stack.array[..., phase], y, low, high),
                f"long axis: input, {input_stack.shape[2]} slices",
                zoom,
            ),
            _labelled(
                _reslice(output_stack, out, y, low, high), f"long axis: output, {output_stack.shape[2]} slices", zoom
            ),
        ]
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _stack_rows([_row(tiles), bottom]).save(path)
    return path


def save_evaluation_figure(stack: SaxStack, predictions: dict, box, path, phase=0, error_range=0.25):
    """Leave-one-out figure for one study and phase: first the two acquired neighbours the
    methods interpolate between; then per column the acquired (true) slice and each method's
    predictions; rows: the heart region of the middle predicted slice, its absolute error
    (white = ``error_range`` of the study's robust intensity range or more), and a long-axis
    reslice through the heart with every inner slice replaced by its prediction.

    ``predictions``: name -> (inner slices, phases, X, Y) in scanner intensities."""
    low, high = np.percentile(stack.array, [0.5, 99.5])
    x0, x1, y0, y1 = box
    k = stack.shape[2] // 2  # a middle slice; inner slice k is prediction k - 1
    truth = stack.array[..., phase].astype(np.float64)
    zoom = max(1, 240 // max(x1 - x0, y1 - y0))
    columns = {"acquired": truth}
    for name, pred in predictions.items():
        volume = truth.copy()
        volume[:, :, 1:-1] = np.asarray(pred)[:, phase].transpose(1, 2, 0)
        columns[name] = volume
    crop = (slice(x0, x1), slice(y0, y1))
    y = (y0 + y1) // 2
    rows = [[], [], []]
    neighbours = [
        _labelled(_to_uint8(truth[crop + (z,)], low, high), f"neighbour z={z} (given)", zoom) for z in (k - 1, k + 1)
    ]
    for name, volume in columns.items():
        error = np.abs(volume[..., k] - truth[..., k]) / max(high - low, 1e-6)
        rows[0].append(_labelled(_to_uint8(volume[crop + (k,)], low, high), f"{name} z={k}", zoom))
        rows[1].append(_labelled(_to_uint8(error[crop], 0, error_range), f"|error| {name}", zoom))
        plane = _reslice(stack, volume[x0:x1], y, low, high)
        rows[2].append(_labelled(plane, f"long axis {name}", zoom))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _stack_rows([_row(neighbours)] + [_row(r) for r in rows]).save(path)
    return path


def plot_curves(series: dict, path, title="", x_label="iteration", size=(640, 360)):
    """A line chart PNG: ``series`` maps a name to (x values, y values)."""
    from PIL import ImageFont

    width, height = size
    left, right, top, bottom = 60, 150, 28, 36
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    xs = [x for xv, _ in series.values() for x in xv]
    ys = [y for _, yv in series.values() for y in yv if np.isfinite(y)]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_px(x, y):
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for frac in (0, 0.5, 1):
        y = y0 + frac * (y1 - y0)
        draw.text((4, to_px(x0, y)[1] - 6), f"{y:.3g}", fill="black", font=font)
        x = x0 + frac * (x1 - x0)
        draw.text((to_px(x, y0)[0] - 10, height - bottom + 4), f"{x:.0f}", fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=font)
    draw.text(((width - right) // 2, height - 14), x_label, fill="black", font=font)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    for i, (name, (xv, yv)) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        points = [to_px(x, y) for x, y in zip(xv, yv) if np.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((width - right + 8, top + 14 * i), name, fill=colour, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def plot_training_logs(run_dirs, path, title=""):
    """Plot the loss of each training run folder (``train_log.csv``) and the validation PSNR
    against linear (``validation.csv``) side by side."""
    import csv

    def read(csv_path):
        with open(csv_path) as f:
            return list(csv.DictReader(f))

    losses, psnr = {}, {}
    for run in run_dirs:
        run = Path(run)
        rows = read(run / "train_log.csv")
        losses[f"{run.name} loss"] = ([float(r["iteration"]) for r in rows], [float(r["loss"]) for r in rows])
        if (run / "validation.csv").exists():
            rows = read(run / "validation.csv")
            it = [float(r["iteration"]) for r in rows]
            psnr[f"{run.name} PSNR"] = (it, [float(r["val_psnr"]) for r in rows])
            baseline = "val_psnr_baseline" if "val_psnr_baseline" in rows[0] else "val_psnr_linear"  # older logs
            psnr["baseline PSNR"] = (it, [float(r[baseline]) for r in rows])
    a = plot_curves(losses, Path(path).with_suffix(".loss.png"), title=f"{title} training loss")
    b = plot_curves(psnr, Path(path).with_suffix(".val.png"), title=f"{title} validation PSNR (dB)")
    images = [Image.open(a), Image.open(b)]
    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    canvas.paste(images[0], (0, 0))
    canvas.paste(images[1], (images[0].width, 0))
    canvas.save(path)
    a.unlink()
    b.unlink()
    return Path(path)
