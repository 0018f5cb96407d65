"""The torture sweep (issue 10): run talkedit on abuse cases and count what a user must never see.

    python benchmarks/torture.py               # every case; prints a line per case, then the counts
    python benchmarks/torture.py -k speech     # only the cases whose name contains "speech"

Each case runs the installed `talkedit` in a fresh folder that holds copies of a real video and speech from
../shared/media (and whatever odd file the case makes), with a tiny random-weight model and 2 sampling steps. It checks:
- tracebacks: "Traceback" on stderr;
- partial files: anything named `.partial`/`.tmp` left in the folder or the talkedit cache, anything left in the
  run's TMPDIR, and an output left by a run that failed;
- inputs changed: every file in the folder is hashed before the run and after;
- exit codes: against the one the README documents (0 done, 1 a problem with a file, 2 usage, 128+n a signal);
- a run that should succeed must leave its output.
The exit status is the number of cases that failed a check. Needs ../shared (media and the face landmarker).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
VIDEO = SHARED / "media/video/grid_swiz3n_black_male_360x288_25fps.mpg"
SPEECH = SHARED / "media/audio/en_short_voice_recording_22k05_mono_1.8s.m4a"
ODD_VIDEOS = ["lrs2_00009_male_headturn_160x160_25fps.mp4", "hdtf_RD_Radio10_male_glasses_512_29.97fps.mp4",
              "retalking_face1_asian_male_suit_700_vfr.mp4", "grid_lwbsza_female_360x288_25fps.mpg",
              "latentsync_demo1_vertical_female_outdoor_1080x1920_hevc_25fps.mp4"]  # fmt: skip
ODD_SPEECH = ["de_german_48k_stereo_24bit.wav", "en_female_aoc_44k1_stereo.mp3", "zh_mandarin_news_48k_stereo.wav",
              "en_male_jfk_speech_44k1_stereo_24bit.flac"]  # fmt: skip
NOISE = random.Random(0).randbytes(8192)


@dataclass
class Case:
    """One abuse: the command line after `talkedit`, the exit code the README documents for it, and what to make
    first. The command runs in the case's folder; {video}, {speech} and {out} are the names below, {model} the tiny
    model and {home} the talkedit cache."""

    name: str
    args: str
    exit: int
    setup: Callable[[Path, Path], None] | None = None  # (case folder, talkedit home): makes the odd input
    video: str = "in.mpg"
    speech: str = "speech.m4a"
    output: str | None = "out.mp4"  # must exist after exit 0, and not after a failure
    signal: int | None = None  # sent once a `.partial` file appears (signal_on_partial) or after SIGNAL_DELAY s
    signal_on_partial: bool = False
    file_limit: int | None = None  # RLIMIT_FSIZE in bytes: writes past it fail as on a full disk


SIGNAL_DELAY = 2.5  # seconds: past the imports, inside the analysis
DUB = "dub {video} {speech} -o {out} --model {model} --offline --steps 2 -q --analysis-dir analysis"


def dub(name: str, exit: int, extra: str = "", **kw) -> Case:
    return Case(name, f"{DUB} {extra}".strip(), exit, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Odd files the cases make


def write(name: str, data: bytes) -> Callable[[Path, Path], None]:
    return lambda folder, home: (folder / name).write_bytes(data)


def truncated(source: Path, name: str, keep: float) -> Callable[[Path, Path], None]:
    return lambda folder, home: (folder / name).write_bytes(source.read_bytes()[: int(source.stat().st_size * keep)])


def float_wav(name: str, samples: list[float] | None = None, amplitude: float = 0.5) -> Callable[[Path, Path], None]:
    def make(folder: Path, home: Path) -> None:
        import numpy as np

        data = amplitude * np.sin(np.arange(32000) * 0.05)
        if samples is not None:
            data[1000 : 1000 + len(samples)] = samples
        raw = data.astype("<f4").tobytes()
        fmt = struct.pack("<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32)
        (folder / name).write_bytes(b"RIFF" + struct.pack("<I", 36 + len(raw)) + b"WAVEfmt " + fmt + b"data"
                                    + struct.pack("<I", len(raw)) + raw)  # fmt: skip

    return make


def ffmpeg(name: str, *args: str) -> Callable[[Path, Path], None]:
    def make(folder: Path, home: Path) -> None:
        from talkedit.media import ffmpeg_exe

        subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args, str(folder / name)], check=True)

    return make


def fifo(name: str) -> Callable[[Path, Path], None]:
    return lambda folder, home: os.mkfifo(folder / name)


def folder_named(name: str) -> Callable[[Path, Path], None]:
    return lambda folder, home: (folder / name).mkdir()


def weights_with(name: str, nan: bool = False, metadata: dict | None = None) -> Callable[[Path, Path], None]:
    def make(folder: Path, home: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        tensors = load_file(home / "tiny.safetensors")
        with safe_open(home / "tiny.safetensors", framework="pt") as f:
            meta = dict(f.metadata())
        if nan:
            first = sorted(tensors)[0]
            tensors[first] = tensors[first].clone().fill_(float("nan"))
        for key, change in (metadata or {}).items():
            meta[key] = json.dumps({**json.loads(meta[key]), **change})
        save_file(tensors, folder / name, metadata=meta)

    return make


def zip_of(name: str, members: dict[str, bytes]) -> Callable[[Path, Path], None]:
    def make(folder: Path, home: Path) -> None:
        import zipfile

        with zipfile.ZipFile(folder / name, "w") as archive:
            for member, data in members.items():
                archive.writestr(member, data)

    return make


def analysed_then(damage: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    """Preprocess the video into the case's analysis folder, then damage the cache."""

    def make(folder: Path, home: Path) -> None:
        analysis = folder / "analysis"
        subprocess.run([*TALKEDIT, "preprocess", str(folder / "in.mpg"), "-o", str(analysis), "-q", "--offline"],
                       check=True, env={**ENV, "TALKEDIT_HOME": str(home)})  # fmt: skip
        damage(next(p for p in analysis.iterdir() if p.is_dir()))

    return make


