"""`talkedit eval`: the reference metrics, the reconstruction protocol and its baselines, the report, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess

import numpy as np
import pytest
import torch

from talkedit.errors import WeightsError
from talkedit.evaluate import evaluate
from talkedit.holdout import HoldoutOptions, check_model, holdout

from .common import media, run_talkedit, talkedit_command
from .test_bad_input import lavfi

# A numpy warning in eval reaches the user's terminal as noise (a dub without a face once made nanstd warn).
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

GRID = "grid_lwbsza_female_360x288_25fps.mpg"
LONG = "lrs2_00016_male_looking_down_160x160_25fps.mp4"  # 11 s: long enough for the sync measure to speak


@pytest.fixture(scope="module")
def protocol(talkedit_home, tmp_path_factory):
    """The reconstruction protocol on a real clip, dubbing with the random-weight test model."""
    home, tiny = talkedit_home
    work = tmp_path_factory.mktemp("holdout")
    options = HoldoutOptions(model=str(tiny), tail_seconds=4.0, workdir=str(work), offline=True)
    return holdout(media(LONG), options)


def test_the_original_against_itself_is_perfect(protocol):
    original = protocol.cases["original"].reference
    assert original.psnr == math.inf and original.ssim == pytest.approx(1.0)
    assert original.lmd == 0 and original.jitter == pytest.approx(1.0) and original.colour_drift == 0
    assert original.outside_changed == 0 and original.outside_error == 0
    assert protocol.cases["original"].flags == []


def test_a_random_model_scores_clearly_worse_than_the_original(protocol):
    original, dub = protocol.cases["original"], protocol.cases["dub"]
    assert original.sync is not None and original.sync.confidence >= 2.0
    assert dub.sync is None or dub.sync.confidence < original.sync.confidence - 0.5
    assert dub.reference.psnr < 20 and dub.reference.lmd > 2
    # Worse than the baselines that keep a real mouth, too.
    assert dub.reference.psnr < protocol.cases["other moment"].reference.psnr
    assert dub.reference.lmd > protocol.cases["other moment"].reference.lmd
    assert any(flag.startswith(("weak sync", "no sync", "frozen")) for flag in dub.flags)


def test_a_frozen_mouth_is_flagged(protocol):
    frozen = protocol.cases["frozen mouth"]
    assert any(flag.startswith("frozen mouth") for flag in frozen.flags)
    assert frozen.reference.motion_ratio < 0.3
    assert not any(flag.startswith("frozen mouth") for flag in protocol.cases["other moment"].flags)


def test_baselines_change_nothing_outside_the_mouth(protocol):
    for name in ("frozen mouth", "other moment", "dub"):
        assert protocol.cases[name].reference.outside_changed == 0, name


def test_every_case_is_scored_on_the_tail(protocol):
    assert set(protocol.cases) == {"original", "frozen mouth", "other moment", "dub", "dub, unrelated speech",
                                   "dub, silence"}  # fmt: skip
    assert protocol.tail_frames == 100
    for case in protocol.cases.values():
        assert case.frames == protocol.tail_frames
    assert protocol.cases["dub, silence"].sync is None  # silence has nothing to follow
    json.dumps(protocol.to_json())  # all of it serialises


def test_eval_cli_table_json_and_report(talkedit_home, tmp_path):
    video = media(GRID)
    report = tmp_path / "report.png"
    done = run_talkedit("eval", str(video), "--reference", str(video), "--json", "--report", str(report), "--offline")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["reference"]["psnr"] == "inf" and summary["reference"]["lmd"] == 0
    assert len(summary["sync"]["curve"]) == 31
    assert "PSNR" in done.stderr and "LSE-C/D" in done.stderr
    import cv2

    image = cv2.imread(str(report))
    assert image is not None and image.shape[1] == 640 and image.shape[0] > 480


def test_lse_is_computed_with_installed_syncnet_weights(talkedit_home, tmp_path):
    from .test_syncnet import official_state

    weights = tmp_path / "syncnet_v2.model"
    torch.save(official_state(), weights)
    home = tmp_path / "home"
    home.mkdir()
    (home / "face-landmarker.task").write_bytes((talkedit_home[0] / "face-landmarker.task").read_bytes())
    env = {"TALKEDIT_HOME": str(home)}
    installed = run_talkedit("download-weights", "syncnet", "--from", str(weights), env=env)
    assert installed.returncode == 0, installed.stderr
    done = run_talkedit("eval", str(media(GRID)), "--json", "--offline", env=env)
    assert done.returncode == 0, done.stderr
    lse = json.loads(done.stdout)["lse"]
    assert np.isfinite(lse["lse_c"]) and lse["lse_c"] >= 0 and np.isfinite(lse["lse_d"]) and lse["lse_d"] > 0


def test_download_weights_refuses_a_foreign_syncnet_file(tmp_path):
    bogus = tmp_path / "syncnet_v2.model"
    torch.save({"something.else": torch.zeros(3)}, bogus)
    done = run_talkedit("download-weights", "syncnet", "--from", str(bogus), env={"TALKEDIT_HOME": str(tmp_path)})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert str(bogus) in done.stderr and "not SyncNet weights" in done.stderr
    assert not (tmp_path / "syncnet.model").exists()


def bad_case(kind: str, tmp, model: str):
    video = media(GRID)
    if kind == "no-face":
        pattern = lavfi(tmp / "pattern.mp4", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25:duration=2")
        return ["eval", str(pattern), "--speech", str(media("en_female_aoc_44k1_stereo.mp3"))], str(pattern)
    if kind == "no-audio":
        mute = lavfi(tmp / "mute.mp4", "-i", str(video), "-an", "-c:v", "libx264")
        return ["eval", str(mute)], str(mute)
    if kind == "reference-of-another-length":
        other = media("hdtf_RD_Radio10_male_glasses_512_29.97fps.mp4")
        return ["eval", str(video), "--reference", str(other)], str(other)
    if kind == "missing-reference":
        return ["eval", str(video), "--reference", str(tmp / "nowhere.mp4")], "nowhere.mp4"
    if kind == "report-not-png":
        return ["eval", str(video), "--report", str(tmp / "report.jpg")], "report.jpg"
    if kind == "nothing-to-judge":
        return ["eval"], "--holdout"
    if kind == "holdout-too-short":
        clip = media("hdtf_RD_Radio10_male_glasses_512_29.97fps.mp4")
        return ["eval", "--holdout", str(clip), "--model", model], "too short"
    if kind == "holdout-unknown-model":
        return ["eval", "--holdout", str(media(LONG)), "--model", "nothere"], "nothere"
    if kind == "holdout-missing-syncnet":
        missing = tmp / "syncnet_v2.model"
        return ["eval", "--holdout", str(media(LONG)), "--model", model, "--syncnet", str(missing)], "syncnet_v2.model"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["no-face", "no-audio", "reference-of-another-length", "missing-reference", "report-not-png", "nothing-to-judge",
     "holdout-too-short", "holdout-unknown-model", "holdout-missing-syncnet"],
)  # fmt: skip
def test_bad_input_gives_one_line_and_exit_1(talkedit_home, tmp_path, kind):
    args, named = bad_case(kind, tmp_path, str(talkedit_home[1]))
    done = run_talkedit(*args, "--offline")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], done.stderr
    # Nothing else but progress: a pipe gets plain lines ("Finding the face: 75/75 (100 %), ..."), not bars.
    others = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("error:")]
    assert all(re.match(r"[A-Z][\w -]*: \d+/\d+ \(\d+ %\)", line) for line in others), done.stderr
    if kind in ("holdout-unknown-model", "holdout-missing-syncnet"):
        assert others == [], "found before any analysis or dub, not after"


def test_evaluate_accepts_a_dub_shorter_than_its_reference(talkedit_home, tmp_path):
    """A dub of a speech shorter than the video is compared with the reference's first frames."""
    from .test_bad_input import lavfi as cut

    video = media(GRID)
    short = cut(tmp_path / "short.mp4", "-i", str(video), "-frames:v", "50", "-c:v", "libx264", "-crf", "0",
                "-c:a", "aac")  # fmt: skip
    result = evaluate(short, reference=video, offline=True)
    assert result.frames == 50 and result.reference.frames == 50
    assert result.reference.psnr > 40  # lossless picture; only rounding of the colour conversion differs


