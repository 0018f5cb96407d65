"""train.png and eval's report panels: what they print must be readable."""

from __future__ import annotations

import numpy as np

from talkedit.monitor import PLOT_W, axis_labels, line_panel


def test_axis_labels_tell_a_narrow_range_apart():
    assert axis_labels(0.73, 0.158) == ("0.73", "0.158")
    assert axis_labels(0.15836, 0.15804) == ("0.1584", "0.158")
    high, low = axis_labels(1.0000004, 1.0)
    assert high != low


def test_a_long_title_stays_inside_the_panel():
    title = "validation masked error: one-step denoising, and sampled from noise, audio-shift ratio 1.000 at step 2500"
    steps = np.arange(5.0)
    image = line_panel(title, {"loss": (steps, np.linspace(1.0, 0.5, 5))})
    band = image[:22]  # the title's row, above the chart's frame
    right_edge = band[:, PLOT_W - 8 :]
    assert (right_edge == 255).all(), "the title runs off the right edge"
    assert (band[:, 60:200] < 128).any(), "no title drawn"


def test_the_legend_is_outside_the_chart():
    """It was drawn inside the chart's top right, over the curves that pass there (the report's grey speech curve)."""
    from talkedit.monitor import PLOT_H

    colours = {"loud": (200, 0, 0), "quiet": (0, 0, 200)}
    steps = np.arange(10.0)
    image = line_panel("t", {"loud": (steps, np.ones(10)), "quiet": (steps, np.zeros(10))}, colours=colours)
    inside = image[26 : PLOT_H - 30, 62 : PLOT_W - 12].astype(int)  # the chart, less its frame and the two curves
    coloured = np.abs(inside - inside.mean(2, keepdims=True)).max(2) > 40
    assert not coloured[4:-4].any(), "something coloured inside the chart besides the curves"
    margin = image[PLOT_H - 24 :].astype(int)
    for colour in colours.values():
        assert (np.abs(margin - colour).max(2) < 60).any(), colour
