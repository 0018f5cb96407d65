"""Face geometry: choosing and tracking the target face, aligning it to the 128x128 crop, the jaw mask, paste-back.

Coordinates are continuous pixel coordinates (x right, y down; pixel j covers [j, j+1)), in the frame or in the crop.
An alignment is a 2x3 similarity matrix A mapping frame coordinates to crop coordinates: [u, v] = A @ [x, y, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .landmarks import NUM_LANDMARKS

CROP_SIZE = 128  # side of the crop the model sees
# MediaPipe indices of the points that fix the alignment: four eye corners and the nose tip (spec §11).
STABLE_POINTS = (33, 133, 362, 263, 2)
# Where those points sit in the training crops (normalised crop coordinates, measured on the official demo outputs).
TEMPLATE = np.array(
    [[0.3312, 0.4171], [0.4365, 0.4194], [0.5753, 0.4168], [0.6798, 0.4077], [0.5147, 0.5787]], dtype=np.float64
)
JAW_POINTS = (234, 454)  # face-oval sides that bound the jaw mask (the official dlib points 1 and 15)
SMOOTHING_WINDOW = 7  # frames averaged for the alignment (the paper)
MAX_GAP = 4  # missed detections bridged by interpolation; a longer gap ends the track
CUT_THRESHOLD = 40.0  # mean absolute change of a 32x32 grey thumbnail (0-255) that marks a shot cut
MASK_DILATE = 2  # px (crop) the mask grows before feathering, so the whole regenerated region is kept
MASK_FEATHER = 2  # px (crop) of blur on the mask edge when pasting back


# ---------------------------------------------------------------------------------------------------------------
# Choosing and tracking the face


@dataclass(frozen=True)
class FaceChoice:
    """Which face to edit: the rank-th largest (1 = largest) or the one nearest a point (frame pixels)."""

    rank: int = 1
    point: tuple[float, float] | None = None

    @classmethod
    def parse(cls, text: str | None) -> FaceChoice:
        """'2' = second largest; '640,360' = the face nearest that point; None = the largest."""
        if not text:
            return cls()
        if "," in text:
            x, y = (float(v) for v in text.split(","))
            return cls(point=(x, y))
        rank = int(text)
        if rank < 1:
            raise ValueError("face rank counts from 1 (the largest face)")
        return cls(rank=rank)

    def pick(self, faces: list[np.ndarray]) -> int | None:
        """Index of the chosen face among one frame's detections, or None if it is not there."""
        if not faces:
            return None
        if self.point is not None:
            target = np.asarray(self.point)
            return int(np.argmin([np.linalg.norm(f.mean(axis=0) - target) for f in faces]))
        order = np.argsort([-face_size(f) for f in faces])
        return int(order[self.rank - 1]) if self.rank <= len(faces) else None


def face_size(landmarks: np.ndarray) -> float:
    """Diagonal of the landmarks' bounding box, in pixels."""
    return float(np.linalg.norm(landmarks.max(axis=0) - landmarks.min(axis=0)))


def thumbnail(frame: np.ndarray, size: int = 32) -> np.ndarray:
    """A tiny grey image for shot-cut detection. frame: (H, W, 3) uint8 -> (size, size) uint8.

    Averages a sparse grid of about (4 size)² pixels: enough to see a cut, without touching the whole frame.
    """
    h, w = frame.shape[:2]
    ys = np.linspace(0, h - 1, 4 * size).astype(int)
    xs = np.linspace(0, w - 1, 4 * size).astype(int)
    grey = frame[np.ix_(ys, xs)].mean(axis=2, dtype=np.float32)
    return grey.reshape(size, 4, size, 4).mean(axis=(1, 3)).round().astype(np.uint8)


