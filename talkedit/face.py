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
from .media import YUVFrame

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
# Points that identify a face and move little with speech or expression: eyes, brows, nose, the upper face oval.
SIGNATURE_POINTS = (33, 133, 362, 263, 2, 70, 63, 105, 66, 107, 336, 296, 334, 293, 300, 168, 6, 197, 195, 5, 4,
                    10, 338, 297, 332, 284, 251, 389, 356, 454, 234, 127, 162, 21, 54, 103, 67, 109, 159, 145, 386,
                    374, 98, 327)  # fmt: skip
# A face is the chosen person when both its shape and its look match: measured on ../shared/media, one person across
# head turns stays under 0.021 (shape, crop units) and above 0.85 (look, correlation); another person at 0.015-0.06
# and 0.2-0.75.
MATCH_SHAPE = 0.025
MATCH_LOOK = 0.7
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
            parts = text.split(",")
            try:
                x, y = (float(v) for v in parts)
            except ValueError:
                raise ValueError(f"{text!r} is not a point: give two numbers, 'x,y'") from None
            return cls(point=(x, y))
        try:
            rank = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is neither a rank (1, 2, ...) nor a point 'x,y'") from None
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


def face_descriptor(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """What tells one person from another across shots: the aligned shape of SIGNATURE_POINTS and a normalised grey
    16x20 thumbnail of the eyes, brows and nose. frame (H, W, 3) uint8, landmarks (478, 2). Returns (D,) float32."""
    matrix = similarity_transform(landmarks[list(STABLE_POINTS)].astype(np.float64), TEMPLATE * CROP_SIZE)
    shape = to_crop(matrix, landmarks[list(SIGNATURE_POINTS)].astype(np.float64)) / CROP_SIZE
    upper = crop_face(frame, matrix)[16:80, 24:104].astype(np.float32).mean(axis=2)
    look = upper.reshape(16, 4, 20, 4).mean(axis=(1, 3))
    look -= look.mean()
    look /= np.linalg.norm(look) + 1e-6
    return np.concatenate([shape.ravel(), look.ravel()]).astype(np.float32)


def person_match(descriptor: np.ndarray, reference: np.ndarray) -> float | None:
    """How much a face (descriptor) looks like the reference person (the mean descriptor of their first track):
    the look correlation when shape and look both match, else None."""
    k = 2 * len(SIGNATURE_POINTS)
    shape = float(np.sqrt(((descriptor[:k] - reference[:k]) ** 2).mean()))
    look = float(descriptor[k:] @ reference[k:] / (np.linalg.norm(reference[k:]) + 1e-6))
    return look if shape <= MATCH_SHAPE and look >= MATCH_LOOK else None


def track_face(
    detections: list[list[np.ndarray]],
    cuts: np.ndarray,
    choice: FaceChoice,
    descriptors: list[list[np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Follow one person through the clip.

    detections: per frame, the (478, 2) landmarks of every face found; descriptors: the `face_descriptor` of each.
    The person is chosen with `choice` where the first track starts, then followed frame to frame as the detection
    nearest its last position. Gaps of up to MAX_GAP frames are interpolated; a longer gap or a shot cut ends the
    track. A later track starts only on a face that is the same person (by descriptor: position means nothing across
    a cut), so that another face never gets the mouth; without descriptors, `choice` picks again.
    Returns (landmarks (T, 478, 2) float32, NaN where untracked; track id (T,) int32, -1 where untracked).
    """
    frames = len(detections)
    points = np.full((frames, NUM_LANDMARKS, 2), np.nan, np.float32)
    track = np.full(frames, -1, np.int32)
    current, last, missed = -1, None, 0
    seen: list[np.ndarray] = []  # descriptors of the first track: who the person is
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
            if descriptors is not None and seen:
                reference = np.mean(seen, axis=0)
                scores = {n: person_match(d, reference) for n, d in enumerate(descriptors[i])}
                matches = {n: score for n, score in scores.items() if score is not None}
                chosen = max(matches, key=matches.get) if matches else None
            else:
                chosen = choice.pick(faces)
            if chosen is not None:
                current = track.max() + 1
        if chosen is None:
            missed += 1
            continue
        points[i], track[i], last, missed = faces[chosen], current, faces[chosen], 0
        if descriptors is not None and current == 0 and len(seen) < 100:
            seen.append(descriptors[i][chosen])
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
    # Parts of the crop beyond the picture are its mirror image (plausible skin and background), not edge streaks;
    # they are never pasted back (the paste writes frame pixels only).
    crop = _warp(image, local, CROP_SIZE, CROP_SIZE, padding="reflection")
    return crop.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------------------------
# The jaw mask (spec §5.4)


def jaw_mask(left: tuple[int, int], right: tuple[int, int], size: int = CROP_SIZE) -> np.ndarray:
    """The official `face_mask_square`: cv2.fillPoly of the quadrilateral A -> C -> (x_C, 128) -> (x_A, 128), where
    A, C = left, right are the integer crop pixels of landmarks 234 and 454 (spec §5.4). Returns (size, size) uint8,
    1 = regenerate."""
    import cv2  # installed with mediapipe; the official code draws the mask with it

    mask = np.zeros((size, size), np.uint8)
    polygon = np.array([left, right, (right[0], size), (left[0], size)], np.int32)
    cv2.fillPoly(mask, [polygon], 1)
    return mask


def crop_mask(landmarks: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The jaw mask of one frame in its crop. landmarks (478, 2) frame pixels. Returns (128, 128) uint8."""
    left, right = to_crop(matrix, landmarks[list(JAW_POINTS)].astype(np.float64))
    # int() truncates toward zero, as the official code does with its normalised landmarks x 128.
    return jaw_mask((int(left[0]), int(left[1])), (int(right[0]), int(right[1])))


# ---------------------------------------------------------------------------------------------------------------
# Paste-back


def blend_alpha(mask: np.ndarray) -> torch.Tensor:
    """Soft paste weight in the crop: the mask grown by MASK_DILATE px, feathered, and tapered to 0 at the crop's
    border, so that nothing beyond the crop's edge is blended in. (128, 128) -> (1, 128, 128) float in [0, 1]."""
    m = torch.tensor(mask, dtype=torch.float32)[None, None]
    m = F.max_pool2d(m, 2 * MASK_DILATE + 1, stride=1, padding=MASK_DILATE)
    k = 2 * MASK_FEATHER + 1
    m = F.avg_pool2d(F.pad(m, (MASK_FEATHER,) * 4), k, stride=1)[0]
    size = mask.shape[-1]
    edge = torch.arange(size, dtype=torch.float32)
    ramp = (torch.minimum(edge, size - 1 - edge) / MASK_FEATHER).clamp(max=1)  # 0 on the outermost pixels
    return m * ramp[None, :, None] * ramp[None, None, :]


def _paste_region(
    crop: np.ndarray, mask: np.ndarray, matrix: np.ndarray, height: int, width: int, even: bool = False
) -> tuple[tuple[int, int, int, int], torch.Tensor, torch.Tensor] | None:
    """The generated crop warped into the frame box its paste weight reaches, premultiplied by that weight.

    Premultiplying (warping rgb·α and α, then blending frame·(1 - α) + (rgb·α)) keeps the zero padding beyond the
    crop from darkening the edge. With `even` the box starts and ends on even pixels (4:2:0 chroma) and may reach
    one pixel beyond an odd frame. Returns ((x0, y0, x1, y1), rgb·α (3, h, w), α (1, h, w)), or None when the weight
    reaches no pixel of the frame.
    """
    alpha = blend_alpha(mask)
    if not alpha.any():
        return None
    ys, xs = np.nonzero(alpha[0].numpy())
    box = np.array(
        [[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.min(), ys.max() + 1], [xs.max() + 1, ys.max() + 1]]
    )
    corners = to_crop(invert(matrix), box.astype(float))
    x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 1, [width, height])
    if even:
        x0, y0, x1, y1 = x0 - x0 % 2, y0 - y0 % 2, x1 + x1 % 2, y1 + y1 % 2
    if x1 <= x0 or y1 <= y0:
        return None
    local = matrix.copy()
    local[:, 2] += matrix[:, :2] @ np.array([x0, y0], float)  # frame region -> crop
    rgb = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float()
    warped = _warp(torch.cat([rgb * alpha, alpha], dim=0), invert(local), y1 - y0, x1 - x0, padding="zeros")
    return (int(x0), int(y0), int(x1), int(y1)), warped[:3], warped[3:].clamp(0, 1)


def paste_face(frame: np.ndarray, crop: np.ndarray, mask: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Blend the generated crop back into an RGB frame inside the (dilated, feathered) mask only.

    frame (H, W, 3) uint8, crop (128, 128, 3) uint8, mask (128, 128) uint8, matrix 2x3 frame->crop.
    Returns a new (H, W, 3) uint8 frame; pixels the mask region does not reach are the input pixels, unchanged.
    """
    pasted = _paste_region(crop, mask, matrix, *frame.shape[:2])
    if pasted is None:
        return frame
    (x0, y0, x1, y1), rgb_a, a = pasted
    region = torch.from_numpy(np.ascontiguousarray(frame[y0:y1, x0:x1])).permute(2, 0, 1).float()
    blended = (region * (1 - a) + rgb_a).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    out = frame.copy()
    out[y0:y1, x0:x1] = blended
    return out


def paste_face_yuv(
    frame: YUVFrame, crop: np.ndarray, mask: np.ndarray, matrix: np.ndarray, colour_matrix: str, full_range: bool
) -> YUVFrame:
    """`paste_face` into a frame in the source's own Y'CbCr 4:2:0 codes (see colour.py).

    The generated RGB is converted with `colour_matrix` and the range (the inverse of the conversion that made the
    crops) and blended into the planes; since the conversion is affine, blending codes equals blending colours. Luma
    and chroma samples whose paste weight is 0 keep their exact value: nothing else of the frame is converted.
    Returns a new YUVFrame.
    """
    from .colour import rgb_to_yuv_matrix

    pasted = _paste_region(crop, mask, matrix, frame.height, frame.width, even=True)
    if pasted is None:
        return frame
    (x0, y0, x1, y1), rgb_a, a = pasted
    linear, offset = (torch.from_numpy(m).float() for m in rgb_to_yuv_matrix(colour_matrix, full_range))
    # Premultiplied codes: L (rgb·α) + offset·α.
    yuv_a = torch.einsum("ij,jhw->ihw", linear, rgb_a) + offset[:, None, None] * a
    out = frame.copy()
    h, w = min(y1, frame.height) - y0, min(x1, frame.width) - x0
    y = out.y[y0 : y0 + h, x0 : x0 + w]
    luma = torch.from_numpy(y.astype(np.float32)) * (1 - a[0, :h, :w]) + yuv_a[0, :h, :w]
    y[:] = luma.round().clamp(0, 255).byte().numpy()
    # Chroma: weights and premultiplied codes averaged over each 2x2 block.
    a2 = F.avg_pool2d(a[None], 2)[0, 0]
    c_a = F.avg_pool2d(yuv_a[None, 1:], 2)[0]
    for index, plane in enumerate((out.u, out.v)):
        target = plane[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2]
        ch, cw = target.shape
        blended = torch.from_numpy(target.astype(np.float32)) * (1 - a2[:ch, :cw]) + c_a[index, :ch, :cw]
        target[:] = blended.round().clamp(0, 255).byte().numpy()
    return out