# ---------------------------------------------------------------------------------------------------------------
# The cases


def cases() -> list[Case]:
    out: list[Case] = [
        # The happy paths, to show the checks pass when nothing is wrong.
        dub("good: dub", 0),
        dub("good: dub with a preview", 0, "--preview preview.png"),
        Case("good: preprocess", "preprocess {video} -o analysis -q --offline", 0, output=None),
    ]
    out += [dub(f"odd video: {name}", 0, setup=copy_media(name, name), video=name) for name in ODD_VIDEOS]
    out += [dub(f"odd speech: {name}", 0, setup=copy_media(name, name), speech=name) for name in ODD_SPEECH]
    # Missing, empty, truncated and foreign videos.
    bad_videos = {
        "missing": None, "empty": write("bad.mp4", b""), "random bytes": write("bad.mp4", NOISE),
        "text": write("bad.mp4", b"not a video\n" * 100), "truncated to 10%": truncated(VIDEO, "bad.mp4", 0.1),
        "truncated to 60%": truncated(VIDEO, "bad.mp4", 0.6), "a folder": folder_named("bad.mp4"),
        "a FIFO": fifo("bad.mp4"), "audio only": ffmpeg("bad.mp4", "-i", str(SPEECH), "-c:a", "aac"),
        "no face": ffmpeg("bad.mp4", "-f", "lavfi", "-i", "testsrc=duration=2:size=320x240:rate=25"),
        "one frame": ffmpeg("bad.mp4", "-i", str(VIDEO), "-frames:v", "1"),
        "mp4 truncated to 60%": truncated(SHARED / "media/video" / ODD_VIDEOS[0], "bad.mp4", 0.6),
    }  # fmt: skip
    # An MPEG stream cut short is a shorter video (the container records no length), and one frame is a still
    # picture: both are dubbed.
    exits = {"truncated to 10%": 0, "truncated to 60%": 0, "one frame": 0, "mp4 truncated to 60%": 1}
    for label, setup in bad_videos.items():
        out.append(dub(f"video: {label}", exits.get(label, 1), setup=setup, video="bad.mp4"))
    # Missing, empty, truncated and foreign speech.
    bad_speech = {
        "missing": None, "empty": write("bad.wav", b""), "random bytes": write("bad.wav", NOISE),
        "text": write("bad.wav", b"not audio\n" * 100), "header only": truncated(SHARED / "media/audio/"
        "en_librispeech_1995-1837-0001_16k_mono.wav", "bad.wav", 0.0001), "a folder": folder_named("bad.wav"),
        "a video without sound": ffmpeg("bad.wav", "-f", "lavfi", "-i", "testsrc=duration=2", "-f", "mp4"),
        "silent": ffmpeg("bad.wav", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "2"),
        "20 ms": ffmpeg("bad.wav", "-i", str(SPEECH), "-t", "0.02"),
        "NaN samples": float_wav("bad.wav", [float("nan")]), "infinite samples": float_wav("bad.wav", [float("inf")]),
        "+12 dB float": float_wav("bad.wav", amplitude=4.0), "+400 dB float": float_wav("bad.wav", amplitude=1e20),
    }  # fmt: skip
    for label, setup in bad_speech.items():
        out.append(dub(f"speech: {label}", 1, setup=setup, speech="bad.wav"))
    out.append(dub("speech: a video with its sound", 0, speech="in.mpg"))
    # Outputs.
    long_name = "o" * 240 + ".mp4"
    out += [
        dub("output: the video itself", 1, output="in.mpg"),
        dub("output: the speech itself", 1, output="speech.m4a"),
        dub("output: a folder", 1, setup=folder_named("outdir"), output="outdir"),
        dub("output: in a missing folder", 1, output="nowhere/out.mp4"),
        dub("output: .txt", 1, output="out.txt"),
        dub("output: a FIFO", 1, setup=fifo("pipe.mp4"), output="pipe.mp4"),
        dub("output: a 244-character name", 0, output=long_name),
        dub("output: a 300-character name", 1, output="o" * 296 + ".mp4"),
        dub("output: markup in the name", 0, output="out[red].mp4"),
        dub("output: a yt-dlp name", 0, output="Talk [dQw4w9WgXcQ].mp4"),
        dub("output: an emoji code", 0, output="x:smile:y.mp4"),
        dub("output: a colon", 0, output="c:d.mp4"),
        dub("output: unicode and spaces", 0, output="dubbé → 吹替 out.mp4"),
        dub("output: a leading dash", 0, output="-dash.mp4"),
        dub("output: a full temporary folder", 1, file_limit=150_000),
        dub("output: a full disk while writing", 1, setup=analysed_then(lambda d: None), file_limit=400_000),
        dub("preview: the input", 1, "--preview {video}"),
        dub("preview: the output", 1, "--preview {out}"),
        dub("preview: .jpg", 1, "--preview p.jpg"),
        dub("preview: in a missing folder", 1, "--preview nowhere/p.png"),
        dub("input: markup in the name", 0, setup=copy_media(VIDEO.name, "in[red].mpg"), video="in[red].mpg"),
        dub("input: a colon in the name", 0, setup=copy_media(VIDEO.name, "a:b.mpg"), video="a:b.mpg"),
        dub("input: a missing name with markup", 1, video="nowhere[/x].mp4"),
    ]
    # Options.
    options = [("--steps 0", 2), ("--steps -3", 2), ("--steps abc", 2), ("--sampler foo", 2), ("--fit sideways", 2),
               ("--face 0", 2), ("--face abc", 2), ("--face 1,2,3", 2), ("--face 9", 1), ("--batch 0", 2),
               ("--crf 99", 2), ("--seed 123456789012345678901234567890", 0), ("--device mps", 1),
               ("--device meta", 1), ("--device cuda:7", 1), ("--guidance 3", 1), ("--cache-dir file", 1),
               ("--no-such-option", 2)]  # fmt: skip
    for extra, code in options:
        setup = write("file", b"x") if "file" in extra else None
        out.append(dub(f"option: {extra.replace('', '')}", code, extra, setup=setup))
    # Models.
    for label, setup, name in [
        ("missing file", None, "nowhere.safetensors"), ("random bytes", write("m.safetensors", NOISE), "m.safetensors"),
        ("empty", write("m.safetensors", b""), "m.safetensors"), ("unknown name", None, "no-such-model"),
        ("NaN tensors", weights_with("m.safetensors", nan=True), "m.safetensors"),
        ("0 sampling steps", weights_with("m.safetensors", metadata={"diffusion_config": {"steps": 0}}),
         "m.safetensors"),
        ("eta a string", weights_with("m.safetensors", metadata={"diffusion_config": {"eta": "x"}}), "m.safetensors"),
        ("0 head channels", weights_with("m.safetensors", metadata={"unet_config": {"head_channels": 0}}),
         "m.safetensors"),
        ("a middle block with no heads", weights_with("m.safetensors", metadata={"unet_config": {"head_channels":
         1024}}), "m.safetensors"),
        ("a face-landmarker file", None, "{home}/face-landmarker.task"),
    ]:  # fmt: skip
        out.append(Case(f"model: {label}", DUB.replace("{model}", name), 1, setup=setup))
    # A damaged analysis cache is analysed again: the dub succeeds.
    for label, damage in [
        ("random crops", lambda d: (d / "crops.npy").write_bytes(NOISE)),
        ("truncated track", lambda d: (d / "track.npz").write_bytes((d / "track.npz").read_bytes()[:500])),
        ("analysis.json a list", lambda d: (d / "analysis.json").write_text("[]")),
        ("masks removed", lambda d: (d / "masks.npy").unlink()),
    ]:
        out.append(dub(f"cache: {label}", 0, setup=analysed_then(damage)))
    # Signals: clean up and exit 128 + n, at several moments.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        out.append(dub(f"signal: {sig.name} while analysing", 128 + sig, signal=sig))
        out.append(dub(f"signal: {sig.name} while writing", 128 + sig, signal=sig, signal_on_partial=True))
    out.append(Case("signal: SIGTERM while preprocessing", "preprocess {video} -o analysis -q --offline",
                    128 + signal.SIGTERM, output=None, signal=signal.SIGTERM))  # fmt: skip
    # Weights files by hand.
    checkpoint = "{home}/735_Network.pth"
    out += [
        Case("import-weights: good", f"import-weights {checkpoint} -o w.safetensors", 0,
             output="w.safetensors"),
        Case("import-weights: a full disk", f"import-weights {checkpoint} -o w.safetensors", 1,
             output="w.safetensors", file_limit=1 << 20),
        Case("import-weights: onto the checkpoint", f"import-weights {checkpoint} -o {checkpoint}", 1, output=None),
    ]  # fmt: skip
    for label, setup in [("random bytes", write("c.pth", NOISE)), ("empty", write("c.pth", b"")),
                         ("text", write("c.pth", b"text\n" * 50)), ("missing", None),
                         ("code in a pickle", pickled_code("c.pth"))]:  # fmt: skip
        out.append(Case(f"import-weights: {label}", "import-weights c.pth -o w.safetensors", 1,
                        setup=setup, output="w.safetensors"))  # fmt: skip
    for label, setup in [
        ("a zip of random bytes", zip_of("evil.zip", {"x/735_Network.pth": NOISE})),
        ("a zip escaping its folder", zip_of("evil.zip", {"../../735_Network.pth": NOISE})),
        ("a zip with no checkpoint", zip_of("evil.zip", {"readme.txt": b"hi"})),
        ("not a zip", write("evil.zip", NOISE)),
        ("a missing file", None),
    ]:
        out.append(Case(f"download-weights --from: {label}", "download-weights dve-multispeaker --from evil.zip "
                        "--cache-dir cache", 1, setup=setup, output=None))  # fmt: skip
    out.append(Case("download-weights: an unknown name", "download-weights no-such-model --cache-dir cache", 1,
                    output=None))  # fmt: skip
    # eval and train on bad input.
    out += [
        Case("eval: a missing dub", "eval nowhere.mp4 --speech {speech} -q --analysis-dir analysis", 1,
             output=None),
        Case("eval: random bytes as the dub", "eval bad.mp4 --speech {speech} -q", 1, output=None,
             setup=write("bad.mp4", NOISE)),
        Case("eval: a text file as the reference", "eval {video} --speech {speech} --reference ref.mp4 -q "
             "--analysis-dir analysis --offline", 1, output=None, setup=write("ref.mp4", b"text\n" * 99)),
        Case("eval: a report that is the input", "eval {video} --speech {speech} --report {video} -q", 1, output=None),
        Case("train: a text file as a video", "train bad.mp4 -o m.safetensors --offline -q", 1,
             output="m.safetensors", setup=write("bad.mp4", b"text\n" * 99)),
        Case("train: a full disk", "train two.pack -o m.safetensors --arch small --steps 2 --offline -q", 1,
             output="m.safetensors", setup=packed("two.pack"), file_limit=1 << 20),
        Case("train: good", "train two.pack -o m.safetensors --arch small --steps 2 --offline -q", 0,
             output="m.safetensors", setup=packed("two.pack")),
        Case("train: 0 steps", "train {video} -o m.safetensors --steps 0 --offline -q", 2, output=None),
        Case("pack: onto the video", "pack {video} -o {video} --offline -q", 1, output=None),
    ]  # fmt: skip
    return out


