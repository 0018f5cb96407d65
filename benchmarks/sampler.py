"""Frame-sampler benchmark: the paper's settings against talkedit's defaults, in one run.

    python benchmarks/sampler.py                      # CUDA when present, else CPU with a few frames
    python benchmarks/sampler.py --device cpu --frames 1
    python benchmarks/sampler.py --precision fp32     # talkedit's setting in fp32 (default: auto, as dub)
    python benchmarks/sampler.py --compile reduce-overhead --channels-last   # CUDA graphs through torch.compile
    python benchmarks/sampler.py --cuda-graphs        # CUDA graphs captured by talkedit (what dub would use)
    python benchmarks/sampler.py --profile 5          # also: where the defaults' time goes (torch.profiler)

Uses the full-size UNet (the official multi-speaker config) with random weights: speed does not depend on the values.
Each setting runs in its own process, so peak memory (CUDA: max allocated; CPU: peak RSS) is that setting's alone.
Prints seconds per generated frame, peak memory, the UNet's achieved TFLOP/s (its FLOPs counted once, on the CPU),
and the speed-up of the defaults over the paper's settings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def unet_flops() -> float:
    """FLOPs of one UNet call on one frame (official config), counted on the CPU (about a second)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from talkedit.unet import UNet, UNetConfig

    model = UNet(UNetConfig()).eval()
    inputs = torch.zeros(1, 9, 128, 128), torch.full((1,), 0.5), torch.zeros(1, 1024)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(*inputs)
    return float(counter.get_total_flops())


def profile_table(sample, steps: int, cuda: bool) -> str:
    """torch.profiler over `steps` sampling steps: the 25 operators that take the most (device) time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        sample(steps)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25)


def accelerate(model, setting: dict):
    """`model` under torch.compile (--compile) or replayed from talkedit's CUDA graphs (--cuda-graphs)."""
    import torch

    from talkedit.cudagraph import GraphedUNet

    if setting["compile"] != "none":
        compiled = torch.compile(model, mode=None if setting["compile"] == "default" else setting["compile"])
        compiled.diffusion = model.diffusion
        model = compiled
    if setting.get("cuda_graphs"):
        model = GraphedUNet(model)
    return model


