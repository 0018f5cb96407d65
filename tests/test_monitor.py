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
