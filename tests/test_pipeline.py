"""`dub` and `preprocess` end to end on real clips, with a tiny random-weight model on the CPU."""

from __future__ import annotations

import re
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from talkedit.analysis import preprocess
from talkedit.cli import app
from talkedit.errors import TalkeditError
from talkedit.face import blend_alpha, invert, to_crop
from talkedit.generate import Chain, plan_chains, schedule
from talkedit.media import ffmpeg_exe, iter_yuv_frames, probe_video, read_audio
from talkedit.pipeline import DubOptions, _frames_in_order, dub, source_indices

from .common import media

runner = CliRunner()

DUBS = {
    # video, speech: the 29.97 fps clip with longer speech (pingpong), the variable-frame-rate clip, a portrait HEVC
    # clip, the two-face clip and an MPEG-1 clip, with speech in five formats.
    "ntsc-pingpong": ("hdtf_RD_Radio10_male_glasses_512_29.97fps.mp4", "retalking_audio1_44k1_stereo.wav"),
    "vfr": ("retalking_face1_asian_male_suit_700_vfr.mp4", "en_short_voice_recording_22k05_mono_1.8s.m4a"),
    "portrait-hevc": (
        "latentsync_demo1_vertical_female_outdoor_1080x1920_hevc_25fps.mp4",
        "en_female_aoc_44k1_stereo.mp3",
    ),
    "two-faces": ("two_faces_tv_interview_splitscreen_1280x720_25fps.mp4", "zh_aishell_BAC009S0724W0121_16k_mono.wav"),
    "mpeg1": ("grid_lwbsza_female_360x288_25fps.mpg", "fr_french_48k_stereo_24bit.wav"),
}


def streams(path: Path) -> list[str]:
    text = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    return re.findall(r"Stream #\d+:\d+.*?: (Video|Audio): (\w+)", text)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def edit_region(analysis, frame_index: int, shape: tuple[int, int], margin: int = 16) -> np.ndarray:
    """Frame pixels the paste may touch (the feathered mask's box in the frame), grown by `margin` px for the
    encoder's block effects. Returns (H, W) bool."""
    alpha = blend_alpha(analysis.masks[frame_index])[0].numpy()
    ys, xs = np.nonzero(alpha)
    box = np.array(
        [[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.min(), ys.max() + 1], [xs.max() + 1, ys.max() + 1]]
    )
    corners = to_crop(invert(analysis.matrices[frame_index]), box.astype(float))
    region = np.zeros(shape, bool)
    x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int) - margin, 0)
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + margin
    region[y0:y1, x0:x1] = True
    return region


def ffmpeg_frames(path: Path, fps: Fraction | None = None) -> np.ndarray:
    """Every frame of a video as ffmpeg alone decodes it (at `fps` through its fps filter when given):
    (T, H, W, 3) uint8 RGB, independent of talkedit's decoder."""
    size = re.search(r", (\d+)x(\d+)", [v for v in streams_text(path) if "Video:" in v][0])
    width, height = int(size[1]), int(size[2])
    raw = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v:0", *(["-vf", f"fps={fps}"] if fps else []),
         "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def streams_text(path: Path) -> list[str]:
    text = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    return [line for line in text.splitlines() if "Stream #" in line]


@pytest.fixture(scope="module")
def dubbed(talkedit_home, tmp_path_factory):
    """Every clip of DUBS dubbed once through the CLI."""
    home, tiny = talkedit_home
    folder = tmp_path_factory.mktemp("dubs")
    results = {}
    for name, (video, speech) in DUBS.items():
        out = folder / f"{name}.mp4"
        result = runner.invoke(
            app, ["dub", str(media(video)), str(media(speech)), "-o", str(out), "--model", str(tiny)]
        )
        assert result.exit_code == 0, result.output
        analysis = preprocess(media(video))  # cached by the dub: returns at once
        num_output = probe_video(out).frame_count
        src = source_indices(num_output, analysis.frame_count, "pingpong")
        results[name] = (out, analysis, src, result.output)
    return results


