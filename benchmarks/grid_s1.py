"""The paper's single-speaker experiment, end to end: GRID speaker s1 -> pack -> train -> held-out dubs -> eval.

GRID s1 (CC BY 4.0) is 1000 clips of 3 s. Fetch it first (it is not downloaded here):

    git clone https://github.com/TVR28/LipNet && export GRID=LipNet/data/s1        # 431 MB of .mpg

Then, each stage resuming from what the last one wrote in WORK (default grid-s1/):

    python benchmarks/grid_s1.py prepare $GRID        # clip lists: drops pbio7a, trims 10 corrupt starts, holds out 50
    python benchmarks/grid_s1.py pack                 # preprocess (2 processes) and pack: WORK/grid-s1.pack
    python benchmarks/grid_s1.py pack --held-out-only # WORK/held.pack: the 50 held-out clips, for sampled/dubs/eval
    # on a GPU: the recipe defaults from scratch, predicting v (the reference model; the paper's eps samples noisy
    # mouths at this length, see README); the held-out clips are the pack's last 50, its validation set
    python -m talkedit.train WORK/grid-s1.pack -o WORK/grid-s1-v.safetensors --prediction v --steps 2500 \\
        --val-fraction 0.05005 --eval-every 500 --checkpoint-every 2500
    python benchmarks/grid_s1.py sampled --model WORK/grid-s1-v.safetensors  # how often sampled mouths are noise
    python benchmarks/grid_s1.py dubs --model WORK/grid-s1-v.safetensors --steps 25 --random-steps 10   # GPU
    python benchmarks/grid_s1.py eval                 # CPU: composite, `talkedit eval`, the README table
    python benchmarks/grid_s1.py chains --model M     # GPU: chain jump against chain length and overlap

The cross-speaker check runs the same stages on one clip of each of ten other GRID speakers, in a WORK of its own:

    git clone https://github.com/rizkiarm/LipNet LipNet-samples
    python benchmarks/grid_s1.py --work grid-x prepare-others LipNet-samples/evaluation/samples
    python benchmarks/grid_s1.py --work grid-x pack --held-out-only
    python benchmarks/grid_s1.py --work grid-x dubs --model M --steps 25 --random-steps 10   # GPU; a CPU: --batch 2
    python benchmarks/grid_s1.py --work grid-x eval

`train`, `sampled`, `dubs` and `chains` need only torch, numpy, safetensors and OpenCV, so they run on a GPU machine
that has nothing else. Everything else needs the full talkedit install.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CORRUPT = ("pbio7a",)  # corrupt throughout
BAD_START = ("bbizzn", "brwa4p", "brwg8p", "bwwuzn", "lgbf8n", "lrarzn", "pbwx1s", "prii9a", "sbbh4p", "sran9s")
BAD_FRAMES = 12  # the corrupt frames at the start of the BAD_START clips
HELD_OUT = 50


def held_out(names: list[str]) -> list[str]:
    """50 clips spread evenly over the sorted names (never a trimmed one): the same list on every machine."""
    candidates = [n for n in sorted(names) if n not in BAD_START]
    step = len(candidates) // HELD_OUT
    return candidates[::step][:HELD_OUT]


def prepare(source: Path, work: Path) -> None:
    """Write WORK/clips/ (links to the good clips, trimmed copies of the bad starts) and WORK/order.txt: the
    training clips, then the 50 held-out ones (the pack's validation set is its last 50 clips)."""
    from talkedit.media import ffmpeg_exe

    videos = {p.stem: p for p in sorted(source.glob("*.mpg"))}
    if len(videos) < 1000:
        sys.exit(f"{source}: {len(videos)} .mpg clips; expected GRID s1's 1000 (data/s1 of TVR28/LipNet).")
    for name in CORRUPT:
        videos.pop(name)
    clips = work / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    for name, path in videos.items():
        if name in BAD_START:
            target = clips / f"{name}.mkv"
            if not target.exists():
                start = BAD_FRAMES / 25
                subprocess.run(
                    [ffmpeg_exe(), "-v", "error", "-y", "-i", str(path),
                     "-vf", f"trim=start_frame={BAD_FRAMES},setpts=PTS-STARTPTS",
                     "-af", f"atrim=start={start},asetpts=PTS-STARTPTS",
                     "-c:v", "libx264", "-crf", "10", "-preset", "fast", "-c:a", "pcm_s16le", str(target)],
                    check=True,
                )  # fmt: skip
        else:
            target = clips / f"{name}.mpg"
            if not target.exists():
                target.symlink_to(path.resolve())
    names = sorted(videos)
    test = held_out(names)
    train = [n for n in names if n not in test]
    suffix = {n: ".mkv" if n in BAD_START else ".mpg" for n in names}
    (work / "order.txt").write_text("".join(f"clips/{n}{suffix[n]}\n" for n in train + test))
    (work / "held-out.txt").write_text("".join(f"{n}\n" for n in test))
    print(f"{len(train)} training clips, {len(test)} held out -> {work / 'order.txt'}")


OTHER_SPEAKERS = ("brbk7n", "lbax4n", "lbbc2a", "lrwp9a", "lwbsza", "pwij3p", "sbia1a", "sbwe5n", "swiz3n", "swwp2s")


def prepare_others(source: Path, work: Path) -> None:
    """The cross-speaker check's WORK: links to one 3 s clip of each of ten GRID speakers other than s1 (the samples
    of rizkiarm/LipNet: evaluation/samples/GRID/*.mpg and id2_vcd_swwp2s.mpg), all of them "held out", so that
    `pack --held-out-only`, `dubs` and `eval` run on them as on s1's held-out clips."""
    clips = work / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    found = {p.stem.removeprefix("id2_vcd_"): p for p in [*source.glob("GRID/*.mpg"), *source.glob("id2_vcd_*.mpg")]}
    missing = [n for n in OTHER_SPEAKERS if n not in found]
    if missing:
        sys.exit(f"{source}: no {', '.join(missing)}; expected evaluation/samples of rizkiarm/LipNet.")
    for name in OTHER_SPEAKERS:
        target = clips / f"{name}.mpg"
        if not target.exists():
            target.symlink_to(found[name].resolve())
    (work / "order.txt").write_text("".join(f"clips/{n}.mpg\n" for n in OTHER_SPEAKERS))
    (work / "held-out.txt").write_text("".join(f"{n}\n" for n in OTHER_SPEAKERS))
    print(f"{len(OTHER_SPEAKERS)} clips of other speakers -> {work / 'order.txt'}")


def _one_thread() -> None:
    """Each analysis worker runs torch on one thread: the workers already fill the cores, and torch's own threads
    beside them made the analysis slower than one process (2-core Intel Xeon, 20 GRID clips: 41 s in 2 workers of 2
    torch threads, 23 s in one process, 15 s in 2 workers of one thread)."""
    import torch

    torch.set_num_threads(1)


def _analyse(path: str) -> str:
    from talkedit.analysis import preprocess

    preprocess(Path(path), offline=True)
    return path


def pack(work: Path, processes: int, held_out_only: bool = False) -> None:
    """Preprocess every clip (in `processes` worker processes; cached) and write WORK/grid-s1.pack; with
    `held_out_only`, only the 50 held-out clips into WORK/held.pack (a minute instead of 15: enough for
    `sampled` on a CPU)."""
    from rich.progress import Progress

    from talkedit.pack import build_pack

    order = work / "order.txt"
    lines = order.read_text().split()
    if held_out_only:
        order = work / "order-held.txt"
        order.write_text("".join(f"{line}\n" for line in lines[-HELD_OUT:]))  # order.txt ends with the held-out clips
        lines = lines[-HELD_OUT:]
    output = work / ("held.pack" if held_out_only else "grid-s1.pack")
    paths = [str(work / line) for line in lines]
    with Progress() as bar, ProcessPoolExecutor(processes, initializer=_one_thread) as pool:
        task = bar.add_task("analyse", total=len(paths))
        for _ in pool.map(_analyse, paths, chunksize=4):
            bar.advance(task)
    with Progress() as bar:
        task = bar.add_task("pack", total=len(paths))
        build_pack([order], output, offline=True, progress=lambda s, d, t: bar.update(task, completed=d))
    print(f"{output}: {len(paths)} clips, {output.stat().st_size / 2**20:.1f} MiB")


# -- train: on the GPU, from the pack alone -----------------------------------------------------------------------

VAL_FRACTION = 0.05005  # the pack's last round(999 * 0.05005) = 50 clips: the held-out ones
PART_BYTES = 15 * 2**20  # what one file may weigh to come back from the GPU machine


def train(work: Path, minutes: float | None, time_limit: float, resume: bool, eval_every: int, *,
          arch: str = "dve", batch: int = 32, probe_steps: int = 40, prediction: str = "v") -> None:  # fmt: skip
    """The recipe defaults from scratch on WORK/grid-s1.pack, validating on the held-out clips.

    A new run first times 40 steps and sets --steps so that the whole run takes about `minutes` of training; each
    call stops at a checkpoint before `time_limit` minutes, and `resume` continues it (the checkpoint keeps --steps).
    `prediction` "v" (the default, as the reference model) writes WORK/grid-s1-v.safetensors with its run in
    WORK/train-v; "eps" (the paper's) WORK/grid-s1.safetensors with its run in WORK/train.
    """
    import tempfile

    from talkedit.train import main as train_main

    suffix = "" if prediction == "eps" else f"-{prediction}"
    pack_path, model = work / "grid-s1.pack", work / f"grid-s1{suffix}.safetensors"
    data = [str(pack_path), "--val-fraction", str(VAL_FRACTION), "--arch", arch, "--batch", str(batch),
            "--prediction", prediction]  # fmt: skip
    common = [*data, "-o", str(model), "--workdir", str(work / f"train{suffix}")]
    if resume:
        args = [*common, "--resume"]
    else:
        with tempfile.TemporaryDirectory() as probe:
            timing = [*data, "-o", f"{probe}/probe.safetensors", "--workdir", probe, "--steps", str(probe_steps),
                      "--eval-every", "0", "--checkpoint-every", "0"]  # fmt: skip
            if train_main(timing):
                sys.exit("the timing run failed")
            records = [json.loads(line) for line in Path(probe, "metrics.jsonl").read_text().splitlines()]
        rate = np.mean([r["samples_per_s"] for r in records if "samples_per_s" in r][-2:])
        steps = max(1, int(rate * minutes * 60 / batch * 0.95))  # 5 % for the evaluations and checkpoints
        print(f"timing: {rate:.1f} samples/s at batch {batch} -> --steps {steps} for {minutes} minutes", flush=True)
        args = [*common, "--steps", str(steps)]
    args += ["--time-limit", str(time_limit), "--eval-every", str(eval_every), "--checkpoint-every", str(eval_every),
             "--log-every", "100"]  # fmt: skip
    sys.exit(train_main(args))


def half(model: Path, out: Path) -> None:
    """The model in fp16, split into parts small enough to come back from the GPU machine (see `join`)."""
    from talkedit.weights import read_weights, save_weights

    weights = read_weights(model)
    state = {k: v.half() if v.is_floating_point() else v for k, v in weights.state_dict.items()}
    keys, parts, size = sorted(state), [[]], 0
    for k in keys:
        nbytes = state[k].numel() * state[k].element_size()
        if size + nbytes > PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(k)
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    for n, part in enumerate(parts):
        save_weights(out / f"{model.stem}.part{n}.safetensors", {k: state[k] for k in part}, weights.unet_config,
                     weights.diffusion_config, weights.provenance)  # fmt: skip
    print(f"{model}: {len(parts)} fp16 parts in {out}")


def join(parts: list[Path], output: Path) -> None:
    """One weights file from the parts that `half` wrote, checked by loading it."""
    from talkedit.weights import build_model, read_weights, save_weights

    files = [read_weights(p) for p in parts]
    state = {k: v for f in files for k, v in f.state_dict.items()}
    save_weights(output, state, files[0].unet_config, files[0].diffusion_config, files[0].provenance)
    build_model(read_weights(output))
    print(f"{output}: {len(state)} tensors, {output.stat().st_size / 2**20:.1f} MiB")


# -- sampled: how often a model's sampled mouths are noise (GPU or CPU, from the pack alone) -------------------------

NOISY = 0.02  # masked error of a noisy mouth (reference model: noisy ones 0.034-0.31, the rest 0.0003-0.0196)
PRECISION_CHOICES = ("auto", "fp16", "bf16", "fp32")  # talkedit.diffusion.PRECISIONS, without importing torch


def sampled(
    work: Path,
    model_path: Path,
    frames: int,
    draws: int,
    steps: int,
    sampler: str,
    precision: str = "auto",
    compare: str | None = None,
) -> None:
    """Sample `frames` held-out frames (evenly spread, true previous and identity frames, own audio, as the training
    strips) `draws` times each from fresh noise, and print each sample's masked error against the original and how
    many are noisy mouths (error > NOISY). One-step validation error does not show this; sampling does. With
    `compare`, sample the same frames from the same noise again in that precision and print how far apart the two
    are inside the mask (8-bit levels, PSNR)."""
    import time

    import torch

    from talkedit.diffusion import resolve_precision, sample_frames
    from talkedit.pack import Split, read_pack
    from talkedit.samples import TrainingData
    from talkedit.validation import evaluation_set, masked_error
    from talkedit.weights import load_model

    pack = read_pack(_pack_path(work))
    held = np.isin(pack.clip, held_out_clips(pack, work))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = TrainingData(pack, Split(np.flatnonzero(~held), np.flatnonzero(held), {}), device, 1.0)
    index, identity = evaluation_set(data, frames)
    index, identity = np.tile(index, draws), np.tile(identity, draws)
    model = load_model(model_path, device=device, dtype=torch.float32)
    target, mask = data.images(index), data.mask(index)
    levels, names = {}, {}
    for p in (precision, compare) if compare else (precision,):
        generators = [torch.Generator().manual_seed(k) for k in range(len(index))]
        start = time.perf_counter()
        out = sample_frames(model, target, mask, data.images(data.previous[index]), data.images(identity),
                            data.audio(index), sampler=sampler, steps=steps, generator=generators,
                            precision=p)  # fmt: skip
        seconds = time.perf_counter() - start
        levels[p] = ((out.clamp(-1, 1) + 1) * 127.5).round()
        errors = masked_error(out, target, mask).cpu().numpy()
        names[p] = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[resolve_precision(device, p)]
        print(f"{model_path}: {sampler} {steps} steps, {frames} held-out frames x {draws} draws, {names[p]}, "
              f"{seconds:.0f} s on {device}")  # fmt: skip
        for d in range(draws):
            print(f"draw {d}: " + " ".join(f"{e:.4f}" for e in errors[d * frames : (d + 1) * frames]))
        noisy = int((errors > NOISY).sum())
        print(f"noisy mouths (masked error > {NOISY}): {noisy} of {len(errors)}; median error {np.median(errors):.4f}")
    if compare:
        inside = mask.expand_as(levels[precision]).bool()
        diff = (levels[precision] - levels[compare])[inside].abs().double()
        psnr = 10 * np.log10(255**2 / max(float((diff**2).mean()), 1e-12))
        print(f"{names[precision]} against {names[compare]} inside the mask: max {diff.max():.0f} levels, "
              f"mean {diff.mean():.3f}, PSNR {psnr:.1f} dB")  # fmt: skip


def _pack_path(work: Path) -> Path:
    """The pack to read the held-out clips from: WORK/held.pack where there is one (`pack --held-out-only`; it
    decodes in seconds, the whole pack in about a minute), else WORK/grid-s1.pack."""
    held = work / "held.pack"
    return held if held.exists() else work / "grid-s1.pack"


# -- dubs: on the GPU, from the pack alone ------------------------------------------------------------------------

CASES = ("own", "other", "random")  # trained model with its own speech, with the next held-out clip's; random weights
JPEG_QUALITY = 95


def held_out_clips(pack, work: Path) -> list[int]:
    """The pack's indices of the held-out clips (WORK/held-out.txt), in that file's order."""
    names = (work / "held-out.txt").read_text().split()
    index = {Path(c.name).stem: i for i, c in enumerate(pack.clips)}
    return [index[n] for n in names]


def held_out_frames(pack, clips: list[int], speech_of: list[int], limit: int | None = None):
    """The stored frames of `clips` (the first `limit` of each) laid end to end, each clip its own track, with the
    audio windows of clip `speech_of[i]` on the timeline of clip i.
    Returns (pack indices (N,), track (N,), windows (N, 4, 256))."""
    from talkedit.audio import frame_windows

    index, track, windows = [], [], []
    for i, (c, s) in enumerate(zip(clips, speech_of, strict=True)):
        rows = np.flatnonzero(pack.clip == c)
        rows = rows[np.argsort(pack.frame[rows])][:limit]
        info = pack.clips[c]
        index.append(rows)
        track.append(np.full(len(rows), i))
        windows.append(frame_windows(pack.mels[s], info.frames, info.fps)[pack.frame[rows]])
    return np.concatenate(index), np.concatenate(track), np.concatenate(windows)


def dub_held_out(model, pack, clips, speech_of, *, limit=None, steps=None, precision="auto", seed=0,
                 chain_seconds=None, overlap=None, with_chains=False, batch=None, label=None):  # fmt: skip
    """Generate the stored frames of `clips` as `dub` would, up to `batch` chains per UNet call (default all of
    them; each clip its own shot; `chain_seconds` and `overlap` as dub's options, default dub's). Each chain draws
    its noise from its own seed, so `batch` changes the speed and the frames at most by rounding. With `label`,
    prints progress every 10 %.
    Returns (N, 128, 128, 3) uint8 in the order of `held_out_frames`, and with `with_chains` also the chain plan."""
    import time

    from talkedit.generate import generate_chains, plan_chains

    rows, track, windows = held_out_frames(pack, clips, speech_of, limit)
    src = np.arange(len(rows))
    chains = plan_chains(src, track, windows.mean(axis=(1, 2)), 25.0, chain_seconds, overlap)
    out = np.zeros((len(rows), 128, 128, 3), np.uint8)
    start, shown = time.perf_counter(), [0]

    def progress(_stage: str, done: int, total: int) -> None:
        if label and done * 10 // total > shown[0]:
            shown[0] = done * 10 // total
            print(f"{label}: {done}/{total} frames, {time.perf_counter() - start:.0f} s", flush=True)

    generate_chains(model, pack.crops[rows], pack.masks[rows], src, windows, chains, batch or len(chains), out,
                    steps=steps, precision=precision, seed=seed, progress=progress)  # fmt: skip
    return (out, chains) if with_chains else out


def mask_box(masks: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the union of `masks` (N, 128, 128)."""
    rows, cols = np.flatnonzero(masks.any(axis=(0, 2))), np.flatnonzero(masks.any(axis=(0, 1)))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def save_crops(path: Path, crops: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """The `box` of each crop as JPEG, in one safetensors file (outside the masks a crop is the pack's own).

    Quality JPEG_QUALITY, lowered where the file would not come back from the GPU machine (over PART_BYTES): the
    random-weight model's noisy mouths compress badly."""
    import cv2
    from safetensors.numpy import save_file

    top, bottom, left, right = box
    for quality in (JPEG_QUALITY, 85, 75, 60, 45, 30):
        blobs = [cv2.imencode(".jpg", c[top:bottom, left:right, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
                 for c in crops]  # fmt: skip
        if sum(len(b) for b in blobs) < PART_BYTES:
            break
    if quality != JPEG_QUALITY:
        print(f"{path.name}: JPEG quality {quality} to stay under {PART_BYTES / 2**20:.0f} MiB", flush=True)
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    metadata = {"box": json.dumps(box), "quality": str(quality)}
    save_file({"jpeg": np.concatenate(blobs).ravel(), "offsets": offsets}, str(path), metadata)


def load_crops(path: Path, base: np.ndarray) -> np.ndarray:
    """The crops saved by `save_crops`, pasted into `base` (N, 128, 128, 3): the pack's crops of the same frames."""
    import cv2
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        top, bottom, left, right = json.loads(f.metadata()["box"])
        jpeg, offsets = f.get_tensor("jpeg"), f.get_tensor("offsets")
    out = base.copy()
    for n in range(len(base)):
        out[n, top:bottom, left:right] = cv2.imdecode(jpeg[offsets[n] : offsets[n + 1]], cv2.IMREAD_COLOR)[:, :, ::-1]
    return out


def dubs(work: Path, model_path: Path, out: Path, steps: int | None, random_steps: int, count: int | None,
         batch: int | None = None, piece: int | None = None) -> None:  # fmt: skip
    """Dub the held-out clips (see CASES) into OUT/CASE.safetensors, up to `batch` chains per UNet call (default
    all), and on CUDA compare fp16 with fp32 sampling on the first 10 frames of 8 held-out clips (OUT/dubs.json,
    with the timings).

    `piece` clips at a time (default all), own and other speech together: each piece is kept in OUT/pieces-MODEL-STEPS-N
    as it is done, and a second call skips the pieces there, so a CPU run of hours can stop and go on. A chain's
    noise is seeded by its place in the call, so pieces draw other noise than one call would: other frames, as good.
    `random_steps` 0 leaves out the random weights (`eval --dubs-only` does not use them)."""
    import hashlib
    import time

    import torch

    from talkedit.diffusion import sampling_model
    from talkedit.pack import read_pack
    from talkedit.unet import UNet
    from talkedit.weights import build_model, read_weights

    out.mkdir(parents=True, exist_ok=True)
    pack = read_pack(_pack_path(work))
    clips = held_out_clips(pack, work)[:count]
    partner = clips[1:] + clips[:1]
    rows, _, _ = held_out_frames(pack, clips, clips)
    box = mask_box(pack.masks[rows])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # fp32 weights (channels-last on a CPU, as dub); each dub's autocast is its own precision
    trained = sampling_model(build_model(read_weights(model_path)), device, "fp32")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "frames": len(rows),
              "steps": steps or trained.diffusion.steps, "random_steps": random_steps, "batch": batch}  # fmt: skip

    def timed(name: str, *args, **kwargs) -> np.ndarray:
        t = time.perf_counter()
        crops = dub_held_out(*args, **kwargs, batch=batch, label=name)
        report[f"{name}_seconds"] = time.perf_counter() - t
        print(f"{name}: {len(crops)} frames in {report[f'{name}_seconds']:.1f} s", flush=True)
        return crops

    # Own and other speech in the same UNet calls: the own half is what a run of its own gives (seeds are per chain).
    # pieces of another model, number of steps or of clips (the last clip's partner is the first) are not reused
    key, n = hashlib.sha256(model_path.read_bytes()).hexdigest()[:12], len(clips)
    pieces, own, other, seconds = out / f"pieces-{key}-{report['steps']}-{n}", [], [], 0.0
    pieces.mkdir(exist_ok=True)
    piece = piece or n
    for start in range(0, n, piece):
        stop = min(start + piece, n)
        part, done = clips[start:stop], pieces / f"own+other-{start}-{stop}.npz"
        if not done.exists():
            both = timed("own+other", trained, pack, part + part, part + partner[start:stop], steps=steps)
            partial = done.with_suffix(".tmp.npz")
            np.savez(partial, crops=both, seconds=report["own+other_seconds"])
            partial.rename(done)  # a piece is there whole or not at all
        with np.load(done) as saved:
            both, seconds = saved["crops"], seconds + float(saved["seconds"])
        own.append(both[: len(both) // 2])
        other.append(both[len(both) // 2 :])
    report["own+other_seconds"] = seconds
    save_crops(out / "own.safetensors", np.concatenate(own), box)
    save_crops(out / "other.safetensors", np.concatenate(other), box)
    if random_steps:
        torch.manual_seed(0)
        random = sampling_model(UNet(trained.config).eval(), device, "fp32")
        random.diffusion = trained.diffusion
        save_crops(out / "random.safetensors", timed("random", random, pack, clips, clips, steps=random_steps), box)
    if device.type == "cuda":
        half_, full = (timed(precision, trained, pack, clips[:8], clips[:8], limit=10, steps=steps,
                             precision=precision) for precision in ("fp16", "fp32"))  # fmt: skip
        diff = np.abs(full.astype(np.int16) - half_.astype(np.int16))
        mse = np.mean(diff.astype(np.float64) ** 2)
        report["fp16_vs_fp32"] = {"frames": len(full), "max_levels": int(diff.max()),
                                  "mean_levels": float(diff.mean()),
                                  "psnr_db": float(10 * np.log10(255**2 / mse)) if mse > 0 else None}  # fmt: skip
    (out / "dubs.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report), flush=True)


# -- chains: how visible chain restarts are, against chain length and overlap (GPU, from the pack alone) ----------

CHAIN_SETTINGS = ("3:0", "1:0", "1:3", "0.5:0", "0.5:3")  # chain seconds:overlap frames; 3 s = one chain per clip


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def chain_study(work: Path, model_path: Path, out: Path, steps: int, count: int, settings: list[str],
                batch: int | None = None) -> None:  # fmt: skip
    """Dub the first `count` held-out clips (3 s each) with their own speech once per setting (chain seconds and
    crossfade overlap, as dub's --chain-seconds and --overlap), and measure on the crops the chain jump (the mouth's
    change where a chain takes over against its change elsewhere, as `talkedit eval` does), the change itself at
    starts and elsewhere, the mask PSNR against the original and the time, up to `batch` chains per UNet call (default
    all of them). Prints a table; writes OUT/chains.json."""
    import time

    import torch

    from talkedit.diffusion import sampling_model
    from talkedit.generate import chain_jump, mouth_change
    from talkedit.pack import read_pack
    from talkedit.weights import build_model, read_weights

    out.mkdir(parents=True, exist_ok=True)
    pack = read_pack(_pack_path(work))
    clips = held_out_clips(pack, work)[:count]
    rows, track, _ = held_out_frames(pack, clips, clips)
    masks = pack.masks[rows].astype(bool)
    original = pack.crops[rows]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = sampling_model(build_model(read_weights(model_path)), device, "fp32")  # channels-last on a CPU, as dub
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "model": str(model_path),
              "clips": len(clips), "frames": len(rows), "steps": steps, "batch": batch, "settings": []}  # fmt: skip
    print("| chain s | overlap | chains | jump | change at starts | change elsewhere | mask PSNR (dB) | s/frame |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in settings:
        seconds, overlap = float(setting.split(":")[0]), int(setting.split(":")[1])
        t = time.perf_counter()
        crops, chains = dub_held_out(model, pack, clips, clips, steps=steps, chain_seconds=seconds, overlap=overlap,
                                     with_chains=True, batch=batch)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        change = mouth_change(crops, masks, np.ones(len(rows), bool))
        change[np.flatnonzero(np.diff(track, prepend=-1))] = np.nan  # a clip's first frame follows another clip
        splits = [c for c in chains if c.start > 0 and track[c.start - 1] == track[c.start]]  # not a clip's first
        starts = [j for c in splits for j in c.frames[: c.lead + 1]]
        inside = np.setdiff1d(np.flatnonzero(np.isfinite(change)), starts)
        error = (crops.astype(np.float64) - original)[masks]
        row = {"chain_seconds": seconds, "overlap": overlap, "chains": len(chains), "jump": chain_jump(change, starts),
               "change_at_starts": float(np.nanmean(change[starts])) if starts else None,
               "change_elsewhere": float(np.mean(change[inside])),
               "mask_psnr": float(10 * np.log10(255**2 / np.mean(error**2))), "seconds": elapsed,
               "seconds_per_frame": elapsed / len(rows)}  # fmt: skip
        report["settings"].append(row)
        print(f"| {seconds:g} | {overlap} | {len(chains)} | {_fmt(row['jump'])} | {_fmt(row['change_at_starts'])} | "
              f"{row['change_elsewhere']:.2f} | {row['mask_psnr']:.1f} | {row['seconds_per_frame']:.4f} |",
              flush=True)  # fmt: skip
    (out / "chains.json").write_text(json.dumps(report, indent=1))


# -- eval: on a CPU with the full install --------------------------------------------------------------------------

GROUP = 5  # held-out clips per evaluated video: 15 s, long enough for the sync measure (3 s is not)
ROWS = {  # table rows: (video, speech) for each group
    "original": ("original", "own"),
    "original, other speech": ("original", "other"),
    "frozen mouth": ("frozen", "own"),
    "random weights": ("random", "own"),
    "dub": ("own", "own"),
    "dub, other speech": ("other", "other"),
}


def evaluate_held_out(work: Path, group: int = GROUP, count: int | None = None, dubs_only: bool = False) -> None:
    """Paste the dubbed crops back into the held-out clips, 5 clips to a video, and score every row of ROWS with
    `talkedit eval` against the original. Writes WORK/eval.json, WORK/eval.md (the README table) and
    WORK/strip.png (lower halves of held-out crops: original, dub, dub with other speech, random weights).
    `dubs_only`: only the two dub rows, for a second model of the same clips (the baselines do not depend on it)."""
    import tempfile

    from rich.progress import Progress

    from talkedit.analysis import preprocess
    from talkedit.audio import SAMPLE_RATE
    from talkedit.evaluate import evaluate
    from talkedit.face import paste_face_yuv
    from talkedit.holdout import CUT_CRF, _pad, write_wav
    from talkedit.media import VideoWriter, decode_speech, iter_yuv_frames, read_audio, write_image
    from talkedit.pack import read_pack

    pack = read_pack(_pack_path(work))
    clips = held_out_clips(pack, work)[:count]
    rows, _, _ = held_out_frames(pack, clips, clips)
    base = pack.crops[rows]
    rows_wanted = {name: row for name, row in ROWS.items() if not dubs_only or row[0] in ("own", "other")}
    kinds = ["original", *dict.fromkeys(video for video, _ in rows_wanted.values() if video != "original")]
    crops = {"original": base, "frozen": base}  # frozen: pasted from each clip's first frame below
    crops |= {case: load_crops(work / "dubs" / f"{case}.safetensors", base) for case in CASES if case in kinds}
    paths = {Path(line).stem: work / line for line in (work / "order.txt").read_text().split()}
    offsets = np.cumsum([0] + [int(np.sum(pack.clip[rows] == c)) for c in clips])  # rows are clip by clip

    results: dict[str, list] = {name: [] for name in rows_wanted}
    with tempfile.TemporaryDirectory(prefix="grid-eval-") as scratch, Progress() as bar:
        scratch = Path(scratch)
        task = bar.add_task("held-out groups", total=len(clips) // group)
        videos_in = [paths[Path(pack.clips[c].name).stem] for c in clips]
        analyses = [preprocess(video, offline=True) for video in videos_in]
        wavs = [read_audio(decode_speech(video, scratch / f"{i}.wav")) for i, video in enumerate(videos_in)]
        for g in range(len(clips) // group):
            members = list(range(g * group, (g + 1) * group))

            def speech(kind: str, g: int = g, members: list[int] = members) -> Path:
                """The group's speech: its clips' own, or each clip's next held-out clip's, cut to its length."""
                parts = []
                for i in members:
                    length = round(analyses[i].frame_count / float(analyses[i].video.fps) * SAMPLE_RATE)
                    wav = wavs[i] if kind == "own" else wavs[(i + 1) % len(clips)]
                    parts.append(_pad(wav, length))
                return write_wav(scratch / f"g{g}-{kind}.wav", np.concatenate(parts), SAMPLE_RATE)

            speeches = {kind: speech(kind) for kind in ("own", "other")}
            videos = {}
            for kind in kinds:
                info = analyses[members[0]].video
                output = scratch / f"g{g}-{kind}.mp4"
                with VideoWriter(output, info.width, info.height, info.fps, audio=speeches["own"], crf=CUT_CRF,
                                 colour=info.colour, sar=info.sar) as writer:  # fmt: skip
                    for i in members:
                        analysis, stored = analyses[i], np.flatnonzero(analyses[i].tracked)
                        row_of = dict(zip(stored.tolist(), range(offsets[i], offsets[i + 1]), strict=True))
                        for f, frame in enumerate(iter_yuv_frames(analysis.video)):
                            if f >= analysis.frame_count:
                                break
                            if kind != "original" and f in row_of:
                                crop = crops[kind][offsets[i] if kind == "frozen" else row_of[f]]
                                frame = paste_face_yuv(frame, crop, analysis.masks[f], analysis.matrices[f],
                                                       analysis.video.matrix, analysis.video.full_range)  # fmt: skip
                            writer.write(frame)
                    writer.close()
                videos[kind] = output
            for name, (kind, speech_kind) in rows_wanted.items():
                e = evaluate(videos[kind], speeches[speech_kind], videos["original"], chain_starts=[], offline=True)
                results[name].append({
                    "offset": e.sync.offset if e.sync else None,
                    "confidence": e.sync.confidence if e.sync else None,
                    "psnr": e.reference.psnr if e.reference else None,
                    "ssim": e.reference.ssim if e.reference else None,
                    "lmd": e.reference.lmd if e.reference else None,
                    "motion": e.mouth_motion,
                    "flags": e.flags,
                })  # fmt: skip
            bar.advance(task)

    (work / "eval.json").write_text(json.dumps(results, indent=1))
    (work / "eval.md").write_text(table(results, work))
    print(table(results, work))
    picks = [(i, 40) for i in range(0, len(clips), max(1, len(clips) // 8))][:8]
    strip = [np.concatenate([crops[kind][offsets[i] + f][64:] for i, f in picks], axis=1)
             for kind in ("original", "own", "other", "random") if kind in crops]  # fmt: skip
    write_image(work / "strip.png", np.concatenate(strip, axis=0))


def flag_counts(group: list[dict]) -> str:
    """How many groups raised each flag, e.g. "frozen mouth 10, weak sync 3"."""
    from collections import Counter

    counts = Counter(flag.split(":")[0] for r in group for flag in r["flags"])
    return ", ".join(f"{flag} {n}" for flag, n in counts.most_common()) or "none"


def table(results: dict[str, list], work: Path) -> str:
    """The README table: means over the held-out groups."""

    def mean(name: str, key: str) -> float:
        values = [r[key] for r in results[name] if r[key] is not None and np.isfinite(r[key])]
        return float(np.mean(values)) if values else float("nan")

    header = "| case | sync conf | \\|offset\\| (frames) | PSNR (dB) | SSIM | LMD (px) | motion (px) | flags (groups) |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for name, group in results.items():
        offsets = [abs(r["offset"]) for r in group if r["offset"] is not None]
        psnr = mean(name, "psnr")
        lines.append(
            f"| {name} | {mean(name, 'confidence'):.2f} | {np.mean(offsets) if offsets else float('nan'):.1f} | "
            f"{'inf' if name.startswith('original') else f'{psnr:.1f}'} | {mean(name, 'ssim'):.3f} | "
            f"{mean(name, 'lmd'):.2f} | {mean(name, 'motion'):.2f} | {flag_counts(group)} |"
        )
    runs = [work / run / "metrics.jsonl" for run in ("train-v", "train")]  # the v run (the default), else eps
    metrics = next((m for m in runs if m.is_file()), runs[0])
    if metrics.is_file():
        evals = [json.loads(line) for line in metrics.read_text().splitlines() if "audio_ratio" in line]
        if evals:
            last = evals[-1]
            lines.append(f"\nTraining's last validation (step {last['step']}): masked error {last['val_error']:.4f}, "
                         f"audio-shift ratio {last['audio_ratio']:.3f}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("grid-s1"))
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("source", type=Path, help="GRID s1's folder of .mpg clips (data/s1 of TVR28/LipNet)")
    p = sub.add_parser("prepare-others")
    p.add_argument("source", type=Path, help="evaluation/samples of rizkiarm/LipNet")
    p = sub.add_parser("pack")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--held-out-only", action="store_true", help="only the 50 held-out clips, into WORK/held.pack")
    p = sub.add_parser("train")
    p.add_argument("--minutes", type=float, help="a new run: the training time to plan --steps for")
    p.add_argument("--time-limit", type=float, default=9.0, help="stop at a checkpoint before this (minutes)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--arch", default="dve", help="dve (the paper's UNet) or small (to try the stage on a CPU)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--prediction", choices=["eps", "v"], default="v", help="v: the reference model's; eps: the paper's")
    p = sub.add_parser("half")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("join")
    p.add_argument("parts", type=Path, nargs="+")
    p.add_argument("-o", "--output", type=Path, required=True)
    p = sub.add_parser("eval")
    p.add_argument("--group", type=int, default=GROUP, help="held-out clips per evaluated video")
    p.add_argument("--clips", type=int, help="only the first N held-out clips (as dubbed)")
    p.add_argument("--dubs-only", action="store_true", help="only the two dub rows (e.g. of a control model)")
    p = sub.add_parser("sampled")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--frames", type=int, default=6, help="held-out frames, evenly spread")
    p.add_argument("--draws", type=int, default=2, help="samples of each frame, each from its own noise")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help="as dub's (default auto)")
    p.add_argument("--compare", choices=PRECISION_CHOICES, help="also sample in this precision and compare")
    p = sub.add_parser("dubs")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, help="where the dubbed crops go (default: WORK/dubs)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--random-steps", type=int, default=25, help="sampling steps of the random-weight model")
    p.add_argument("--clips", type=int, help="only the first N held-out clips (all 50 by default)")
    p.add_argument("--batch", type=int, help="chains per UNet call (default all: a GPU); 2 is fastest on a CPU")
    p.add_argument("--piece", type=int, help="clips per piece, each kept as it is done (a CPU run that can resume)")
    p = sub.add_parser("chains")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, help="where chains.json goes (default: WORK/dubs)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--clips", type=int, default=20, help="the first N held-out clips")
    p.add_argument("--settings", nargs="+", default=list(CHAIN_SETTINGS), help="chain seconds:overlap frames")
    p.add_argument("--batch", type=int, help="chains per UNet call (default all: a GPU); 2 is fastest on a CPU")
    args = parser.parse_args()
    if args.stage == "prepare":
        prepare(args.source, args.work)
    elif args.stage == "prepare-others":
        prepare_others(args.source, args.work)
    elif args.stage == "pack":
        pack(args.work, args.processes, args.held_out_only)
    elif args.stage == "train":
        if not args.resume and not args.minutes:
            parser.error("a new run needs --minutes")
        train(args.work, args.minutes, args.time_limit, args.resume, args.eval_every, arch=args.arch,
              batch=args.batch, probe_steps=args.probe_steps, prediction=args.prediction)  # fmt: skip
    elif args.stage == "sampled":
        sampled(args.work, args.model, args.frames, args.draws, args.steps, args.sampler, args.precision, args.compare)
    elif args.stage == "half":
        half(args.model, args.out)
    elif args.stage == "join":
        join(args.parts, args.output)
    elif args.stage == "eval":
        evaluate_held_out(args.work, args.group, args.clips, args.dubs_only)
    elif args.stage == "dubs":
        out = args.out or args.work / "dubs"
        dubs(args.work, args.model, out, args.steps, args.random_steps, args.clips, args.batch, args.piece)
    elif args.stage == "chains":
        out = args.out or args.work / "dubs"
        chain_study(args.work, args.model, out, args.steps, args.clips, args.settings, args.batch)


if __name__ == "__main__":
    main()
