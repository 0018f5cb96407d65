"""Scores of a dub against its reference (the same shot, original), frame by frame.

Everything is measured in the reference's aligned 128 px crops (the dub's frames are cropped with the reference's
alignment, so both crops show the same place) and inside the reference's jaw mask, the region a dub regenerates:

    mouth PSNR / SSIM   of the dub's crop against the reference's, inside the mask (SSIM: luma, 11 px Gaussian)
    LMD                 mean distance of the 40 lip landmarks, crop pixels (MediaPipe on each video)
    jitter              mean frame-to-frame acceleration of the lip landmarks, dub / reference (1 = as steady)
    colour drift        largest 1 s average of the dub's mean mask colour minus the reference's, 0-255 levels
    outside changed     share of frames whose pixels away from the mouth differ from the reference (should be 0)
    chain jump          mouth change at the starts of the dub's autoregressive chains / mouth change elsewhere
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .analysis import Analysis, Progress, no_progress
from .face import MASK_DILATE, MASK_FEATHER, crop_face, invert
from .generate import chain_jump, mouth_change
from .media import iter_frames
from .sync import LIP_POINTS, mouth_opening, mouth_points

SSIM_SIGMA = 1.5
OUTSIDE_MARGIN = 4  # frame pixels added around the paste region before looking for changes outside it
OUTSIDE_LEVEL = 24  # a pixel differs when some channel differs by more than this (lossy re-encoding stays below)
OUTSIDE_SHARE = 0.002  # a frame changed outside the mouth when more than this share of its pixels differ


@dataclass
class ReferenceScores:
    frames: int  # frames with a face in the reference that were scored
    psnr: float  # dB, mouth region (inf when identical)
    ssim: float
    lmd: float | None  # crop pixels; None when the dub's landmarks were not found
    jitter: float | None  # dub / reference
    colour_drift: float  # levels
    outside_changed: float  # share of frames
    outside_error: float  # mean absolute difference away from the mouth, levels
    chain_jump: float | None  # None when the dub has a single chain
    motion_ratio: float | None  # frame-to-frame change of the dub's mouth opening / the reference's (0 = frozen)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of two (H, W) float images in 0-255 at every pixel (Wang et al. 2004, Gaussian window σ = 1.5)."""
    import cv2

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x):
        return cv2.GaussianBlur(x, (11, 11), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def outside_region(mask: np.ndarray, matrix: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frame pixels a paste of this crop mask cannot reach: (H, W) bool. The mask grows by what the paste's feather
    adds, then by OUTSIDE_MARGIN frame pixels."""
    import cv2

    grow = 2 * (MASK_DILATE + MASK_FEATHER) + 1
    crop_region = cv2.dilate(mask.astype(np.uint8), np.ones((grow, grow), np.uint8))
    region = cv2.warpAffine(crop_region, invert(matrix), (width, height), flags=cv2.INTER_NEAREST)
    margin = 2 * OUTSIDE_MARGIN + 1
    return cv2.dilate(region, np.ones((margin, margin), np.uint8)) == 0


def frame_pairs(dub: Analysis, reference: Analysis) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(index, dub frame, reference frame), RGB, decoded side by side over the dub's frames."""
    yield from zip(range(dub.frame_count), iter_frames(dub.video), iter_frames(reference.video))  # noqa: B905


def _spread(values: np.ndarray) -> float:
    """Standard deviation of the finite values; NaN when fewer than two are (numpy would warn)."""
    finite = values[np.isfinite(values)]
    return float(finite.std()) if finite.size > 1 else float("nan")


def score_against(
    dub: Analysis,
    reference: Analysis,
    chain_starts: list[int] | None = None,
    progress: Progress = no_progress,
) -> tuple[ReferenceScores, np.ndarray]:
    """Compare a dub with its reference, frame for frame over the dub's T frames (a dub of a speech shorter than its
    video covers the reference's first T). `chain_starts`: where the dub's chains take over (see `chain_jump`).

    Returns the scores and the dub's crops at the reference's alignment, (T, 128, 128, 3) uint8 (zero without a face).
    """
    total = dub.frame_count
    tracked = reference.tracked[:total]
    dub_crops = np.zeros((total, *reference.crops.shape[1:]), np.uint8)
    sq_err, ssim_sum, pixels = 0.0, 0.0, 0
    colour_diff = np.full((total, 3), np.nan)
    outside_changed, outside_error, outside_frames = 0, 0.0, 0
    for i, dub_frame, ref_frame in frame_pairs(dub, reference):
        progress("compare", i + 1, total)
        if not tracked[i]:
            diff = np.abs(dub_frame.astype(np.int16) - ref_frame).max(axis=2)
            outside_error += float(diff.mean())
            outside_changed += float((diff > OUTSIDE_LEVEL).mean()) > OUTSIDE_SHARE
            outside_frames += 1
            continue
        crop = crop_face(dub_frame, reference.matrices[i])
        dub_crops[i] = crop
        ref_crop = np.asarray(reference.crops[i])
        mask = np.asarray(reference.masks[i]).astype(bool)
        if mask.any():
            err = crop[mask].astype(np.float64) - ref_crop[mask]
            sq_err += float((err**2).sum())
            pixels += err.size
            ssim_sum += float(ssim_map(_luma(crop), _luma(ref_crop))[mask].sum())
            colour_diff[i] = crop[mask].mean(axis=0) - ref_crop[mask].mean(axis=0)
        outside = outside_region(mask, reference.matrices[i], *ref_frame.shape[:2])
        diff = np.abs(dub_frame.astype(np.int16) - ref_frame).max(axis=2)[outside]
        outside_error += float(diff.mean()) if diff.size else 0.0
        outside_changed += float((diff > OUTSIDE_LEVEL).mean()) > OUTSIDE_SHARE if diff.size else 0
        outside_frames += 1
    mse = sq_err / max(pixels, 1)
    psnr = float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))
    ssim = ssim_sum / max(pixels // 3, 1)

    # Landmarks of both, in the reference's crops.
    lips = list(LIP_POINTS)
    matrices = reference.matrices[:total]
    ref_pts = mouth_points(reference.landmarks[:total], matrices)[:, lips]
    dub_pts = mouth_points(dub.landmarks, matrices)[:, lips]
    both = np.isfinite(ref_pts).all(axis=(1, 2)) & np.isfinite(dub_pts).all(axis=(1, 2))
    lmd = float(np.linalg.norm(dub_pts[both] - ref_pts[both], axis=2).mean()) if both.any() else None
    jitter = None
    steady = both[:-2] & both[1:-1] & both[2:]
    if steady.any():
        accel = [np.linalg.norm(p[2:] - 2 * p[1:-1] + p[:-2], axis=2).mean(axis=1)[steady] for p in (dub_pts, ref_pts)]
        jitter = float(accel[0].mean() / max(accel[1].mean(), 1e-6))
    openings = [mouth_opening(mouth_points(a.landmarks[:total], matrices)) for a in (dub, reference)]
    moving = [_spread(np.diff(o)) for o in openings]
    motion = float(moving[0] / moving[1]) if both.sum() > 2 and moving[1] > 0 else None

    # Colour drift: the largest 1 s average of the mean mask colour difference.
    second = max(1, round(float(reference.video.fps)))
    drift = 0.0
    valid = np.isfinite(colour_diff).all(axis=1)
    if valid.any():
        filled = np.where(valid[:, None], colour_diff, 0.0)
        kernel = np.ones(min(second, total))
        sums = np.stack([np.convolve(filled[:, c], kernel, mode="valid") for c in range(3)], axis=1)
        counts = np.convolve(valid.astype(float), kernel, mode="valid")
        averages = sums[counts > 0] / counts[counts > 0, None]
        drift = float(np.abs(averages).max())

    jump = chain_jump(mouth_change(dub_crops, reference.masks[:total], tracked), chain_starts or [])
    scores = ReferenceScores(
        frames=int(tracked.sum()),
        psnr=psnr,
        ssim=float(ssim),
        lmd=lmd,
        jitter=jitter,
        colour_drift=drift,
        outside_changed=outside_changed / max(outside_frames, 1),
        outside_error=outside_error / max(outside_frames, 1),
        chain_jump=jump,
        motion_ratio=motion,
    )
    return scores, dub_crops