@pytest.mark.parametrize("name", sorted(DUBS))
def test_dub_writes_a_finished_video(dubbed, name):
    video, speech = DUBS[name]
    out, analysis, src, _ = dubbed[name]
    source = probe_video(media(video))
    result = probe_video(out)
    assert streams(out) == [("Video", "h264"), ("Audio", "aac")]
    assert (result.width, result.height) == (source.width, source.height)
    assert result.fps == source.fps
    speech_seconds = len(read_audio(media(speech))) / 16000
    assert abs(result.frame_count / float(result.fps) - speech_seconds) <= 1 / float(result.fps)
    assert abs(result.duration - speech_seconds) <= 1 / float(result.fps) + 0.05  # + AAC priming


@pytest.mark.parametrize("name", sorted(DUBS))
def test_dub_changes_the_mouth_and_nothing_else(dubbed, name):
    """The output against the source, both decoded by ffmpeg alone: away from the lower face only one x264 pass."""
    out, analysis, src, _ = dubbed[name]
    info = analysis.video
    # Dropped frames and variable rates are filled to the rate (ffmpeg's fps filter); a late first frame is held.
    ours_all = ffmpeg_frames(out)
    source = ffmpeg_frames(media(DUBS[name][0]), info.fps if info.variable_frame_rate else None)
    squared_error, pixels, worst_frame, inside_change = 0.0, 0, np.inf, []
    for j, ours in enumerate(ours_all):
        theirs = source[min(max(0, src[j] - info.lead_frames), len(source) - 1)]
        away = np.ones(ours.shape[:2], bool)
        if analysis.track[src[j]] >= 0:
            region = edit_region(analysis, src[j], ours.shape[:2])
            away = ~region
            inside_change.append(np.abs(ours[region].astype(int) - theirs[region]).mean())
        diff = ours[away].astype(np.float64) - theirs[away]
        squared_error, pixels = squared_error + (diff**2).sum(), pixels + diff.size
        worst_frame = min(worst_frame, psnr(ours[away], theirs[away]))
    clip_psnr = 10 * np.log10(255**2 / (squared_error / pixels))
    # The clip as a whole matches; no single frame is far off (a misplaced paste or a shifted frame would be).
    assert clip_psnr >= 36, f"PSNR away from the lower face {clip_psnr:.1f} dB"
    assert worst_frame >= 30, f"worst frame {worst_frame:.1f} dB"
    assert np.mean(inside_change) > 5, "the mouth region did not change"


def test_hd_dub_matches_ffmpegs_own_transcode_away_from_the_mouth(talkedit_home, tmp_path):
    """Acceptance: a BT.709 1080p clip dubbed with its own sound, against `ffmpeg -i SRC -c:v libx264 -crf 18`, both
    decoded by ffmpeg: outside the lower-face box every frame is what a plain transcode gives (PSNR >= 45 dB), and
    the colours are tagged as the source's."""
    _, tiny = talkedit_home
    clip = media("GENERATED_dve_crema_1030_female_1920x1080_pillarbox_25fps.mp4")
    out, plain = tmp_path / "dub.mp4", tmp_path / "plain.mp4"
    dub(clip, clip, out, DubOptions(model=str(tiny), steps=1))
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(clip), "-map", "0:v", "-c:v", "libx264", "-crf", "18", "-preset",
         "medium", "-pix_fmt", "yuv420p", str(plain)], check=True,
    )  # fmt: skip
    assert "bt709" in [v for v in streams_text(out) if "Video:" in v][0]
    ours, theirs = ffmpeg_frames(out), ffmpeg_frames(plain)
    analysis = preprocess(clip)
    n = min(len(ours), len(theirs))
    assert n >= len(theirs) - 2
    squared_error, pixels = 0.0, 0
    for j in range(n):
        away = np.ones(ours.shape[1:3], bool)
        if analysis.track[j] >= 0:
            away = ~edit_region(analysis, j, away.shape)
        diff = ours[j][away].astype(np.float64) - theirs[j][away]
        squared_error, pixels = squared_error + (diff**2).sum(), pixels + diff.size
    clip_psnr = 10 * np.log10(255**2 / (squared_error / pixels))
    assert clip_psnr >= 45, f"{clip_psnr:.1f} dB away from the lower face"