def packed(name: str) -> Callable[[Path, Path], None]:
    """A training pack of the case's video (own speech), made before the run."""

    def make(folder: Path, home: Path) -> None:
        args = ["pack", str(folder / "in.mpg"), "-o", str(folder / name), "--analysis-dir", str(folder / "analysis")]
        subprocess.run([*TALKEDIT, *args, "-q", "--offline"], check=True, env={**ENV, "TALKEDIT_HOME": str(home)})

    return make


def copy_media(name: str, as_name: str) -> Callable[[Path, Path], None]:
    source = next(p for p in (SHARED / "media/video" / name, SHARED / "media/audio" / name) if p.exists())
    return lambda folder, home: shutil.copyfile(source, folder / as_name)


def pickled_code(name: str) -> Callable[[Path, Path], None]:
    def make(folder: Path, home: Path) -> None:
        import torch

        class RunsCode:
            def __reduce__(self):
                return (os.system, (f"touch {folder / 'ran'}",))

        torch.save({"denoise_fn.out.2.bias": RunsCode()}, folder / name)

    return make


# ---------------------------------------------------------------------------------------------------------------
# Running a case and checking it

TALKEDIT = [str(Path(sys.executable).with_name("talkedit"))]
ENV = dict(os.environ, COLUMNS="200")


