"""Colour: which Y'CbCr matrix and range a video uses, and the conversion between its codes and RGB.

The dub composites in the source's own pixel format (8-bit Y'CbCr 4:2:0): only the pasted mouth is converted, from the
generated RGB crop to the source's codes, with the same matrix and range that turned the source into the RGB crops the
model saw. Pixels away from the mouth are never converted at all.

Y'CbCr codes from R'G'B' in [0, 255] (ITU-R BT.601/709/2020, with K_R, K_B of the matrix):
    Y' = K_R R' + (1 - K_R - K_B) G' + K_B B'
    Cb = (B' - Y') / (2 (1 - K_B)),   Cr = (R' - Y') / (2 (1 - K_R))
limited ("tv") range: Y = 16 + 219/255 Y',  C = 128 + 224/255 C;   full ("pc") range: Y = Y',  C = 128 + C.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (K_R, K_B) of each matrix, under the names ffmpeg prints and accepts.
COEFFICIENTS = {
    "bt709": (0.2126, 0.0722),
    "bt470bg": (0.299, 0.114),
    "smpte170m": (0.299, 0.114),
    "bt601": (0.299, 0.114),
    "fcc": (0.30, 0.11),
    "smpte240m": (0.212, 0.087),
    "bt2020nc": (0.2627, 0.0593),
}
HDR_TRANSFERS = ("smpte2084", "arib-std-b67")  # PQ and HLG: their code values are not display-referred SDR
HD_LINES = 720  # an untagged video this tall or taller is taken as BT.709, as players do; shorter as BT.601


@dataclass(frozen=True)
class Colour:
    """How a video's Y'CbCr codes map to colours. None = not tagged in the file (and left untagged in the output)."""

    range: str = "tv"  # "tv" (limited, 16-235) or "pc" (full, 0-255)
    matrix: str | None = None  # e.g. "bt709", "smpte170m", "bt470bg"
    primaries: str | None = None
    transfer: str | None = None

    def effective_matrix(self, height: int) -> str:
        """The matrix to convert with: the tagged one, else BT.709 for HD and BT.601 below."""
        if self.matrix in COEFFICIENTS:
            return self.matrix
        return "bt709" if height >= HD_LINES else "bt601"

    @property
    def is_hdr(self) -> bool:
        return self.transfer in HDR_TRANSFERS


def rgb_to_yuv_matrix(matrix: str, full_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """The affine map from RGB in [0, 255] to Y'CbCr codes: yuv = L @ rgb + offset. Returns (L (3, 3), offset (3,))."""
    kr, kb = COEFFICIENTS[matrix]
    kg = 1 - kr - kb
    y = np.array([kr, kg, kb])
    cb = (np.array([0, 0, 1]) - y) / (2 * (1 - kb))
    cr = (np.array([1, 0, 0]) - y) / (2 * (1 - kr))
    linear = np.stack([y, cb, cr])
    if full_range:
        return linear, np.array([0.0, 128.0, 128.0])
    return linear * np.array([[219 / 255], [224 / 255], [224 / 255]]), np.array([16.0, 128.0, 128.0])


def yuv_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, matrix: str, full_range: bool) -> np.ndarray:
    """Codes of equal shape (...,) -> (..., 3) float64 RGB in [0, 255], unclipped: the inverse of rgb_to_yuv_matrix."""
    linear, offset = rgb_to_yuv_matrix(matrix, full_range)
    yuv = np.stack([y, u, v], axis=-1).astype(np.float64) - offset
    return yuv @ np.linalg.inv(linear).T
