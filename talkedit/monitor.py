"""Watching a training run: the JSON-lines metrics log, the `train.png` plot and the PNG writer of the sample strips.

Draws with OpenCV only (no plotting library), so that it runs wherever training runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PLOT_W, PLOT_H = 640, 240  # one panel
COLOURS = {
    "loss": (40, 110, 220),
    "val_error": (30, 160, 60),
    "val_error_shifted": (220, 80, 40),
    "val_sampled_error": (150, 60, 170),
}  # RGB


class MetricsLog:
    """metrics.jsonl in the work folder: one JSON object per line, appended (a resumed run continues the file)."""

    def __init__(self, workdir: Path) -> None:
        self.path = Path(workdir) / "metrics.jsonl"
        self.records: list[dict] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash

    def write(self, record: dict) -> None:
        # A resumed run repeats the steps after its last checkpoint: drop what they replace.
        if "loss" in record:
            self.records = [r for r in self.records if not ("loss" in r and r["step"] >= record["step"])]
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = {r["step"]: r[key] for r in records if key in r and r[key] is not None}  # the last record of a step wins
    steps = np.array(sorted(points), float)
    return steps, np.array([points[s] for s in sorted(points)], float)


def line_panel(
    title: str,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    log_y: bool = False,
    x_label: str = "step",
    colours: dict[str, tuple[int, int, int]] = COLOURS,
) -> np.ndarray:
    """One PLOT_W x PLOT_H chart: curves {label: (x, y)}, coloured by label (RGB). Returns (H, W, 3) uint8 RGB."""
    import cv2

    image = np.full((PLOT_H, PLOT_W, 3), 255, np.uint8)
    left, right, top, bottom = 60, PLOT_W - 10, 24, PLOT_H - 28
    cv2.rectangle(image, (left, top), (right, bottom), (180, 180, 180), 1)
    scale = 0.45
    while scale > 0.3 and cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > right - left:
        scale -= 0.01  # smaller for a title that would run off the panel (text width is not linear in scale)
    cv2.putText(image, title, (left, 16), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    values = [v for _, (s, v) in curves.items() if len(v)]
    if not values:
        return image
    xs = np.concatenate([s for s, v in curves.values() if len(v)])
    ys = np.concatenate(values)
    ys = ys[np.isfinite(ys) & ((ys > 0) if log_y else True)]
    if not len(ys):
        return image
    f = np.log10 if log_y else (lambda v: v)
    y_lo, y_hi = f(ys.min()), f(ys.max())
    y_hi = y_hi if y_hi > y_lo else y_lo + 1e-6
    x_lo, x_hi = xs.min(), max(xs.max(), xs.min() + 1)

    def to_px(s: np.ndarray, v: np.ndarray) -> np.ndarray:
        x = left + (s - x_lo) / (x_hi - x_lo) * (right - left)
        y = bottom - (f(np.maximum(v, 1e-12) if log_y else v) - y_lo) / (y_hi - y_lo) * (bottom - top)
        return np.stack([x, y], 1).round().astype(np.int32)

    legend = []
    for label, (s, v) in curves.items():
        finite = np.isfinite(v)
        if not finite.any():
            continue
        colour = colours.get(label, (0, 0, 0))
        legend.append((label, colour))
        # Gaps (NaN: no face, no value) break the line.
        runs = np.split(np.arange(len(v)), np.flatnonzero(np.diff(finite.astype(np.int8))) + 1)
        for run in runs:
            if finite[run[0]] and len(run) > 1:
                cv2.polylines(image, [to_px(s[run], v[run])], False, colour, 1, cv2.LINE_AA)
        points = to_px(s[finite], v[finite])
        for p in points if len(points) < 40 else points[-1:]:
            cv2.circle(image, tuple(int(c) for c in p), 2, colour, -1)
    high, low = axis_labels(*((10**y_hi, 10**y_lo) if log_y else (y_hi, y_lo)))
    for text, y in ((high, top), (low, bottom)):
        cv2.putText(image, text, (4, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, f"{x_label} {x_lo:g}", (left, PLOT_H - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
    cv2.putText(image, f"{x_hi:g}", (right - 50, PLOT_H - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
    # The legend goes in the bottom margin, between the x axis's two values, where no curve can hide it.
    widths = [cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0] for label, _ in legend]
    x = (left + right - sum(widths) - 16 * (len(widths) - 1)) // 2
    for (label, colour), width in zip(legend, widths, strict=True):
        cv2.putText(image, label, (x, PLOT_H - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
        x += width + 16
    return image


def axis_labels(high: float, low: float) -> tuple[str, str]:
    """The y axis's top and bottom values, with the fewest significant digits (3 to 8) that tell them apart: a loss
    that has settled spans a narrow range, and two labels both reading 0.158 say nothing."""
    for digits in range(3, 9):
        texts = f"{high:.{digits}g}", f"{low:.{digits}g}"
        if texts[0] != texts[1]:
            break
    return texts


def plot_metrics(records: list[dict], path: Path) -> None:
    """Rewrite `path` (PNG): training loss, validation error with true and shifted audio, and the audio-shift ratio."""
    loss = _series(records, "loss")
    smooth = loss[1].copy()
    for i in range(1, len(smooth)):  # exponential smoothing for a readable curve
        smooth[i] = 0.9 * smooth[i - 1] + 0.1 * smooth[i]
    ratio_steps, ratio = _series(records, "audio_ratio")
    last = f", audio-shift ratio {ratio[-1]:.3f} at step {int(ratio_steps[-1])}" if len(ratio) else ""
    panels = [
        line_panel("training loss (smoothed)", {"loss": (loss[0], smooth)}, log_y=True),
        line_panel(
            "validation masked error: one-step denoising, and sampled from noise" + last,
            {
                "val_error": _series(records, "val_error"),
                "val_error_shifted": _series(records, "val_error_shifted"),
                "val_sampled_error": _series(records, "val_sampled_error"),
            },
            log_y=True,
        ),
    ]
    write_png(path, np.concatenate(panels, axis=0))


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image atomically."""
    import os

    import cv2

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    cv2.imwrite(str(tmp), np.ascontiguousarray(rgb[:, :, ::-1]))
    os.replace(tmp, path)