def make_home(home: Path) -> None:
    """The talkedit cache every case shares: the face landmarker, a tiny random model and an official-shaped
    checkpoint (random weights) for import-weights."""
    import torch

    from talkedit.diffusion import DiffusionConfig
    from talkedit.unet import UNet, UNetConfig
    from talkedit.weights import save_weights

    shutil.copyfile(SHARED / "models/face_landmarker.task", home / "face-landmarker.task")
    torch.manual_seed(0)
    tiny = UNetConfig(base_channels=32, channel_mults=(1, 1, 1, 1), num_res_blocks=1, attention_resolutions=(),
                      head_channels=32)  # fmt: skip
    save_weights(home / "tiny.safetensors", UNet(tiny).state_dict(), tiny, DiffusionConfig(), {"source": "torture"})
    official = {f"denoise_fn.{k}": v for k, v in UNet(UNetConfig()).state_dict().items()}
    torch.save(official, home / "735_Network.pth")


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder`, except the caches talkedit may rewrite."""
    found = {}
    for path in folder.rglob("*"):
        if (
            path.is_file()
            and not path.is_symlink()
            and path.relative_to(folder).parts[0] not in ("analysis", "cache", "tmp")
        ):
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def leftovers(folder: Path, home: Path) -> list[str]:
    """Partial and temporary files in the case's folder and the cache, and anything left in the case's TMPDIR."""
    named = [p for f in (folder, home) for p in f.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]
    # torch keeps its compiled-kernel cache in TMPDIR on purpose (torchinductor_USER); it is not talkedit's.
    temporary = [p for p in (folder / "tmp").iterdir() if not p.name.startswith("torchinductor_")]
    return sorted(str(p) for p in named + temporary)


def run(case: Case, folder: Path, home: Path) -> dict:
    """Run one case in `folder`; return what the checks found."""
    (folder / "tmp").mkdir()
    shutil.copyfile(VIDEO, folder / "in.mpg")
    shutil.copyfile(SPEECH, folder / "speech.m4a")
    if case.setup:
        case.setup(folder, home)
    before = digests(folder)
    existed = bool(case.output) and os.path.lexists(folder / case.output)
    names = {"video": case.video, "speech": case.speech, "out": case.output or "out.mp4",
             "model": str(home / "tiny.safetensors"), "home": str(home)}  # fmt: skip
    args = shlex.split(case.args.format(**{k: shlex.quote(v) for k, v in names.items()}))
    limit = case.file_limit
    preexec = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
    started = time.perf_counter()
    env = {**ENV, "TALKEDIT_HOME": str(home), "TMPDIR": str(folder / "tmp")}
    proc = subprocess.Popen([*TALKEDIT, *args], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec)  # fmt: skip
    if case.signal:
        deadline = started + (120 if case.signal_on_partial else SIGNAL_DELAY)
        while time.perf_counter() < deadline and proc.poll() is None:
            if case.signal_on_partial and any(".partial" in p.name for p in folder.iterdir()):
                time.sleep(0.3)  # a few frames into the encoder
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(case.signal)
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    after = digests(folder)
    changed = sorted(name for name, sha in before.items() if after.get(name) != sha)
    output = folder / case.output if case.output else None
    left = leftovers(folder, home)
    if output is not None and proc.returncode != 0 and not existed and os.path.lexists(output):
        left.append(f"{output.name} (the output of a failed run)")
    missing_output = case.exit == 0 and output is not None and not (output.is_file() and output.stat().st_size > 0)
    for stale in home.rglob("*"):  # the shared cache keeps no partial state between cases
        if ".partial" in stale.name or stale.name.endswith(".tmp"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    errors += [line.strip("│ ") for line in stderr.splitlines() if line.startswith("│")]  # typer's usage box
    return {
        "case": case.name,
        "exit": proc.returncode,
        "expected": case.exit,
        "traceback": "Traceback" in stderr,
        "leftovers": left,
        "changed": changed,
        "missing_output": missing_output,
        "seconds": round(time.perf_counter() - started, 1),
        "message": (errors[0] if errors else stderr.strip().splitlines()[-1] if stderr.strip() else "")[:300],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="Only the cases whose name contains this.")
    parser.add_argument("--json", type=Path, help="Also write every case's result here.")
    opts = parser.parse_args()
    chosen = [c for c in cases() if opts.k in c.name]
    results = []
    with tempfile.TemporaryDirectory(prefix="talkedit-torture-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        make_home(home)
        for i, case in enumerate(chosen):
            folder = Path(tmp) / f"case-{i:03d}"
            folder.mkdir()
            result = run(case, folder, home)
            results.append(result)
            bad = []
            if result["traceback"]:
                bad.append("TRACEBACK")
            if result["leftovers"]:
                bad.append(f"LEFT {result['leftovers']}")
            if result["changed"]:
                bad.append(f"CHANGED {result['changed']}")
            if result["exit"] != result["expected"]:
                bad.append(f"EXIT {result['exit']} (documented: {result['expected']})")
            if result["missing_output"]:
                bad.append("NO OUTPUT")
            status = "ok  " if not bad else "FAIL"
            print(f"{status} {case.name:<48} exit {result['exit']:>3} {result['seconds']:>6.1f}s  "
                  f"{'; '.join(bad) or result['message']}", flush=True)  # fmt: skip
    counts = {
        "cases": len(results),
        "tracebacks": sum(r["traceback"] for r in results),
        "partial files left": sum(bool(r["leftovers"]) for r in results),
        "inputs changed": sum(bool(r["changed"]) for r in results),
        "wrong exit codes": sum(r["exit"] != r["expected"] for r in results),
        "missing outputs": sum(r["missing_output"] for r in results),
    }
    print("\n" + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if opts.json:
        opts.json.write_text(json.dumps({"counts": counts, "results": results}, indent=1))
    failed = sum(
        r["traceback"]
        or bool(r["leftovers"])
        or bool(r["changed"])
        or r["exit"] != r["expected"]
        or r["missing_output"]
        for r in results
    )
    return min(failed, 125)


if __name__ == "__main__":
    sys.exit(main())