def test_two_face_clip_edits_only_the_largest_face(dubbed):
    out, analysis, src, _ = dubbed["two-faces"]
    # The largest face is the anchor on the left half of the split screen ...
    assert np.nanmean(analysis.landmarks[analysis.track >= 0, :, 0]) < 640
    # ... and the guest's face on the right is left as it was: only the encoder touched it.
    ours, source = ffmpeg_frames(out), ffmpeg_frames(media(DUBS["two-faces"][0]))
    right, left = (slice(200, 560), slice(800, 1200)), (slice(200, 560), slice(100, 540))
    right_psnr = np.mean([psnr(ours[j][right], source[src[j]][right]) for j in range(0, len(ours), 5)])
    assert right_psnr > 38, f"the other face changed ({right_psnr:.1f} dB)"
    left_change = np.mean([np.abs(ours[j][left].astype(int) - source[src[j]][left]).mean() for j in range(len(ours))])
    assert left_change > 0.5


def test_dub_prints_a_summary(dubbed):
    *_, output = dubbed["vfr"]
    assert re.search(r"\d+ frames written, \d+ with a generated mouth, \d+ passed through", output)
    assert "vfr.mp4" in output


def test_preprocess_caches_by_content_and_writes_a_preview(talkedit_home, tmp_path):
    clip = media("retalking_face5_older_female_glasses_524_25fps.mp4")
    result = runner.invoke(app, ["preprocess", str(clip), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    preview = re.search(r"Preview: (\S+preview\.png)", result.output.replace("\n", ""))[1]
    assert Path(preview).is_file() and Path(preview).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    renamed = tmp_path / "renamed.mp4"
    renamed.write_bytes(clip.read_bytes())
    again = preprocess(renamed, output_dir=tmp_path)
    assert str(again.directory) in preview  # same content, same analysis: found under another name
    assert again.crops.shape == (again.frame_count, 128, 128, 3)


def test_source_indices_fit_policies():
    assert source_indices(3, 5, "pingpong").tolist() == [0, 1, 2]
    assert source_indices(9, 4, "pingpong").tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert source_indices(6, 4, "loop").tolist() == [0, 1, 2, 3, 0, 1]
    assert source_indices(6, 4, "hold").tolist() == [0, 1, 2, 3, 3, 3]
    with pytest.raises(Exception, match="--fit trim"):
        source_indices(6, 4, "trim")


def test_chains_restart_at_track_breaks_and_jumps_and_split_long_runs_at_the_quietest_moment():
    track = np.array([0, 0, 0, -1, 1, 1])
    quiet = np.zeros(6)
    assert [c.frames for c in plan_chains(np.arange(6), track, quiet, 25)] == [[0, 1, 2], [4, 5]]
    src = source_indices(10, 6, "loop")  # 0..5, 0..3: the jump back to 0 starts a new chain
    assert [c.frames for c in plan_chains(src, np.zeros(6, int), np.zeros(10), 25)] == [list(range(6)), [6, 7, 8, 9]]
    # 30 s in one run at 25 fps: split into chains of about 5 s, each ending where the speech is quietest.
    loudness = np.zeros(750)
    loudness[::7] = 1
    loudness[130] = -80  # a pause 5.2 s in
    plan = plan_chains(np.arange(750), np.zeros(750, int), loudness, 25, overlap=0)
    assert plan[0].frames == list(range(130)) and plan[1].start == 130
    assert all(100 <= len(c.frames) <= 250 for c in plan) and sum(len(c.frames) for c in plan) == 750


def test_an_overlap_starts_each_chain_after_a_split_early_without_moving_the_splits():
    loudness = np.zeros(750)
    loudness[::7] = 1
    plain = plan_chains(np.arange(750), np.zeros(750, int), loudness, 25, overlap=0)
    plan = plan_chains(np.arange(750), np.zeros(750, int), loudness, 25, overlap=4)
    assert len(plan) == len(plain) >= 3
    assert plan[0].lead == 0 and plan[0].frames == plain[0].frames  # the shot's first chain has nothing to fade into
    for before, chain, alone in zip(plan[:-1], plan[1:], plain[1:], strict=True):
        assert chain.lead == 4 and chain.frames == list(range(alone.start - 4, alone.frames[-1] + 1))
        assert chain.frames[:4] == before.frames[-4:]
    # Never more than half the chain before: 1 s chains split at pauses 1 and 2 s in, and an overlap of 40 frames.
    pauses = np.ones(100)
    pauses[[25, 50]] = 0
    short = plan_chains(np.arange(100), np.zeros(100, int), pauses, 25, chain_seconds=1, overlap=40)
    assert [c.lead for c in short] == [0, 12, 12] and [len(c.frames) for c in short] == [25, 37, 62]


def test_schedule_shares_calls_across_tracks_and_waits_for_each_tracks_identity():
    chain_list = [Chain(0, list(range(0, 10))), Chain(0, list(range(10, 20))), Chain(1, list(range(30, 35)))]
    calls = list(schedule(chain_list, 3))
    assert calls[0] == [(0, 0), (2, 0)]  # chain 1 waits for track 0's identity (chain 0's first frame)
    assert calls[1] == [(0, 1), (2, 1), (1, 0)]
    assert sorted(pair for call in calls for pair in call) == sorted(
        (k, p) for k, c in enumerate(chain_list) for p in range(len(c.frames))
    )
    assert all(len(call) <= 3 for call in calls)


class FakeAnalysis:
    """Crops that say which source frame they are (red, green = index), blue 0 for originals."""

    def __init__(self, track: np.ndarray) -> None:
        n = len(track)
        self.track = track
        self.crops = np.zeros((n, 128, 128, 3), np.uint8)
        self.crops[:, :, :, 0] = (np.arange(n) % 256)[:, None, None]
        self.crops[:, :, :, 1] = (np.arange(n) // 256)[:, None, None]
        self.masks = np.ones((n, 128, 128), np.uint8)


def run_generate(monkeypatch, tmp_path, src, track, batch: int):
    """generate_chains with a fake sampler that records, per output frame, what it was conditioned on."""
    import torch

    from talkedit import diffusion
    from talkedit.generate import generate_chains
    from talkedit.pipeline import GeneratedCrops

    def decode(images: torch.Tensor) -> list[tuple[str, int]]:
        pixels = ((images[:, :, 0, 0] + 1) * 127.5).round().int().tolist()
        return [("generated" if b == 255 else "original", r + 256 * g) for r, g, b in pixels]

    seen = {}

    def fake_sample_frames(model, y0, mask, previous, identity, audio, *, generator, **kwargs):
        frames = audio[:, 0, 0].round().int().tolist()  # windows[j] = j
        for j, p, i, g in zip(frames, decode(previous), decode(identity), generator, strict=True):
            seen[j] = {"previous": p, "identity": i, "noise": float(torch.randn(1, generator=g))}
        out = torch.zeros(len(frames), 3, 128, 128)
        out[:, 0] = torch.tensor([j % 256 for j in frames])[:, None, None] / 127.5 - 1
        out[:, 1] = torch.tensor([j // 256 for j in frames])[:, None, None] / 127.5 - 1
        out[:, 2] = 1
        return out

    monkeypatch.setattr(diffusion, "sample_frames", fake_sample_frames)
    analysis = FakeAnalysis(track)
    windows = np.broadcast_to(np.arange(len(src), dtype=np.float32)[:, None, None], (len(src), 4, 256)).copy()
    chain_list = plan_chains(src, track, np.zeros(len(src)), 25, overlap=0)  # one sample per frame: see crossfade_run
    generated = GeneratedCrops(tmp_path / f"generated-{batch}.npy", len(src))
    generate_chains(None, analysis.crops, analysis.masks, src, windows, chain_list, batch, generated, seed=3)
    return seen, chain_list, generated


def test_generate_hands_each_chain_its_previous_frame_and_its_tracks_identity(monkeypatch, tmp_path):
    track = np.zeros(700, np.int32)
    track[300:310] = -1  # a gap: a new track after it
    track[310:] = 1
    src = np.arange(700)
    seen, chain_list, generated = run_generate(monkeypatch, tmp_path, src, track, batch=4)
    assert len(chain_list) >= 4  # track 1's 390 frames are split into chains
    assert sorted(seen) == [j for j in range(700) if track[j] >= 0]
    assert all(generated[j] is not None for j in seen) and generated[305] is None
    for chain in chain_list:
        first = chain.frames[0]
        assert seen[first]["previous"] == ("original", src[first])  # a chain starts from its own original
        for a, b in zip(chain.frames[:-1], chain.frames[1:], strict=True):
            assert seen[b]["previous"] == ("generated", a)
        track_start = 0 if chain.track == 0 else 310
        for j in chain.frames[1:] if first == track_start else chain.frames:
            assert seen[j]["identity"] == ("generated", track_start)  # one identity per track: its first output


def test_generate_gives_the_same_result_at_any_batch_size(monkeypatch, tmp_path):
    track = np.zeros(400, np.int32)
    seen_1, _, _ = run_generate(monkeypatch, tmp_path, np.arange(400), track, batch=1)
    seen_8, _, _ = run_generate(monkeypatch, tmp_path, np.arange(400), track, batch=8)
    assert seen_1 == seen_8


def crossfade_run(monkeypatch, tmp_path, batch: int):
    """60 frames in 1 s chains with an overlap of 3, through a fake sampler whose crops count each chain's frames:
    blue = 4 x (position in its chain + 1), since each frame adds 4 to the blue of the frame it is conditioned on."""

    from talkedit import diffusion
    from talkedit.generate import generate_chains
    from talkedit.pipeline import GeneratedCrops

    def fake_sample_frames(model, y0, mask, previous, identity, audio, *, generator, **kwargs):
        out = previous.clone()
        out[:, 0] = y0[:, 0]  # red: which frame
        out[:, 2] = previous[:, 2] + 4 / 127.5
        return out

    monkeypatch.setattr(diffusion, "sample_frames", fake_sample_frames)
    analysis = FakeAnalysis(np.zeros(60, np.int32))
    chains = plan_chains(np.arange(60), analysis.track, np.zeros(60), 25, chain_seconds=1, overlap=3)
    generated = GeneratedCrops(tmp_path / f"crossfade-{batch}.npy", 60)
    windows = np.zeros((60, 4, 256), np.float32)
    generate_chains(None, analysis.crops, analysis.masks, np.arange(60), windows, chains, batch, generated, seed=0)
    return chains, np.stack([generated[j] for j in range(60)])


def test_a_chain_with_a_lead_fades_in_over_the_chain_before_it_whatever_the_batch(monkeypatch, tmp_path):
    chains, crops = crossfade_run(monkeypatch, tmp_path, batch=8)
    assert [c.lead for c in chains] == [0, 3] and chains[1].start == chains[0].frames[-3]
    assert (crops[:, 0, 0, 0] == np.arange(60)).all()  # every frame's own crop, written once
    blue = crops[:, 0, 0, 2].astype(int)
    first, second = chains
    assert blue[first.frames[:-3]].tolist() == [4 * (p + 1) for p in range(len(first.frames) - 3)]
    for p, j in enumerate(second.frames[:3]):  # the later chain's weight rises 1/4, 2/4, 3/4
        w, q = (p + 1) / 4, first.frames.index(j)
        assert blue[j] == round(w * 4 * (p + 1) + (1 - w) * 4 * (q + 1))
    # After its lead the second chain goes on from its own frames, not the blend.
    assert blue[second.frames[3:]].tolist() == [4 * (p + 1) for p in range(3, len(second.frames))]
    _, one_at_a_time = crossfade_run(monkeypatch, tmp_path, batch=1)
    assert (one_at_a_time == crops).all()


@pytest.mark.parametrize(
    "name", ["lrs2_00009_male_headturn_160x160_25fps.mp4", "grid_swiz3n_black_male_360x288_25fps.mpg"]
)
def test_frames_in_order_plays_backwards_exactly(name, monkeypatch):
    from talkedit import pipeline

    info = probe_video(media(name))
    forward = [f.buffer.copy() for f in iter_yuv_frames(info)]
    src = source_indices(2 * len(forward), len(forward), "pingpong")
    decodes = []
    real = pipeline.iter_yuv_frames

    def counting(info, start=0):
        decodes.append(start)
        return real(info, start=start)

    monkeypatch.setattr(pipeline, "iter_yuv_frames", counting)
    for k, frame in enumerate(_frames_in_order(info, src)):
        assert np.array_equal(frame.buffer, forward[src[k]]), k
    assert len(decodes) <= 3  # forward, backward (one chunk), forward again


@pytest.mark.parametrize("batch", [1, 3])
def test_same_seed_same_video_at_any_batch(talkedit_home, tmp_path, batch):
    _, tiny = talkedit_home
    clip, speech = (
        media("grid_swiz3n_black_male_360x288_25fps.mpg"),
        media("en_short_voice_recording_22k05_mono_1.8s.m4a"),
    )
    outs = [tmp_path / f"{n}.mp4" for n in ("a", "b", "c")]
    for out, seed, b in zip(outs, (1, 1, 2), (1, batch, batch), strict=True):
        dub(clip, speech, out, DubOptions(model=str(tiny), seed=seed, steps=1, batch=b))
    frames = [ffmpeg_frames(o) for o in outs]
    assert np.array_equal(frames[0], frames[1])
    assert not np.array_equal(frames[0], frames[2])


def test_dub_plans_chains_with_the_chain_length_and_overlap_asked_for(talkedit_home, tmp_path, monkeypatch):
    import torch

    from talkedit import pipeline

    _, tiny = talkedit_home
    plans, batches = [], []

    def spy(model, crops, masks, src, windows, chain_list, batch, *args, **kwargs):
        plans.append(chain_list)
        batches.append(batch)
        return generate_chains(model, crops, masks, src, windows, chain_list, batch, *args, **kwargs)

    generate_chains = pipeline.generate_chains
    monkeypatch.setattr(pipeline, "generate_chains", spy)
    clip, speech = (
        media("grid_swiz3n_black_male_360x288_25fps.mpg"),
        media("en_short_voice_recording_22k05_mono_1.8s.m4a"),
    )
    dub(clip, speech, tmp_path / "a.mp4", DubOptions(model=str(tiny), steps=1, chain_seconds=0.4, overlap=2))
    dub(clip, speech, tmp_path / "b.mp4", DubOptions(model=str(tiny), steps=1))
    dub(clip, speech, tmp_path / "d.mp4", DubOptions(model=str(tiny), steps=1, chain_seconds=0.4))
    split, whole, default_overlap = plans
    assert len(split) >= 3 and [c.lead for c in split] == [0] + [2] * (len(split) - 1)
    assert len(whole) == 1  # 1.8 s: one chain at the default 5 s
    # By default a chain after a split fades in over 3 frames (the chain study in README "Benchmarks").
    assert [c.lead for c in default_overlap] == [0] + [3] * (len(default_overlap) - 1)
    # By default 2 chains per UNet call on a CPU (the fastest per frame there: README), 16 on CUDA.
    assert batches == [16 if torch.cuda.is_available() else 2] * 3
    with pytest.raises(TalkeditError, match="--chain-seconds"):
        dub(clip, speech, tmp_path / "c.mp4", DubOptions(model=str(tiny), chain_seconds=0))
    assert not (tmp_path / "c.mp4").exists()


def test_dub_samples_in_the_precision_asked_for(talkedit_home, tmp_path, monkeypatch):
    """--precision reaches the sampler; "auto" is its default; a precision that is not one is refused up front."""
    import torch

    from talkedit import diffusion

    _, tiny = talkedit_home
    seen = []
    real = diffusion.sample_frames

    def sample_frames(model, *args, precision, **kwargs):
        convolutions = [p for p in model.parameters() if p.dim() == 4]
        layout = all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
        seen.append((precision, next(model.parameters()).dtype, layout))
        return real(model, *args, precision=precision, **kwargs)

    monkeypatch.setattr(diffusion, "sample_frames", sample_frames)
    clip, speech = (
        media("grid_swiz3n_black_male_360x288_25fps.mpg"),
        media("en_short_voice_recording_22k05_mono_1.8s.m4a"),
    )
    args = ["dub", str(clip), str(speech), "--model", str(tiny), "--steps", "1", "--device", "cpu"]
    for precision in ("bf16", "auto"):
        out = tmp_path / f"{precision}.mp4"
        result = runner.invoke(
            app, [*args, "-o", str(out)] + (["--precision", precision] if precision != "auto" else [])
        )
        assert result.exit_code == 0, result.output
        assert set(seen) == {(precision, torch.float32, True)}  # on a CPU: fp32 weights in channels-last
        seen.clear()
    with pytest.raises(TalkeditError, match="--precision 'half'"):
        dub(clip, speech, tmp_path / "c.mp4", DubOptions(model=str(tiny), precision="half"))
    assert not (tmp_path / "c.mp4").exists() and not seen


def test_generated_crops_hand_each_crop_over_as_it_comes_and_stop_both_sides(tmp_path):
    import threading

    from talkedit.pipeline import GeneratedCrops

    generated = GeneratedCrops(tmp_path / "g.npy", 4, expected=[1, 2])
    assert generated.wait(0) is None  # no chain covers frame 0: nothing to wait for
    got, stopped = {}, []

    def wait_for(j: int) -> None:
        try:
            got[j] = generated.wait(j)
        except GeneratedCrops.Stopped:
            stopped.append(j)

    reader = threading.Thread(target=wait_for, args=(1,))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()  # crop 1 is not there yet
    generated[1] = np.full((128, 128, 3), 7, np.uint8)
    reader.join(10)
    assert not reader.is_alive() and (got[1] == 7).all()
    reader = threading.Thread(target=wait_for, args=(2,))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()
    generated.stop()
    reader.join(10)
    assert stopped == [2] and 2 not in got
    with pytest.raises(GeneratedCrops.Stopped):
        generated[2] = np.zeros((128, 128, 3), np.uint8)
    with pytest.raises(GeneratedCrops.Stopped):
        generated.check()


SHORT = (media("grid_swiz3n_black_male_360x288_25fps.mpg"), media("en_short_voice_recording_22k05_mono_1.8s.m4a"))


def test_with_writing_after_the_generation_the_stages_follow_each_other(talkedit_home, tmp_path, monkeypatch):
    """WRITE_BESIDE_GENERATION = False (benchmarks/dub.py --write-beside no): all generating first, then writing."""
    from talkedit import pipeline

    _, tiny = talkedit_home
    monkeypatch.setattr(pipeline, "WRITE_BESIDE_GENERATION", False)
    events = []
    dub(*SHORT, tmp_path / "out.mp4", DubOptions(model=str(tiny), steps=1, batch=1),
        progress=lambda stage, done, total, note=None: events.append(stage))  # fmt: skip
    stages = [stage for stage in events if stage in ("generate", "write")]
    assert stages == sorted(stages) and stages.count("generate") > 40 and "write" in stages


@pytest.fixture()
def paced(monkeypatch):
    """The real sampler, counted, that waits before each call after the first until the dub has written a frame:
    the generation can only finish if the writer runs beside it. `wrote` is set by `progress`."""
    import threading

    from talkedit import diffusion

    state = {"calls": 0, "waits": [], "wrote": threading.Event(), "fail_at": None}
    real = diffusion.sample_frames

    def sample_frames(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] > 1 and all(state["waits"]):  # after one wait in vain, no more
            state["waits"].append(state["wrote"].wait(30))
        if state["calls"] == state["fail_at"]:
            raise TalkeditError("the model produced NaN or infinite pixels (a test's)")
        return real(*args, **kwargs)

    def progress(stage: str, done: int, total: int, note=None) -> None:
        if stage == "write":
            state["wrote"].set()

    monkeypatch.setattr(diffusion, "sample_frames", sample_frames)
    state["progress"] = progress
    return state


def test_dub_writes_while_it_generates(talkedit_home, tmp_path, paced):
    import threading

    _, tiny = talkedit_home
    result = dub(
        *SHORT, tmp_path / "out.mp4", DubOptions(model=str(tiny), steps=1, batch=1), progress=paced["progress"]
    )
    assert result.frames_generated == paced["calls"] == result.frames_written > 40  # one chain, a frame per call
    assert all(paced["waits"])  # frames were written before the generation was done
    assert result.stage_seconds["write waiting"] <= result.stage_seconds["write"]
    assert not any(t.name == "talkedit-generate" for t in threading.enumerate())


def test_a_generation_error_mid_dub_stops_the_writer_and_leaves_no_file(talkedit_home, tmp_path, paced):
    _, tiny = talkedit_home
    paced["fail_at"] = 5
    with pytest.raises(TalkeditError, match="NaN or infinite pixels"):
        dub(*SHORT, tmp_path / "out.mp4", DubOptions(model=str(tiny), steps=1, batch=1), progress=paced["progress"])
    assert paced["wrote"].is_set()  # the writer had begun
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the output nor its partial file


def test_a_writer_error_or_an_interruption_stops_the_generation(talkedit_home, tmp_path, paced, monkeypatch):
    import threading

    from talkedit import media as media_module
    from talkedit.errors import MediaError

    _, tiny = talkedit_home
    real_write = media_module.VideoWriter.write

    def failing_write(self, frame):
        if self.frames == 3:
            raise MediaError(f"{self.output}: the disk is gone (a test's)")
        real_write(self, frame)

    monkeypatch.setattr(media_module.VideoWriter, "write", failing_write)
    with pytest.raises(MediaError, match="the disk is gone"):
        dub(*SHORT, tmp_path / "a.mp4", DubOptions(model=str(tiny), steps=1, batch=1), progress=paced["progress"])
    assert paced["calls"] < 40 and not any(t.name == "talkedit-generate" for t in threading.enumerate())
    monkeypatch.setattr(media_module.VideoWriter, "write", real_write)

    def interrupt(stage: str, done: int, total: int, note=None) -> None:
        paced["progress"](stage, done, total)
        if stage == "write" and done == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

    paced["calls"], paced["wrote"] = 0, threading.Event()
    with pytest.raises(KeyboardInterrupt):
        dub(*SHORT, tmp_path / "b.mp4", DubOptions(model=str(tiny), steps=1, batch=1), progress=interrupt)
    assert paced["calls"] < 40 and not any(t.name == "talkedit-generate" for t in threading.enumerate())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_non_square_pixels_keep_their_display_aspect_and_align_as_displayed(talkedit_home, tmp_path):
    """A 360x288 clip with 16:11 pixels: the dub keeps the pixel aspect, and the face is aligned as it is seen (its
    crops match those of the same clip resized to square pixels), not stretched."""
    _, tiny = talkedit_home
    source = media("grid_swiz3n_black_male_360x288_25fps.mpg")
    anamorphic, square = tmp_path / "sar.mp4", tmp_path / "square.mp4"
    for out, vf in ((anamorphic, "setsar=16/11"), (square, "scale=524:288,setsar=1")):
        subprocess.run(
            [ffmpeg_exe(), "-v", "error", "-i", str(source), "-vf", vf, "-c:v", "libx264", "-crf", "8", "-c:a", "aac",
             str(out)], check=True,
        )  # fmt: skip
    stretched, shown = preprocess(anamorphic, output_dir=tmp_path), preprocess(square, output_dir=tmp_path)
    both = (stretched.track >= 0) & (shown.track >= 0)
    assert both.sum() > 60
    assert np.mean([psnr(stretched.crops[i], shown.crops[i]) for i in np.flatnonzero(both)]) > 24
    out = tmp_path / "dub.mp4"
    dub(anamorphic, media("en_short_voice_recording_22k05_mono_1.8s.m4a"), out, DubOptions(model=str(tiny), steps=1))
    assert probe_video(out).sar == Fraction(16, 11)
