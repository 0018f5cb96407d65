"""Validate the reference-free sync measure (talkedit/sync.py) on real clips with their own speech.

For every video: the offset with its own audio, the offsets detected with the audio shifted by +-3/5/10 frames (a
shift counts as recovered when the detected offset moves by the shift, within one frame), and the confidence with its
own audio against the confidence with every other clip's audio (looped or cut to its length). Prints a table and the
AUC of matched against mismatched confidence.

    python benchmarks/sync.py                  # the clips of ../shared/media/video
    python benchmarks/sync.py a.mp4 b.mp4 ...  # other clips (two at least)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from talkedit.analysis import preprocess
from talkedit.media import decode_speech, read_audio
from talkedit.sync import av_sync, mouth_opening, mouth_points, shift_frames, speech_bands

SHIFTS = (3, -3, 5, -5, 10, -10)


def clip_signals(videos: list[Path]) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """name -> (mouth opening (T,), wav (samples,), fps)."""
    out = {}
    with tempfile.TemporaryDirectory() as scratch:
        for video in videos:
            analysis = preprocess(video)
            opening = mouth_opening(mouth_points(analysis.landmarks, analysis.matrices))
            wav = read_audio(decode_speech(video, Path(scratch) / "speech.wav"))
            out[video.name] = (opening, wav, analysis.video.fps)
    return out


def loop_to(wav: np.ndarray, samples: int) -> np.ndarray:
    return np.resize(wav, samples)


def validate(signals: dict) -> dict:
    """Per clip: own offset, recovered shifts, own confidence, mismatched confidences; and the totals."""
    rows, matched, mismatched, recovered, tried = {}, [], [], 0, 0
    for name, (opening, wav, fps) in signals.items():
        bands = speech_bands(wav, len(opening), fps)
        own = av_sync(opening, bands, fps)
        detected = {s: av_sync(opening, shift_frames(bands, s), fps).offset for s in SHIFTS}
        ok = sum(abs(detected[s] - own.offset - s) <= 1 for s in SHIFTS)
        others = []
        for other, (_, other_wav, _) in signals.items():
            if other != name:
                result = av_sync(opening, speech_bands(loop_to(other_wav, len(wav)), len(opening), fps), fps)
                others.append(result.confidence if result else 0.0)
        rows[name] = {"offset": own.offset, "shifted": detected, "recovered": ok, "confidence": own.confidence,
                      "mismatched_median": float(np.median(others)),
                      "mismatched_max": float(np.max(others))}  # fmt: skip
        matched.append(own.confidence)
        mismatched += others
        recovered += ok
        tried += len(SHIFTS)
    m, u = np.array(matched), np.array(mismatched)
    auc = float(np.mean((m[:, None] > u[None]) + 0.5 * (m[:, None] == u[None])))
    return {"clips": rows, "recovered": recovered, "tried": tried, "auc": auc}


def main() -> None:
    args = [Path(a) for a in sys.argv[1:]]
    videos = args or sorted((Path(__file__).resolve().parents[2] / "shared" / "media" / "video").iterdir())
    result = validate(clip_signals(videos))
    print(f"{'clip':60s} {'own':>4s} {'shifts +3 -3 +5 -5 +10 -10':>28s} {'conf':>6s} {'other (median/max)':>19s}")
    for name, row in result["clips"].items():
        shifted = " ".join(f"{row['shifted'][s]:+d}" for s in SHIFTS)
        print(f"{name[:60]:60s} {row['offset']:+4d} {shifted:>28s} {row['confidence']:6.2f} "
              f"{row['mismatched_median']:8.2f} / {row['mismatched_max']:5.2f}")  # fmt: skip
    own = np.array([row["offset"] for row in result["clips"].values()])
    print(f"own-audio offset: median |offset| {np.median(np.abs(own)):.1f}, within +-1: {(np.abs(own) <= 1).sum()}"
          f"/{len(own)}, within +-3: {(np.abs(own) <= 3).sum()}/{len(own)}")  # fmt: skip
    print(f"shifts recovered within +-1 frame: {result['recovered']}/{result['tried']}")
    print(f"matched vs mismatched confidence: AUC {result['auc']:.3f}")


if __name__ == "__main__":
    main()
