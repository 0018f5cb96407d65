"""Training-step benchmark: samples/s and peak memory of `talkedit train`'s step, per batch size, precision and
torch.compile, on the device at hand.

    python benchmarks/train.py                            # CUDA when present (batches 8-64), else CPU (1-4)
    python benchmarks/train.py --device cpu --batches 1 2 4 --precisions fp32
    python benchmarks/train.py --compile --channels-last  # add the torch.compile / channels-last rows
    python benchmarks/train.py --quick                    # the small architecture, fp32, 2 steps (a smoke test)

Times the whole optimiser step (sampling the batch from an in-memory pack, augmentation, forward, backward, AdamW,
EMA) on the full-size UNet with a synthetic pack: speed does not depend on the pixel values. Each setting runs in its
own process, so its peak memory (CUDA: max allocated; CPU: peak RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path


def synthetic_pack(frames: int = 400):
    import numpy as np

    from talkedit.pack import ClipInfo, Pack

    rng = np.random.default_rng(0)
    masks = np.zeros((frames, 128, 128), np.uint8)
    masks[:, 70:, 30:98] = 1
    clips = [ClipInfo("synthetic", "0" * 64, Fraction(25), frames)]
    return Pack(
        path=Path("synthetic.pack"),
        sha256="0" * 64,
        clips=clips,
        crops=rng.integers(0, 256, (frames, 128, 128, 3), np.uint8),
        masks=masks,
        windows=rng.uniform(-80, 0, (frames, 4, 256)).astype(np.float32),
        clip=np.zeros(frames, np.int32),
        frame=np.arange(frames, dtype=np.int32),
        track=np.zeros(frames, np.int32),
        mels=[rng.uniform(-80, 0, (2 * frames + 1, 256)).astype(np.float32)],
    )


def run_setting(setting: dict) -> dict:
    import torch

    from talkedit.pack import split_pack
    from talkedit.train import ARCHITECTURES, Trainer, TrainOptions

    pack = synthetic_pack()
    options = TrainOptions(
        batch=setting["batch"],
        steps=1000,
        arch=ARCHITECTURES[setting["arch"]],
        device=setting["device"],
        precision=setting["precision"],
        compile=setting["compile"],
        channels_last=setting["channels_last"],
    )
    trainer = Trainer(pack, split_pack(pack), Path("/tmp/benchmark.safetensors"), options)
    device = trainer.device
    for step in range(setting["warmup"]):  # compilation, cuDNN autotuning, allocator
        trainer.train_step(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step in range(setting["warmup"], setting["warmup"] + setting["steps"]):
        trainer.train_step(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {**setting, "samples_per_s": setting["batch"] * setting["steps"] / seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: CUDA when available)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="global batch sizes to time")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per setting")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None, help="default: both")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--channels-last", action="store_true", help="also time channels-last")
    parser.add_argument("--quick", action="store_true", help="small architecture, 2 steps: a smoke test")
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(run_setting(json.loads(args.setting))))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    batches = args.batches or ([1, 2] if args.quick else [8, 16, 32, 64] if cuda else [1, 2, 4])
    steps = args.steps or (2 if args.quick else 20 if cuda else 3)
    arch = "small" if args.quick else "dve"
    settings = []
    for batch in batches:
        for precision in args.precisions or (("fp32",) if args.quick else ("fp32", "bf16")):
            settings.append(dict(device=device, batch=batch, precision=precision, compile=False, channels_last=False))
        if args.compile:
            settings.append(dict(device=device, batch=batch, precision="bf16", compile=True, channels_last=False))
        if args.channels_last:
            settings.append(dict(device=device, batch=batch, precision="bf16", compile=False, channels_last=True))

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"talkedit train step, {arch} UNet, on {name} (torch {torch.__version__})")
    print(f"{'batch':>5}  {'precision':>9}  {'compile':>7}  {'ch-last':>7}  {'samples/s':>10}  {'peak MiB':>9}")
    for setting in settings:
        setting = {**setting, "arch": arch, "steps": steps, "warmup": 3 if setting["compile"] else 1}
        proc = subprocess.run([sys.executable, __file__, "--setting", json.dumps(setting)], capture_output=True,
                              text=True)  # fmt: skip
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{setting['batch']:>5}  {setting['precision']:>9}  {setting['compile']!s:>7}  "
                  f"{setting['channels_last']!s:>7}  failed: {reason}")  # fmt: skip
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{r['batch']:>5}  {r['precision']:>9}  {r['compile']!s:>7}  {r['channels_last']!s:>7}  "
              f"{r['samples_per_s']:>10.2f}  {r['peak_mib']:>9.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
