"""The generation stage: a shot's frames split into autoregressive chains, sampled a frame per chain per UNet call.

    plan_chains      output frames -> chains (tracked runs, split on quiet moments)
    schedule         chains -> UNet calls of up to `batch` frames, each track's identity frame first
    generate_chains  crops, masks, audio windows and chains -> generated crops
    chain_jump       how visible the chains' restarts are in the generated crops (eval's "chain jump")

Needs only numpy and torch, so that held-out clips of a pack can be dubbed on a GPU machine that has nothing else
(benchmarks/grid_s1.py); `pipeline.dub` drives it for a video.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import TalkeditError

CHAIN_SECONDS = 5.0  # a run of tracked frames longer than twice this is split into chains about this long
SPLIT_SEARCH_SECONDS = 1.0  # how far from an even split a chain may end to end on the quietest moment
# Frames a chain after a split starts early, crossfaded into the end of the chain before it. With none, a restart
# showed: the mouth changed 1.5x as much where a chain took over as elsewhere; with 3, 0.9x (README "Benchmarks").
CHAIN_OVERLAP = 3


@dataclass
class Chain:
    """One autoregressive chain: consecutive output frames of one track, each conditioned on the one before it.

    Its noise comes from its own generator, seeded from (seed, track, first frame), so that the video does not depend
    on which chains share a UNet call, nor on the device.
    """

    track: int
    frames: list[int]  # output-frame indices, in order
    lead: int = 0  # its first `lead` frames are also the previous chain's last ones: the two are crossfaded there

    @property
    def start(self) -> int:
        return self.frames[0]

    def seed(self, seed: int) -> int:
        return (seed * 1_000_003 + self.track * 7_919 + self.start) % (1 << 63)


def plan_chains(
    src: np.ndarray,
    track: np.ndarray,
    loudness: np.ndarray,
    fps: float,
    chain_seconds: float | None = None,
    overlap: int | None = None,
) -> list[Chain]:
    """Split output frames into chains: runs where the face is tracked and the source advances by at most one frame
    within one track. Runs longer than 2 x chain_seconds are split into chains of about chain_seconds, each ending on
    the quietest frame (by `loudness`, (num_output,)) within SPLIT_SEARCH_SECONDS of an even split, where a restart
    is least visible. With `overlap`, each chain after a split starts that many frames early (at most half the chain
    before it) and is crossfaded into it there. None means the default (CHAIN_SECONDS, CHAIN_OVERLAP). The plan
    depends on the inputs only (not on the device or batch)."""
    chain_seconds = CHAIN_SECONDS if chain_seconds is None else chain_seconds
    overlap = CHAIN_OVERLAP if overlap is None else overlap
    runs: list[list[int]] = []
    for j, s in enumerate(src):
        if track[s] < 0:
            continue
        if runs and runs[-1][-1] == j - 1 and abs(int(src[j - 1]) - int(s)) <= 1 and track[src[j - 1]] == track[s]:
            runs[-1].append(j)
        else:
            runs.append([j])
    target = max(1, round(chain_seconds * fps))
    search = min(round(SPLIT_SEARCH_SECONDS * fps), target // 2)
    result = []
    for run in runs:
        cuts = [0]
        while len(run) - cuts[-1] > 2 * target:
            rest = run[cuts[-1] :]
            lo, hi = max(1, target - search), min(len(rest) - 1, target + search)
            cuts.append(cuts[-1] + lo + int(np.argmin(loudness[rest[lo:hi]])))
        cuts.append(len(run))
        for n in range(len(cuts) - 1):
            lead = min(overlap, (cuts[n] - cuts[n - 1]) // 2) if n else 0
            result.append(Chain(int(track[src[run[0]]]), run[cuts[n] - lead : cuts[n + 1]], lead))
    return result


def schedule(chain_list: list[Chain], batch: int) -> Iterator[list[tuple[int, int]]]:
    """Which frames go into each UNet call: lists of (chain index, position in the chain), at most `batch` long.

    Every track shares one identity frame: its first chain's first generated frame (as the official inference uses
    generated frame 0). Other chains of a track wait for it; chains of different tracks and shots fill a call first.
    """
    # Round robin over tracks: every track's first chain, then every track's second, ...
    nth_of_track, seen = [], Counter()
    for chain in chain_list:
        nth_of_track.append(seen[chain.track])
        seen[chain.track] += 1
    pending = sorted(range(len(chain_list)), key=lambda k: (nth_of_track[k], k))
    identity_ready: set[int] = set()
    position = dict.fromkeys(range(len(chain_list)), 0)
    active: list[int] = []
    started_tracks: set[int] = set()
    while pending or active:
        for k in list(pending):
            if len(active) >= batch:
                break
            track = chain_list[k].track
            if track in identity_ready or track not in started_tracks:
                started_tracks.add(track)
                active.append(k)
                pending.remove(k)
        call = [(k, position[k]) for k in active]
        yield call
        for k, pos in call:
            identity_ready.add(chain_list[k].track)
            position[k] = pos + 1
        active = [k for k in active if position[k] < len(chain_list[k].frames)]


def generate_chains(
    model,
    crops,
    masks,
    src: np.ndarray,
    windows: np.ndarray,
    chain_list: list[Chain],
    batch: int,
    generated,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    precision: str = "auto",
    guidance: float = 1.0,
    progress: Callable[[str, int, int], None] | None = None,
    step_callback: Callable | None = None,
) -> None:
    """Run the chains as `schedule` says, one frame of up to `batch` chains per UNet call, into `generated`.

    crops:     indexable by source frame -> (128, 128, 3) uint8 RGB aligned crop (an array or a memory map)
    masks:     indexable by source frame -> (128, 128) {0, 1} jaw mask
    src:       (num_output,) the source frame each output frame shows
    windows:   (num_output, F, M) float32 dB audio window of each output frame
    generated: settable by output frame: receives (128, 128, 3) uint8 crops

    A chain's first frame conditions on its own original crop (spec §6), later frames on the chain's previous
    generated frame; every frame of a track on the track's identity frame (its first generated frame). Where a chain
    has a lead (see `plan_chains`), its crops there fade in linearly over the previous chain's: a crop waits in memory
    for its partner, so at most about `batch` x lead crops wait at once. `step_callback` goes to `sample_frames` as
    its `callback` (called after every sampling step; it may raise to stop).
    """
    import torch

    from .diffusion import resolve_precision, sample_frames

    def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1

    total = sum(len(c.frames) for c in chain_list)
    generators = [torch.Generator().manual_seed(c.seed(seed)) for c in chain_list]
    previous: dict[int, np.ndarray] = {}  # chain -> its last generated crop
    identity: dict[int, np.ndarray] = {}  # track -> its identity crop
    # Crossfades: output frame -> the weight of the later chain's crop there; the first crop of each pair waits.
    fade = {j: (p + 1) / (c.lead + 1) for c in chain_list for p, j in enumerate(c.frames[: c.lead])}
    waiting: dict[int, np.ndarray] = {}  # output frame -> the crop of one chain there, until the other's comes
    done = 0
    for call in schedule(chain_list, batch):
        targets = [chain_list[k].frames[pos] for k, pos in call]
        sources = [src[j] for j in targets]
        originals = [np.asarray(crops[s]) for s in sources]
        tracks = [chain_list[k].track for k, _ in call]
        out = sample_frames(
            model,
            to_tensor(originals),
            torch.from_numpy(np.stack([masks[s] for s in sources])).float()[:, None],
            to_tensor([previous.get(k, originals[n]) for n, (k, _) in enumerate(call)]),
            to_tensor([identity.get(track, originals[n]) for n, track in enumerate(tracks)]),
            torch.from_numpy(windows[targets]),
            sampler=sampler,
            steps=steps,
            generator=[generators[k] for k, _ in call],
            precision=precision,
            guidance=guidance,
            callback=step_callback,
        )
        if not torch.isfinite(out).all():  # NaN would quantise to black mouths and exit 0
            half = resolve_precision(out.device, precision) is not None
            where = " in half precision (try --precision fp32)" if half else ""
            raise TalkeditError(
                f"the model produced NaN or infinite pixels{where}; its weights are damaged or it diverged: "
                "re-create or re-train it."
            )
        # Quantise to uint8 as the official code does by saving PNGs.
        images = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for n, (k, pos) in enumerate(call):
            j, later = targets[n], pos < chain_list[k].lead
            if j not in fade:
                generated[j] = images[n]
            elif j not in waiting:
                waiting[j] = images[n]
            else:
                other = waiting.pop(j)
                new, old = (images[n], other) if later else (other, images[n])
                generated[j] = np.round(fade[j] * new + (1 - fade[j]) * old.astype(np.float32)).astype(np.uint8)
            previous[k] = images[n]
            identity.setdefault(tracks[n], images[n])
            if pos + 1 == len(chain_list[k].frames):
                del previous[k]
        done += len(call)
        if progress is not None:
            progress("generate", done, total)


def mouth_change(crops, masks, tracked: np.ndarray) -> np.ndarray:
    """The mouth's change into each frame: (T,) mean absolute difference from the frame before, inside the frame's
    jaw mask, in 0-255 levels; NaN where this frame or the one before has no face.

    crops: (T, 128, 128, 3) uint8 generated crops; masks: (T, 128, 128) jaw masks; tracked: (T,) bool.
    """
    change = np.full(len(tracked), np.nan)
    for i in range(1, len(tracked)):
        mask = np.asarray(masks[i]).astype(bool)
        if tracked[i] and tracked[i - 1] and mask.any():
            change[i] = np.abs(crops[i].astype(np.float32) - crops[i - 1])[mask].mean()
    return change


def chain_jump(change: np.ndarray, starts: list[int]) -> float | None:
    """How visible the chains' restarts are: the mouth's change into the frames where a chain takes over (`starts`:
    a chain's first frame, and every frame of its crossfade if it has one) over its change into every other frame,
    from `mouth_change`. 1 = a restart shows no more than the motion within chains. None without a comparable start.
    """
    starts = sorted(s for s in set(starts) if 0 <= s < len(change) and np.isfinite(change[s]))
    inside = np.setdiff1d(np.flatnonzero(np.isfinite(change)), starts)
    if not starts or not len(inside):
        return None
    return float(np.mean(change[starts]) / max(float(np.mean(change[inside])), 1e-6))