def find_cuts(thumbs: np.ndarray) -> np.ndarray:
    """(T, s, s) uint8 thumbnails -> (T,) bool, True where a new shot starts."""
    cuts = np.zeros(len(thumbs), bool)
    if len(thumbs) > 1:
        change = np.abs(np.diff(thumbs.astype(np.float32), axis=0)).mean(axis=(1, 2))
        cuts[1:] = change > CUT_THRESHOLD
    return cuts


def track_face(
    detections: list[list[np.ndarray]], cuts: np.ndarray, choice: FaceChoice
) -> tuple[np.ndarray, np.ndarray]:
    """Follow one face through the clip by position.

    detections: per frame, the (478, 2) landmarks of every face found. The face is chosen with `choice` where no track
    is running, then followed frame to frame as the detection nearest its last position. Gaps of up to MAX_GAP frames
    are interpolated; a longer gap or a shot cut ends the track.
    Returns (landmarks (T, 478, 2) float32, NaN where untracked; track id (T,) int32, -1 where untracked).
    """
    frames = len(detections)
    points = np.full((frames, NUM_LANDMARKS, 2), np.nan, np.float32)
    track = np.full(frames, -1, np.int32)
    current, last, missed = -1, None, 0
    for i, faces in enumerate(detections):
        if cuts[i] or missed > MAX_GAP:
            current, last = -1, None
        chosen = None
        if last is not None and faces:
            centre, size = last.mean(axis=0), face_size(last)
            dists = [np.linalg.norm(f.mean(axis=0) - centre) for f in faces]
            nearest = int(np.argmin(dists))
            if dists[nearest] < 0.5 * size:
                chosen = nearest
        elif last is None:
            chosen = choice.pick(faces)
            if chosen is not None:
                current = track.max() + 1
        if chosen is None:
            missed += 1
            continue
        points[i], track[i], last, missed = faces[chosen], current, faces[chosen], 0
    _fill_gaps(points, track)
    return points, track


def _fill_gaps(points: np.ndarray, track: np.ndarray) -> None:
    """Interpolate landmarks over short gaps inside one track (in place)."""
    tracked = np.flatnonzero(track >= 0)
    for a, b in zip(tracked[:-1], tracked[1:], strict=False):
        if 1 < b - a <= MAX_GAP + 1 and track[a] == track[b]:
            for i in range(a + 1, b):
                w = (i - a) / (b - a)
                points[i] = (1 - w) * points[a] + w * points[b]
                track[i] = track[a]


# ---------------------------------------------------------------------------------------------------------------
# Alignment


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation mapping src (N, 2) onto dst (N, 2) (Umeyama 1991).

    Returns the 2x3 matrix A with dst ≈ A @ [src, 1].
    """
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - src_mean, dst - dst_mean
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(sigma) @ sign) / s.var(axis=0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def alignments(points: np.ndarray, track: np.ndarray) -> np.ndarray:
    """Per-frame frame->crop similarity, fitted to the stable points averaged over SMOOTHING_WINDOW frames of the
    same track. points (T, 478, 2), track (T,). Returns (T, 2, 3) float64, NaN where untracked."""
    stable = points[:, STABLE_POINTS].astype(np.float64)
    target = TEMPLATE * CROP_SIZE
    result = np.full((len(points), 2, 3), np.nan)
    half = SMOOTHING_WINDOW // 2
    for i in np.flatnonzero(track >= 0):
        lo, hi = max(0, i - half), min(len(points), i + half + 1)
        same = track[lo:hi] == track[i]
        result[i] = similarity_transform(stable[lo:hi][same].mean(axis=0), target)
    return result


def to_crop(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 2x3 matrix to points (..., 2)."""
    return xy @ matrix[:, :2].T + matrix[:, 2]


def invert(matrix: np.ndarray) -> np.ndarray:
    linear = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear, -linear @ matrix[:, 2:]], axis=1)