def test_silence_is_judged_by_whether_the_mouth_closes(protocol):
    silent_dub = protocol.cases["dub, silence"]
    assert silent_dub.silent
    assert not any(flag.startswith(("frozen", "weak sync", "no sync")) for flag in silent_dub.flags)
    # The original, talking, set against silence: its open mouth is flagged.
    work = protocol.cases["original"].video.parent
    talking = evaluate(work / "tail.mp4", work / "silence.wav", work / "tail.mp4", offline=True, allow_silence=True)
    assert talking.silent and talking.sync is None
    assert any(flag.startswith("open in silence") for flag in talking.flags), talking.flags


def test_holdout_checks_its_model_first_and_takes_an_official_checkpoint_only_to_fine_tune(official_dir):
    checkpoint = str(official_dir / "735_Network.pth")
    check_model(HoldoutOptions(model=checkpoint, train_steps=5, offline=True))  # training imports it
    with pytest.raises(WeightsError, match="not a talkedit weights file"):
        check_model(HoldoutOptions(model=checkpoint, offline=True))  # dub would refuse it after minutes of work


def test_holdout_fine_tunes_on_the_head_when_asked(talkedit_home, tmp_path):
    from talkedit.weights import read_weights

    clip = media("hdtf_WDA_AOC_female_512_25fps_mpeg4.mp4")
    quick = ["--train-steps", "2", "--train-batch", "2", "--tail", "2"]
    done = run_talkedit("eval", "--holdout", str(clip), "--model", str(talkedit_home[1]), *quick,
                        "--workdir", str(tmp_path), "--offline", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    tuned = tmp_path / "finetuned.safetensors"
    assert result["model"] == str(tuned) and result["head_frames"] == 150 and result["tail_frames"] == 50
    provenance = read_weights(tuned).provenance
    assert provenance["steps"] == 2 and provenance["batch"] == 2, provenance  # the dubs used the fine-tuned model
    assert result["cases"]["original"]["reference"]["psnr"] == "inf"  # the tail against itself


def test_sigterm_during_the_holdout_fine_tune_ends_eval_as_a_signal_does(talkedit_home, tmp_path):
    """The fine-tune catches SIGTERM to stop at a checkpoint; eval must then end as on any interruption (exit 143, its
    temporary files gone), not as a problem with the clip (exit 1)."""
    clip = media("hdtf_WDA_AOC_female_512_25fps_mpeg4.mp4")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    args = ["eval", "--holdout", str(clip), "--model", str(talkedit_home[1]), "--train-steps", "100000",
            "--train-batch", "1", "--tail", "2", "--offline"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "300", "TMPDIR": str(scratch)}
    proc = subprocess.Popen([*talkedit_command(), *args], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stderr:  # a pipe: each stage says it has begun in a plain line
            lines.append(line)
            if line.startswith("Training:"):
                proc.send_signal(signal.SIGTERM)
                break
        err = "".join(lines) + proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:  # a failed test must not leave a training running behind the others
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "stopped early" not in err, err
    # torch keeps its kernel cache in TMPDIR on purpose (torchinductor_USER); it is not talkedit's
    assert [p for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []


def test_train_batch_needs_train_steps(talkedit_home):
    done = run_talkedit("eval", "--holdout", str(media(LONG)), "--train-batch", "4", "--offline")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        "error: --train-batch sets the fine-tune of --holdout --train-steps N: give --train-steps too."
    ]


def test_chain_jump_is_the_mouths_change_at_chain_starts_over_its_change_elsewhere():
    from talkedit.generate import chain_jump, mouth_change

    level = np.arange(20) * 2  # the mouth changes by 2 levels a frame...
    level[10:] += 10  # ...and by 12 into frame 10, where a chain starts
    crops = np.broadcast_to(level.astype(np.uint8)[:, None, None, None], (20, 128, 128, 3)).copy()
    crops[:, :, :64] = np.arange(20)[:, None, None, None] * 9  # outside the mask: ignored
    masks = np.zeros((20, 128, 128), np.uint8)
    masks[:, :, 64:] = 1
    tracked = np.ones(20, bool)
    change = mouth_change(crops, masks, tracked)
    assert np.isnan(change[0]) and change[1:].tolist() == [2] * 9 + [12] + [2] * 9
    assert chain_jump(change, [10]) == pytest.approx(6.0)
    assert chain_jump(change, [5]) == pytest.approx(2 / ((2 * 17 + 12) / 18))
    assert chain_jump(change, []) is None
    tracked[9] = False  # no face just before the start: nothing to compare
    assert chain_jump(mouth_change(crops, masks, tracked), [10]) is None


def test_eval_finds_the_chain_starts_of_a_dub_made_with_other_chain_settings():
    from talkedit.audio import SAMPLE_RATE
    from talkedit.evaluate import _planned_chain_starts

    wav = np.random.default_rng(0).normal(0, 0.1, 30 * SAMPLE_RATE).astype(np.float32)
    track = np.zeros(750, np.int32)
    plain = _planned_chain_starts(track, wav, 25, overlap=0)
    assert plain[0] == 0 and 4 <= len(plain) <= 7  # 30 s in chains of about 5 s
    # With an overlap, every frame of each crossfade: the three before each split and the split itself.
    assert _planned_chain_starts(track, wav, 25, overlap=3) == [0] + [s - 3 + k for s in plain[1:] for k in range(4)]
    assert len(_planned_chain_starts(track, wav, 25, chain_seconds=1)) >= 20
