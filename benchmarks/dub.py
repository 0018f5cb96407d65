"""End-to-end dub benchmark on a 60 s 1080p clip: seconds per stage, the stage that bounds it, and peak memory.

    python benchmarks/dub.py                       # tiny random model, 2 steps: measures everything but the UNet
    python benchmarks/dub.py --model full --steps 50   # the full-size UNet (random weights), for a GPU
    python benchmarks/dub.py --speech-seconds 120      # speech twice the video's length: --fit pingpong
    python benchmarks/dub.py --model full --steps 50 --cuda-graphs yes   # the UNet replayed from CUDA graphs
    python benchmarks/dub.py --seconds 20 --analysis-workers 1   # the analysis in one thread (dub: one per core)

The clip is made from a real one in ../shared/media (the restaurant clip, upscaled to 1920x1080 and looped to 60 s),
the speech by looping a real recording to the same length. Needs ../shared/models/face_landmarker.task.
The dub runs in a child process; its peak RSS is reported (ffmpeg's decoder and encoder processes are not included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SOURCE_VIDEO = SHARED / "media/video/male_restaurant_noisy_headmotion_1280x720_25fps.mp4"
SOURCE_SPEECH = SHARED / "media/audio/en_male_jfk_speech_44k1_stereo_24bit.flac"


def make_inputs(folder: Path, seconds: int, speech_seconds: int) -> tuple[Path, Path]:
    from talkedit.media import ffmpeg_exe

    video, speech = folder / "clip-1080p.mp4", folder / "speech.wav"
    ff = [ffmpeg_exe(), "-v", "error", "-y"]
    subprocess.run(
        [*ff, "-stream_loop", "-1", "-i", str(SOURCE_VIDEO), "-t", str(seconds), "-vf", "scale=1920:1080",
         "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-an", str(video)],
        check=True,
    )  # fmt: skip
    subprocess.run(
        [*ff, "-stream_loop", "-1", "-i", str(SOURCE_SPEECH), "-t", str(speech_seconds), str(speech)], check=True
    )
    return video, speech


def make_model(folder: Path, kind: str) -> Path:
    import torch

    from talkedit.diffusion import DiffusionConfig
    from talkedit.unet import UNet, UNetConfig
    from talkedit.weights import save_weights

    config = (
        UNetConfig()
        if kind == "full"
        else UNetConfig(base_channels=32, channel_mults=(1, 1, 1, 1), attention_resolutions=(), head_channels=32)
    )
    torch.manual_seed(0)
    path = folder / f"{kind}.safetensors"
    save_weights(path, UNet(config).state_dict(), config, DiffusionConfig(), {"source": "random, benchmark"})
    return path


def worker(args: argparse.Namespace) -> None:
    from talkedit import analysis, pipeline
    from talkedit.pipeline import DubOptions, dub

    pipeline.WRITE_BESIDE_GENERATION = args.write_beside == "yes"
    pipeline.CUDA_GRAPHS = args.cuda_graphs == "yes"
    if args.analysis_workers is not None:
        analysis.MAX_WORKERS = args.analysis_workers

    peak_by_stage: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        peak_by_stage[stage] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    options = DubOptions(model=args.model_path, steps=args.steps, device=args.device, batch=args.batch,
                         chain_seconds=args.chain_seconds, overlap=args.overlap)  # fmt: skip
    start = time.perf_counter()
    result = dub(args.video, args.speech, args.output, options, progress=progress)
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - start,
                "stages": result.stage_seconds,
                "frames": result.frames_written,
                "generated": result.frames_generated,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_rss_by_stage_mib": peak_by_stage,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--speech-seconds", type=int, default=None, help="longer than --seconds: a pingpong dub")
    parser.add_argument("--model", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--chain-seconds", type=float, default=None, help="dub's --chain-seconds (default 5)")
    parser.add_argument("--overlap", type=int, default=None, help="dub's --overlap")
    parser.add_argument("--write-beside", choices=["yes", "no"], default="yes",
                        help="write the video while the mouths are generated (yes, as dub does) or after")  # fmt: skip
    parser.add_argument("--cuda-graphs", choices=["yes", "no"], default="no",
                        help="on CUDA, replay the UNet from CUDA graphs (talkedit.cudagraph; dub: off)")  # fmt: skip
    parser.add_argument("--analysis-workers", type=int, default=None,
                        help="threads analysing parts of the video (dub: one per core, at most 8)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    for hidden in ("--worker", "--video", "--speech", "--output", "--model-path"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    folder = Path(tempfile.mkdtemp(prefix="talkedit-bench-"))
    home = folder / "home"
    home.mkdir()
    shutil.copy(SHARED / "models/face_landmarker.task", home / "face-landmarker.task")
    t = time.perf_counter()
    video, speech = make_inputs(folder, args.seconds, args.speech_seconds or args.seconds)
    model = make_model(folder, args.model)
    speech_seconds = args.speech_seconds or args.seconds
    made = time.perf_counter() - t
    print(f"inputs: {args.seconds} s 1920x1080 clip + {speech_seconds} s speech made in {made:.1f} s ({folder})")
    cmd = [sys.executable, __file__, "--worker", "1", "--video", str(video), "--speech", str(speech),
           "--output", str(folder / "out.mp4"), "--model-path", str(model), "--steps", str(args.steps)]  # fmt: skip
    if args.device:
        cmd += ["--device", args.device]
    cmd += ["--write-beside", args.write_beside, "--cuda-graphs", args.cuda_graphs]
    for option in ("batch", "chain_seconds", "overlap", "analysis_workers"):
        if getattr(args, option) is not None:
            cmd += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TALKEDIT_HOME": str(home)})
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"model {args.model}, {args.steps} steps; {r['frames']} frames written, {r['generated']} generated")
    for stage, seconds in r["stages"].items():
        print(f"  {stage:<13} {seconds:8.1f} s")
    print(f"  total         {r['seconds']:8.1f} s  ({r['seconds'] / speech_seconds:.2f} s per second of video)")
    stages = r["stages"]  # generate and write run side by side: the busier of the two bounds that part
    busy = stages["write"] - stages["write waiting"]
    bound = "the generation (the UNet)" if stages["generate"] >= busy else "the writing (decode, paste, encode)"
    print(f"generate and write overlap: generating took {stages['generate']:.1f} s, the writer was busy {busy:.1f} s "
          f"(and waited {stages['write waiting']:.1f} s for crops); bound by {bound}")  # fmt: skip
    print(f"peak RSS of the dub process: {r['peak_rss_mib']:.0f} MiB (by stage: "
          + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_by_stage_mib"].items()) + ")")  # fmt: skip
    print("peak RSS under 2 GiB:", "yes" if r["peak_rss_mib"] < 2048 else "NO")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