def _warp(image: torch.Tensor, matrix: np.ndarray, out_h: int, out_w: int, padding: str) -> torch.Tensor:
    """Sample image (C, H, W) float at out = matrix applied to input coordinates, i.e. out[v, u] = image[M⁻¹(u, v)].

    matrix maps input coordinates to output coordinates. Bilinear; returns (C, out_h, out_w).
    """
    inverse = invert(matrix)
    _, h, w = image.shape
    # Output pixel centres -> input coordinates -> grid_sample's [-1, 1] (align_corners=False: edges at ±1).
    v, u = torch.meshgrid(
        torch.arange(out_h, dtype=torch.float64) + 0.5, torch.arange(out_w, dtype=torch.float64) + 0.5, indexing="ij"
    )
    inv = torch.from_numpy(inverse)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    grid = torch.stack([2 * x / w - 1, 2 * y / h - 1], dim=-1).float()[None]
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode=padding, align_corners=False)[0]


def crop_face(frame: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The aligned crop of one frame. frame (H, W, 3) uint8, matrix 2x3 frame->crop. Returns (128, 128, 3) uint8.

    The part of the frame the crop covers is first downscaled with antialiasing to about the crop's scale, so that a
    large face is averaged, not point-sampled.
    """
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))  # crop px per frame px
    corners = to_crop(invert(matrix), np.array([[0, 0], [CROP_SIZE, 0], [0, CROP_SIZE], [CROP_SIZE, CROP_SIZE]], float))
    h, w = frame.shape[:2]
    x0, y0 = np.floor(corners.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        region, offset = frame, np.zeros(2)
    else:
        region, offset = frame[y0:y1, x0:x1], np.array([x0, y0], float)
    image = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1).float()
    local = matrix.copy()
    local[:, 2] += matrix[:, :2] @ offset  # the region's coordinates start at `offset`
    if scale < 0.75:
        rh, rw = image.shape[1:]
        nh, nw = max(2, round(rh * scale)), max(2, round(rw * scale))
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        local[:, :2] = local[:, :2] @ np.diag([rw / nw, rh / nh])
    crop = _warp(image, local, CROP_SIZE, CROP_SIZE, padding="border")
    return crop.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------------------------
# The jaw mask (spec §5.4)


def _line_pixels(p0: tuple[int, int], p1: tuple[int, int]) -> list[tuple[int, int]]:
    """The 8-connected line OpenCV draws from p0 to p1, walked left to right (its LineIterator's Bresenham)."""
    (x0, y0), (x1, y1) = sorted([p0, p1])
    dx, dy = x1 - x0, abs(y1 - y0)
    step = -1 if y1 < y0 else 1
    pixels, x, y = [], x0, y0
    if dx >= dy:
        err = dx - 2 * dy
        for _ in range(dx + 1):
            pixels.append((x, y))
            if err < 0:
                y, err = y + step, err + 2 * dx
            err, x = err - 2 * dy, x + 1
    else:
        err = dy - 2 * dx
        for _ in range(dy + 1):
            pixels.append((x, y))
            if err < 0:
                x, err = x + 1, err + 2 * dy
            err, y = err - 2 * dx, y + step
    return pixels


def _clip_line(p0: tuple[int, int], p1: tuple[int, int], size: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """OpenCV's clipLine: move the ends of a segment onto the image edges (truncating), or None if it misses."""
    last = size - 1
    (x1, y1), (x2, y2) = p0, p1

    def code(x: int, y: int) -> int:
        return (x < 0) + (x > last) * 2 + (y < 0) * 4 + (y > last) * 8

    c1, c2 = code(x1, y1), code(x2, y2)
    if c1 & c2 == 0 and c1 | c2:
        if c1 & 12:
            a = 0 if c1 < 8 else last
            x1, y1 = x1 + int((a - y1) * (x2 - x1) / (y2 - y1)), a
            c1 = (x1 < 0) + (x1 > last) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else last
            x2, y2 = x2 + int((a - y2) * (x2 - x1) / (y2 - y1)), a
            c2 = (x2 < 0) + (x2 > last) * 2
        if c1 & c2 == 0 and c1 | c2:
            if c1:
                a = 0 if c1 == 1 else last
                x1, y1, c1 = a, y1 + int((a - x1) * (y2 - y1) / (x2 - x1)), 0
            if c2:
                a = 0 if c2 == 1 else last
                x2, y2, c2 = a, y2 + int((a - x2) * (y2 - y1) / (x2 - x1)), 0
    return ((x1, y1), (x2, y2)) if c1 | c2 == 0 else None


def jaw_mask(left: tuple[int, int], right: tuple[int, int], size: int = CROP_SIZE) -> np.ndarray:
    """The official `face_mask_square`: the quadrilateral from the line left-right down to the bottom edge, filled
    (cv2.fillPoly semantics, boundary included). left/right: integer crop pixels of landmarks 234 and 454.
    Returns (size, size) uint8, 1 = regenerate."""
    mask = np.zeros((size, size), np.uint8)
    clipped = _clip_line(left, right, size)
    if clipped is None:
        return mask
    top: dict[int, int] = {}
    for x, y in _line_pixels(*clipped):
        top[x] = min(top.get(x, y), y)
    for x, y in top.items():
        mask[y:, x] = 1
    return mask


def crop_mask(landmarks: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The jaw mask of one frame in its crop. landmarks (478, 2) frame pixels. Returns (128, 128) uint8."""
    left, right = to_crop(matrix, landmarks[list(JAW_POINTS)].astype(np.float64))
    # int() truncates toward zero, as the official code does with its normalised landmarks x 128.
    return jaw_mask((int(left[0]), int(left[1])), (int(right[0]), int(right[1])))


# ---------------------------------------------------------------------------------------------------------------
# Paste-back


def blend_alpha(mask: np.ndarray) -> torch.Tensor:
    """Soft paste weight in the crop: the mask grown by MASK_DILATE px, then feathered. (128, 128) -> (1, 128, 128)."""
    m = torch.tensor(mask, dtype=torch.float32)[None, None]
    m = F.max_pool2d(m, 2 * MASK_DILATE + 1, stride=1, padding=MASK_DILATE)
    k = 2 * MASK_FEATHER + 1
    m = F.avg_pool2d(F.pad(m, (MASK_FEATHER,) * 4), k, stride=1)
    return m[0]


def paste_face(frame: np.ndarray, crop: np.ndarray, mask: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Blend the generated crop back into the frame inside the (dilated, feathered) mask only.

    frame (H, W, 3) uint8, crop (128, 128, 3) uint8, mask (128, 128) uint8, matrix 2x3 frame->crop.
    Returns a new (H, W, 3) uint8 frame; pixels the mask region does not reach are the input pixels, unchanged.
    """
    alpha = blend_alpha(mask)
    if not alpha.any():
        return frame
    ys, xs = np.nonzero(alpha[0].numpy())
    box = np.array(
        [[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.min(), ys.max() + 1], [xs.max() + 1, ys.max() + 1]]
    )
    corners = to_crop(invert(matrix), box.astype(float))
    h, w = frame.shape[:2]
    x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 1, [w, h])
    if x1 <= x0 or y1 <= y0:
        return frame
    local = matrix.copy()
    local[:, 2] += matrix[:, :2] @ np.array([x0, y0], float)  # frame region -> crop
    source = torch.cat([torch.from_numpy(crop).permute(2, 0, 1).float(), alpha], dim=0)
    warped = _warp(source, invert(local), y1 - y0, x1 - x0, padding="zeros")
    rgb, a = warped[:3], warped[3:].clamp(0, 1)
    region = torch.from_numpy(np.ascontiguousarray(frame[y0:y1, x0:x1])).permute(2, 0, 1).float()
    blended = (region * (1 - a) + rgb * a).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    out = frame.copy()
    out[y0:y1, x0:x1] = blended
    return out