def run_setting(setting: dict) -> dict:
    """Sample `frames` frames with one setting; returns timings and peak memory."""
    import torch

    from talkedit.diffusion import DiffusionConfig, resolve_precision, sample_frames, sampling_model
    from talkedit.unet import UNet, UNetConfig

    device = torch.device(setting["device"])
    torch.manual_seed(0)
    model = UNet(UNetConfig()).eval()
    if setting["name"] == "official":
        model = model.to(device)  # fp32, the default layout
    else:  # as `dub` loads it: on CUDA, half weights when sampling in half precision; channels-last on a CPU
        model = sampling_model(model, device, setting["precision"])
    model.diffusion = DiffusionConfig()
    if setting["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model = accelerate(model, setting)

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
            sampler=setting["sampler"], steps=steps, eta=0.0 if setting["sampler"] == "ddim" else None,
            precision=setting["precision"], generator=g,
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
    profile = profile_table(sample, setting["profile"], device.type == "cuda") if setting.get("profile") else None
    dtype = resolve_precision(device, setting["precision"])
    return {**setting, "frames_done": rounds * batch, "seconds": seconds, "peak_mib": peak, "profile": profile,
            "dtype": {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]}  # fmt: skip


def run_shot(setting: dict) -> dict:
    """The generate stage of `dub` on one shot of `seconds` at 25 fps: chains planned as `dub` plans them (of about
    `chain_seconds`), up to `batch` per UNet call. Random crops: speed does not depend on the pixels."""
    import numpy as np
    import torch

    from talkedit.diffusion import DiffusionConfig
    from talkedit.generate import generate_chains, plan_chains
    from talkedit.unet import UNet, UNetConfig

    device = torch.device(setting["device"])
    torch.manual_seed(0)
    model = UNet(UNetConfig()).eval().to(device, torch.float16 if device.type == "cuda" else torch.float32)
    model.diffusion = DiffusionConfig()
    model = accelerate(model, setting)
    frames = round(setting["seconds"] * 25)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (frames, 128, 128, 3), np.uint8)
    masks = np.zeros((frames, 128, 128), np.uint8)
    masks[:, 64:, 30:98] = 1
    windows = rng.uniform(-80, 0, (frames, 4, 256)).astype(np.float32)
    src = np.arange(frames)
    chains = plan_chains(src, np.zeros(frames, int), windows.mean(axis=(1, 2)), 25.0, setting["chain_seconds"])
    out = np.zeros_like(crops)
    # Warm-up: the whole plan at one step, so that every batch size it makes is compiled, captured or autotuned first.
    generate_chains(model, crops, masks, src, windows, chains, setting["batch"], out, steps=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate_chains(model, crops, masks, src, windows, chains, setting["batch"], out, steps=setting["steps"])
    seconds = time.perf_counter() - start
    return {**setting, "chains": len(chains), "frames_done": frames, "seconds_total": seconds}


def shots(args, device: str) -> None:
    """Time the generate stage of a dub of one --shot-seconds shot for each --chain-seconds."""
    print(f"generate stage of a {args.shot}s shot at 25 fps, DDIM {args.steps} steps, dub's precision, "
          f"compile {args.compile}, cuda graphs {args.cuda_graphs}:")  # fmt: skip
    print(f"{'chain s':>7} {'chains':>6} {'batch':>5} {'seconds':>8} {'s per s of video':>17}")
    for chain_seconds in args.chain_seconds:
        setting = {"kind": "shot", "device": device, "seconds": args.shot, "chain_seconds": chain_seconds,
                   "batch": args.batch or 1024, "steps": args.steps, "compile": args.compile,
                   "cuda_graphs": args.cuda_graphs}  # fmt: skip
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(setting)], capture_output=True,
                             text=True, check=False)  # fmt: skip
        if out.returncode != 0:
            sys.exit(f"shot with {chain_seconds}s chains failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        per = r["seconds_total"] / args.shot
        print(f"{chain_seconds:>7} {r['chains']:>6} {min(r['batch'], r['chains']):>5} {r['seconds_total']:>8.1f} "
              f"{per:>17.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--frames", type=int, default=None, help="frames per setting (default: 16 on CUDA, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the defaults (default 50)")
    parser.add_argument("--batch", type=int, default=None, help="chains per UNet call (default: 16 on CUDA, 2 on CPU)")
    parser.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"])
    parser.add_argument(
        "--channels-last", action="store_true", help="on CUDA (on a CPU, talkedit samples in it already)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp16", "bf16", "fp32"],
        help="talkedit's setting (default auto: fp16 on CUDA, bf16 on a CPU with AMX, else fp32)",
    )
    parser.add_argument("--cuda-graphs", action="store_true", help="replay talkedit's UNet calls from CUDA graphs")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="profile this many sampling steps of the defaults and print the top operators",
    )
    parser.add_argument("--shot", type=float, help="instead: time dub's generate stage on a shot this long (s)")
    parser.add_argument("--chain-seconds", type=float, nargs="+", default=[5.0], help="with --shot: chain lengths")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        setting = json.loads(args.worker)
        print(json.dumps(run_shot(setting) if setting.get("kind") == "shot" else run_setting(setting)))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if args.shot:
        return shots(args, device)
    batch = args.batch or (16 if cuda else 2)
    frames = args.frames or (16 if cuda else 2)
    common = {"device": device, "warmup_steps": 2}
    settings = [
        # The paper: ancestral DDPM over the 100-step schedule, one frame per UNet call, fp32, as its code runs.
        {**common, "name": "official", "sampler": "ddpm", "steps": 100, "batch": 1, "precision": "fp32",
         "frames": max(1, frames // batch), "compile": "none", "channels_last": False},
        # talkedit: DDIM, B independent chains per UNet call, dub's precision (fp16 on CUDA, bf16 on a CPU with AMX);
        # --compile and --channels-last.
        {**common, "name": "talkedit", "sampler": "ddim", "steps": args.steps, "batch": batch,
         "precision": args.precision,
         "frames": frames, "profile": args.profile, "compile": args.compile, "channels_last": args.channels_last,
         "cuda_graphs": args.cuda_graphs},
    ]  # fmt: skip

    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; compile {args.compile}; channels_last {args.channels_last}; "
          f"cuda graphs {args.cuda_graphs}")  # fmt: skip
    header = f"{'setting':<10} {'sampler':<7} {'steps':>5} {'batch':>5} {'precision':<9} {'frames':>6} "
    print(header + f"{'s/frame':>9} {'peak MiB':>9} {'TFLOP/s':>8}")
    flops = unet_flops()
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
        print(
            f"{r['name']:<10} {r['sampler']:<7} {r['steps']:>5} {r['batch']:>5} {r['dtype']:<9} {r['frames_done']:>6} "
            f"{r['s_per_frame']:>9.3f} {r['peak_mib']:>9.0f} {flops * r['steps'] / r['s_per_frame'] / 1e12:>8.2f}"
        )
    official, ours = results
    print(f"UNet: {flops / 1e9:.1f} GFLOP per frame per step (one call on one 128x128 frame)")
    if ours["profile"]:
        print(f"profile of {args.profile} steps of the talkedit setting:\n{ours['profile']}")
    speedup = official["s_per_frame"] / ours["s_per_frame"]
    print(f"speed-up of talkedit defaults over the official settings: {speedup:.1f}x")


if __name__ == "__main__":
    main()
