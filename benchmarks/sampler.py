"""Frame-sampler benchmark: the paper's settings against talkedit's defaults, in one run.

    python benchmarks/sampler.py                      # CUDA when present, else CPU with a few frames
    python benchmarks/sampler.py --device cpu --frames 1
    python benchmarks/sampler.py --compile reduce-overhead --channels-last   # CUDA graphs through torch.compile

Uses the full-size UNet (the official multi-speaker config) with random weights: speed does not depend on the values.
Each setting runs in its own process, so peak memory (CUDA: max allocated; CPU: peak RSS) is that setting's alone.
Prints seconds per generated frame, peak memory, and the speed-up of the defaults over the paper's settings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_setting(setting: dict) -> dict:
    """Sample `frames` frames with one setting; returns timings and peak memory."""
    import torch

    from talkedit.diffusion import DiffusionConfig, sample_frames
    from talkedit.unet import UNet, UNetConfig

    device = torch.device(setting["device"])
    torch.manual_seed(0)
    model = UNet(UNetConfig()).eval().to(device)
    model.diffusion = DiffusionConfig()
    if setting["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if setting["compile"] != "none":
        compiled = torch.compile(model, mode=None if setting["compile"] == "default" else setting["compile"])
        compiled.diffusion = model.diffusion
        model = compiled

    batch, size = setting["batch"], 128
    g = torch.Generator().manual_seed(0)
    y0 = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, 64:, 30:98] = 1
    context = [torch.rand(batch, 3, size, size, generator=g) * 2 - 1 for _ in range(2)]
    audio = torch.rand(batch, 1024, generator=g) * -80

    def sample(steps: int) -> torch.Tensor:
        return sample_frames(
            model, y0, mask, *context, audio,
            sampler=setting["sampler"], steps=steps, eta=0.0, fp16=setting["fp16"], generator=g,
        )  # fmt: skip

    sample(setting["warmup_steps"])  # kernels, autotuning, compilation
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rounds = max(1, setting["frames"] // batch)
    start = time.perf_counter()
    for _ in range(rounds):
        sample(setting["steps"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    seconds = time.perf_counter() - start
    return {**setting, "frames_done": rounds * batch, "seconds": seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--frames", type=int, default=None, help="frames per setting (default: 16 on CUDA, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the defaults (default 50)")
    parser.add_argument("--batch", type=int, default=None, help="chains per UNet call (default: 16 on CUDA, 2 on CPU)")
    parser.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_setting(json.loads(args.worker))))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    batch = args.batch or (16 if cuda else 2)
    frames = args.frames or (16 if cuda else 2)
    common = {"device": device, "compile": args.compile, "channels_last": args.channels_last, "warmup_steps": 2}
    settings = [
        # The paper: ancestral DDPM over the 100-step schedule, one frame per UNet call, fp32.
        {**common, "name": "official", "sampler": "ddpm", "steps": 100, "batch": 1, "fp16": False,
         "frames": max(1, frames // batch)},
        # talkedit: DDIM, B independent chains per UNet call, fp16 autocast on CUDA.
        {**common, "name": "talkedit", "sampler": "ddim", "steps": args.steps, "batch": batch, "fp16": cuda,
         "frames": frames},
    ]  # fmt: skip

    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; compile {args.compile}; channels_last {args.channels_last}")  # fmt: skip
    header = f"{'setting':<10} {'sampler':<7} {'steps':>5} {'batch':>5} {'precision':<9} {'frames':>6} "
    print(header + f"{'s/frame':>9} {'peak MiB':>9}")
    results = []
    for setting in settings:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(setting)], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            sys.exit(f"{setting['name']} failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["s_per_frame"] = r["seconds"] / r["frames_done"]
        results.append(r)
        precision = "fp16" if r["fp16"] else "fp32"
        print(
            f"{r['name']:<10} {r['sampler']:<7} {r['steps']:>5} {r['batch']:>5} {precision:<9} {r['frames_done']:>6} "
            f"{r['s_per_frame']:>9.3f} {r['peak_mib']:>9.0f}"
        )
    official, ours = results
    speedup = official["s_per_frame"] / ours["s_per_frame"]
    print(f"speed-up of talkedit defaults over the official settings: {speedup:.1f}x")


if __name__ == "__main__":
    main()
