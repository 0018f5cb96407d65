"""`talkedit pack` and `talkedit train`: the data, the samples, learning, data-parallel equality, resuming, fine-tuning
an official checkpoint, and bad inputs. Real clips from ../shared/media, small models, CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import load_file

from talkedit.pack import MEL_STEP, build_pack, read_pack, split_pack
from talkedit.samples import TrainingData
from talkedit.train import SMALL, Recipe, Trainer, TrainError, TrainOptions, masked_loss, train
from talkedit.unet import UNetConfig

from .common import REPO, media, run_talkedit, talkedit_command

CLIPS = ["grid_lwbsza_female_360x288_25fps.mpg", "grid_swiz3n_black_male_360x288_25fps.mpg"]
# Fast enough for a few hundred steps on a CPU in a test; 128 px, as the pack's crops.
TEST_ARCH = UNetConfig(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(),
                       head_channels=16, norm_groups=8, dropout=0.0)  # fmt: skip


@pytest.fixture(scope="module")
def two_clips(talkedit_home, tmp_path_factory) -> Path:
    """A pack of two real GRID clips (3 s each, their own speech)."""
    folder = tmp_path_factory.mktemp("pack")
    return build_pack([media(c) for c in CLIPS], folder / "two.pack", analysis_dir=folder / "analysis", offline=True)


def test_pack_keeps_crops_masks_and_speech_features_of_the_clips(two_clips, talkedit_home):
    from talkedit.analysis import preprocess
    from talkedit.audio import frame_windows, mel_spectrogram
    from talkedit.media import decode_speech, read_audio

    pack = read_pack(two_clips)
    assert [c.name for c in pack.clips] == CLIPS
    for c, name in enumerate(CLIPS):
        analysis = preprocess(media(name), output_dir=two_clips.parent / "analysis", offline=True)
        rows = pack.clip == c
        assert (pack.frame[rows] == np.flatnonzero(analysis.tracked)).all()
        crops = np.asarray(analysis.crops)[pack.frame[rows]].astype(float)
        psnr = 10 * np.log10(255**2 / ((crops - pack.crops[rows]) ** 2).mean())
        assert psnr > 37, psnr  # visually lossless
        assert (pack.masks[rows] == np.asarray(analysis.masks)[pack.frame[rows]]).all()
        # The audio windows are dub's own, up to the 8-bit mel quantisation.
        wav = read_audio(decode_speech(media(name), two_clips.parent / "speech.wav"))
        windows = frame_windows(mel_spectrogram(wav), analysis.frame_count, analysis.video.fps)[pack.frame[rows]]
        assert np.abs(windows - pack.windows[rows]).max() <= MEL_STEP / 2 + 1e-4
    # 15 minutes of 25 fps footage must fit in 40 MiB.
    per_frame = two_clips.stat().st_size / len(pack)
    assert per_frame * 15 * 60 * 25 < 40 * 2**20, per_frame


def test_pack_is_read_and_trained_on_with_only_torch_numpy_safetensors_and_opencv(two_clips, tmp_path):
    """What the GPU machines offer: no mediapipe, librosa, typer, rich or ffmpeg binary (`python -m talkedit.train`)."""
    script = """
import runpy, sys
for name in ("mediapipe", "librosa", "typer", "rich", "imageio_ffmpeg", "ffmpeg", "huggingface_hub"):
    sys.modules[name] = None  # importing any of them now fails
sys.argv = ["talkedit.train", *sys.argv[1:]]
runpy.run_module("talkedit.train", run_name="__main__")
"""
    args = [
        str(two_clips),
        "-o",
        str(tmp_path / "m.safetensors"),
        "--arch",
        "small",
        "--steps",
        "2",
        "--batch",
        "2",
        "--eval-every",
        "2",
        "--eval-samples",
        "2",
        "--strip-frames",
        "2",
        "--strip-steps",
        "2",
        "--log-every",
        "1",
    ]
    env = {**os.environ, "PATH": "/nonexistent", "TALKEDIT_FFMPEG": "/nonexistent/ffmpeg"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train 2/2" in proc.stderr and "audio-shift ratio" in proc.stderr and "done: 2 steps" in proc.stderr
    assert (tmp_path / "m.safetensors").is_file() and (tmp_path / "m.train" / "train.png").is_file()


def test_validation_is_split_by_clip_or_by_time_for_one_clip(two_clips, tmp_path):
    pack = read_pack(two_clips)
    split = split_pack(pack)
    assert set(pack.clip[split.train]) == {0} and set(pack.clip[split.val]) == {1}
    assert split.describe(pack)["val_clips"] == [CLIPS[1]]
    one = build_pack([media(CLIPS[0])], tmp_path / "one.pack", analysis_dir=two_clips.parent / "analysis", offline=True)
    single = read_pack(one)
    split = split_pack(single, 0.2)
    assert single.frame[split.train].max() < single.frame[split.val].min()  # a contiguous tail
    assert abs(len(split.val) - 0.2 * len(single)) <= 1
    assert split.describe(single)["by"] == "time"


def test_samples_pair_each_frame_with_its_predecessor_and_a_distant_identity(two_clips):
    pack = read_pack(two_clips)
    split = split_pack(pack)
    data = TrainingData(pack, split, torch.device("cpu"), identity_gap=1.0)
    prev = pack.predecessor()
    has = prev >= 0
    assert (pack.frame[prev[has]] == pack.frame[has] - 1).all() and (pack.clip[prev[has]] == pack.clip[has]).all()
    assert (data.previous[~has] == np.flatnonzero(~has)).all()  # a shot's first frame conditions on itself
    rng = np.random.default_rng(0)
    index = rng.choice(split.train, 200)
    identity = data.identity(index, rng.random(200), "train")
    assert (pack.clip[identity] == pack.clip[index]).all()
    assert (np.abs(pack.frame[identity] - pack.frame[index]) >= 25).all()  # >= 1 s at 25 fps
    assert np.isin(identity, split.train).all()  # training never looks at validation frames


def test_masked_loss_counts_only_the_mask_and_weights_by_min_snr():
    eps = torch.zeros(2, 3, 4, 4)
    pred = torch.ones(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 2:] = 1
    pred[:, :, :2] = 100  # outside the mask: ignored
    alpha_bar = torch.tensor([0.5, 0.99])  # SNR 1 and 99
    assert masked_loss(pred, eps, mask, alpha_bar, 0) == pytest.approx(1.0)
    assert masked_loss(pred, eps, mask, alpha_bar, 5.0) == pytest.approx((1 + 5 / 99) / 2)
    assert masked_loss(pred, eps, mask, alpha_bar, 5.0, "v") == pytest.approx((1 / 2 + 5 / 100) / 2)  # γ/(SNR+1)


def test_from_scratch_the_model_predicts_v_by_default_and_says_so_in_its_weights(two_clips, tmp_path):
    from talkedit.weights import load_model

    options = TrainOptions(steps=3, batch=2, arch=TEST_ARCH, eval_every=3, eval_samples=4, strip_frames=2,
                           strip_steps=2)  # fmt: skip
    result = train([two_clips], tmp_path / "v.safetensors", options)
    assert load_model(result.output, device="cpu").diffusion.prediction == "v"
    assert np.isfinite(result.last_eval["val_error"]) and np.isfinite(result.last_eval["val_sampled_error"])
    fine = TrainOptions(steps=1, batch=2, init=str(result.output), prediction="eps", eval_every=0)
    with pytest.raises(TrainError, match="predicts v"):
        train([two_clips], tmp_path / "eps.safetensors", fine)


def _train_progress(two_clips: Path, tmp_path: Path, options: TrainOptions) -> list[tuple[int, str | None]]:
    """Train with `options` and return the (done, note) of every progress call of the "train" stage."""
    calls = []

    def progress(stage: str, done: int, total: int, note: str | None = None) -> None:
        if stage == "train":
            calls.append((done, note))

    train([two_clips], tmp_path / "m.safetensors", options, progress=progress)
    return calls


def test_progress_says_it_is_validating_before_the_slow_evaluation(two_clips, tmp_path):
    """On a CPU the sampled strip alone takes minutes at step 0: the row must say why no step moves."""
    options = TrainOptions(steps=2, batch=2, arch=TEST_ARCH, eval_every=2, eval_samples=2, strip_frames=2,
                           strip_steps=2, log_every=1)  # fmt: skip
    notes = _train_progress(two_clips, tmp_path, options)
    scored = [i for i, (_, note) in enumerate(notes) if note and note.startswith("val ")]
    assert [notes[i][0] for i in scored] == [0, 2], notes
    assert all(notes[i - 1] == (notes[i][0], "validating, sampling 2 mouths") for i in scored), notes


@pytest.mark.parametrize("amx", [True, False], ids=["cpu with AMX", "cpu without"])
def test_auto_precision_is_bf16_on_cuda_and_on_a_cpu_with_bf16_matrix_units(monkeypatch, amx):
    from talkedit import diffusion
    from talkedit.train import _autocast_dtype

    monkeypatch.setattr(diffusion, "cpu_has_bf16_matrix_units", lambda: amx)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _autocast_dtype("auto", cpu) == (torch.bfloat16 if amx else None)
    assert _autocast_dtype("auto", cuda) == torch.bfloat16
    assert _autocast_dtype("bf16", cpu) == torch.bfloat16  # asked for: even where it is emulated
    assert _autocast_dtype("fp32", cuda) is None
    with pytest.raises(TrainError, match="--precision 'fp16'"):
        _autocast_dtype("fp16", cpu)


@pytest.mark.parametrize(
    "precision, channels_last, expected",
    [("bf16", None, True), ("fp32", None, False), ("fp32", True, True), ("bf16", False, False)],
)  # fmt: skip
def test_a_cpu_trains_in_channels_last_in_bf16_or_when_told(two_clips, tmp_path, monkeypatch, precision,
                                                             channels_last, expected):  # fmt: skip
    from talkedit.unet import UNet

    seen = []
    forward = UNet.forward

    def spy(self, x, *args, **kwargs):
        if self.training:
            weights = [p for p in self.parameters() if p.dim() == 4]
            layout = all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
            seen.append((layout, x.is_contiguous(memory_format=torch.channels_last)))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", spy)
    options = TrainOptions(steps=2, batch=2, arch=TEST_ARCH, eval_every=0, channels_last=channels_last, device="cpu",
                           precision=precision)  # fmt: skip
    train([two_clips], tmp_path / "m.safetensors", options)
    assert seen and set(seen) == {(expected, expected)}, seen


def test_progress_counts_every_step_and_notes_the_loss_at_log_steps(two_clips, tmp_path):
    """The ETA must not wait for the first log step (10 steps of a minute each on a CPU)."""
    options = TrainOptions(steps=3, batch=2, arch=TEST_ARCH, eval_every=0, log_every=2)
    calls = _train_progress(two_clips, tmp_path, options)
    assert [done for done, _ in calls] == [1, 2, 3], calls
    assert calls[0][1] is None and all(note.startswith("loss ") for _, note in calls[1:]), calls


def test_samples_per_second_counts_the_steps_not_the_validation_or_the_checkpoints(two_clips, tmp_path, monkeypatch):
    """On a CPU a validation takes minutes; the rate logged after it must still be the steps' own, not the steps' and
    the validation's (a one-step run of the paper's UNet on a CPU logged 0.077 samples/s, its step-0 validation
    included, where benchmarks/train.py times its steps at 0.58)."""
    pause, step_seconds = 1.5, []
    evaluate, save, step = Trainer._evaluate, Trainer.save_checkpoint, Trainer.train_step

    def slow_evaluate(self, metrics):
        time.sleep(pause)
        return evaluate(self, metrics)

    def slow_save(self, seconds):
        time.sleep(pause)
        save(self, seconds)

    def timed_step(self, index):
        t = time.perf_counter()
        loss = step(self, index)
        step_seconds.append(time.perf_counter() - t)
        return loss

    monkeypatch.setattr(Trainer, "_evaluate", slow_evaluate)
    monkeypatch.setattr(Trainer, "save_checkpoint", slow_save)
    monkeypatch.setattr(Trainer, "train_step", timed_step)
    options = TrainOptions(steps=4, batch=2, arch=TEST_ARCH, eval_every=2, eval_samples=2, strip_frames=0,
                           log_every=2, checkpoint_every=1)  # fmt: skip
    result = train([two_clips], tmp_path / "m.safetensors", options)
    records = [json.loads(line) for line in (result.workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    # Each log window holds two steps, and a validation (step 0, 2) or a checkpoint (every step) ran before each.
    assert len(rates) == 2 and len(step_seconds) == 4
    for rate, seconds in zip(rates, (step_seconds[:2], step_seconds[2:]), strict=True):
        steps_alone = 2 * options.batch / sum(seconds)
        assert steps_alone / 2 < rate <= steps_alone * 1.01, (rates, step_seconds)


@pytest.mark.parametrize("shuffle", [False, True])
def test_the_shuffled_audio_control_hears_the_batch_s_audio_in_another_order(shuffle, two_clips, tmp_path):
    pack = read_pack(two_clips)
    options = TrainOptions(batch=8, arch=TEST_ARCH, recipe=Recipe(audio_dropout=0, shuffle_audio=shuffle),
                           device="cpu", workdir=str(tmp_path))  # fmt: skip
    trainer = Trainer(pack, split_pack(pack), tmp_path / "m.safetensors", options)
    heard = []
    network = trainer.network
    trainer.network = lambda x, gamma, audio, dropped: heard.append(audio) or network(x, gamma, audio, dropped)
    trainer.train_step(3)
    own = trainer.data.audio(trainer.batches.indices(3))
    if not shuffle:
        torch.testing.assert_close(heard[0], own, atol=0, rtol=0)
        return
    assert not torch.equal(heard[0], own)
    # The same windows, each heard by another sample: a permutation of the rows.
    order = [next(i for i in range(len(own)) if torch.equal(own[i], row)) for row in heard[0]]
    assert sorted(order) == list(range(len(own))) and order != list(range(len(own)))


def test_a_few_hundred_steps_learn_to_denoise_the_held_out_clip(two_clips, tmp_path):
    """From scratch on one clip, validated on the other person: the error falls well below the untrained model's."""
    from talkedit.weights import load_model

    options = TrainOptions(steps=200, batch=4, arch=TEST_ARCH, recipe=Recipe(lr=1e-3), eval_every=200,
                           eval_samples=16, strip_frames=3, strip_steps=3, log_every=20)  # fmt: skip
    result = train([two_clips], tmp_path / "m.safetensors", options)
    records = [json.loads(line) for line in (result.workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_error" in r]
    assert [r["step"] for r in evals] == [0, 200]
    assert evals[1]["val_error"] < 0.5 * evals[0]["val_error"], evals
    # Sampled from pure noise too: the untrained model (ε = 0) leaves saturated noise in the mask.
    assert [len(r["val_sampled_error_by_frame"]) for r in evals] == [3, 3]
    assert evals[1]["val_sampled_error"] < 0.5 * evals[0]["val_sampled_error"], evals
    assert (result.workdir / "train.png").is_file() and (result.workdir / "samples-0000200.png").is_file()
    model = load_model(result.output, device="cpu")
    assert model.config == TEST_ARCH
    provenance = model.provenance
    assert provenance["steps"] == 200 and provenance["weights"] == "ema"
    assert provenance["data"]["split"]["val_clips"] == [CLIPS[1]]
    assert [c["sha256"] for c in provenance["data"]["clips"]] == [c.sha256 for c in read_pack(two_clips).clips]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _max_difference(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


# fp32: a subprocess does not see the suite's pin of the CPU's AMX check (conftest.py), and the tolerances below are
# fp32's.
# On a CPU: a resumed run repeats an uninterrupted one bit for bit there (CUDA's kernels need not be deterministic), and
# torchrun's two processes share it where a machine has one GPU.
TRAIN_ARGS = ["--arch", "small", "--eval-every", "0", "--dropout", "0", "--quiet", "--no-ema", "--precision", "fp32",
              "--device", "cpu"]  # fmt: skip


def test_two_processes_under_torchrun_match_one_process_with_the_same_global_batch(two_clips, tmp_path):
    """Tolerance: 2e-5 after 3 AdamW steps at lr 1e-4 (the order of the gradient sum differs); the same run with
    another global batch differs by far more."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "talkedit"]
    args = ["train", str(two_clips), "--steps", "3", *TRAIN_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([*torchrun, *args, "--batch", "4", "-o", str(tmp_path / "two.safetensors")],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_talkedit(*args, "--batch", "4", "-o", str(tmp_path / "one.safetensors"))
    assert one.returncode == 0, one.stderr
    other = run_talkedit(*args, "--batch", "2", "-o", str(tmp_path / "other.safetensors"))
    assert other.returncode == 0, other.stderr
    same = _max_difference(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    different = _max_difference(tmp_path / "one.safetensors", tmp_path / "other.safetensors")
    assert same < 2e-5, same
    assert different > 10 * same and different > 1e-5, (same, different)


def test_sigterm_saves_a_checkpoint_and_resuming_ends_where_an_uninterrupted_run_ends(two_clips, tmp_path):
    args = ["train", str(two_clips), "--steps", "10", "--batch", "2", "--checkpoint-every", "1", *TRAIN_ARGS]
    whole = run_talkedit(*args, "-o", str(tmp_path / "whole.safetensors"))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "cut.safetensors"
    proc = subprocess.Popen([*talkedit_command(), *args, "-o", str(out)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "300"})  # fmt: skip
    checkpoint = tmp_path / "cut.train" / "checkpoint.pt"
    try:
        deadline = time.time() + 300
        while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # a failed test must not leave a training running behind the others
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert not out.exists()
    steps_done = torch.load(checkpoint, weights_only=True)["step"]
    assert 1 <= steps_done < 10, steps_done
    assert "--resume" in err and "Stopped" in err

    resumed = run_talkedit(*args, "-o", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    wa, wb = _weights(tmp_path / "whole.safetensors"), _weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit for bit


def test_a_checkpoint_from_before_prediction_was_a_setting_resumes_as_the_eps_run_it_was(two_clips, tmp_path):
    """Settings added to TrainOptions later (here `prediction`) read as unset in older checkpoints; such a run learned
    ε (the default then), and it goes on learning ε although v is now the default."""
    from talkedit.weights import load_model

    options = TrainOptions(steps=4, batch=2, arch=TEST_ARCH, eval_every=0, checkpoint_every=100)
    cut = train([two_clips], tmp_path / "m.safetensors", replace(options, prediction="eps", time_limit=1e-4))
    checkpoint = cut.workdir / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    assert json.loads(state["diffusion_config"])["prediction"] == "eps"
    del state["identity"]["prediction"]  # as an older talkedit wrote it
    torch.save(state, checkpoint)
    with pytest.raises(TrainError, match=r"other settings \(prediction\)"):
        train([two_clips], tmp_path / "m.safetensors", replace(options, resume=True, prediction="v"))
    resumed = train([two_clips], tmp_path / "m.safetensors", replace(options, resume=True))
    assert resumed.steps_done == 4
    assert load_model(resumed.output, device="cpu").diffusion.prediction == "eps"


def test_time_limit_stops_at_a_checkpoint_and_the_resumed_run_is_the_uninterrupted_one(two_clips, tmp_path):
    def options(**changes) -> TrainOptions:
        base = dict(steps=6, batch=2, arch=TEST_ARCH, eval_every=0, checkpoint_every=100, device="cpu")  # bit for bit
        return TrainOptions(**{**base, **changes})

    whole = train([two_clips], tmp_path / "whole.safetensors", options())
    cut = train([two_clips], tmp_path / "cut.safetensors", options(time_limit=1e-4))
    assert cut.stopped == "time limit" and cut.output is None and cut.steps_done < 6
    resumed = train([two_clips], tmp_path / "cut.safetensors", options(resume=True, steps=None))  # its own length
    assert resumed.steps_done == 6
    wa, wb = _weights(whole.output), _weights(resumed.output)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_time_limit_leaves_room_for_an_evaluation_that_is_due(two_clips, tmp_path, monkeypatch):
    """A validation takes minutes on a CPU: the run must not start one that would end past --time-limit. On a clock
    that steps take 10 s of and a validation 100 s, a 200 s limit stops after step 4 (140 s), not after step 5's
    validation (250 s)."""
    from talkedit import train as train_module

    class Clock:
        now = 0.0

        def perf_counter(self) -> float:
            return self.now

    clock, save = Clock(), Trainer.save_checkpoint

    def step(self, index):
        clock.now += 10
        return torch.tensor(0.0)

    def evaluate(self, metrics):
        clock.now += 100

    def save_checkpoint(self, seconds):
        clock.now += 1
        save(self, seconds)

    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(Trainer, "_evaluate", evaluate)
    monkeypatch.setattr(Trainer, "save_checkpoint", save_checkpoint)
    options = TrainOptions(steps=20, batch=2, arch=TEST_ARCH, eval_every=5, checkpoint_every=0, time_limit=200 / 60)
    result = train([two_clips], tmp_path / "m.safetensors", options)
    assert result.stopped == "time limit" and result.steps_done == 4 and result.seconds <= 200, result


@pytest.mark.parametrize("at_step", [0, 2])
def test_a_signal_during_a_validation_cuts_it_short_and_stops_at_a_checkpoint(at_step, two_clips, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    """A validation is minutes of UNet calls on a CPU, longer than a batch system waits after SIGTERM: it must stop
    at its next UNet call, before the first step when it is the step-0 one."""
    from talkedit import train as train_module
    from talkedit.unet import UNet

    calls, validate, forward = (
        {"validation": 0, "unet after the signal": 0},
        train_module.validation_error,
        UNet.forward,
    )

    def signalled_validation(model, *args, **kwargs):
        calls["validation"] += 1
        if calls["validation"] == 1 + at_step // 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler notes it; the validation must not go on
            calls["signalled"] = True
        return validate(model, *args, **kwargs)

    def counting_forward(self, *args, **kwargs):
        if calls.get("signalled"):
            calls["unet after the signal"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(train_module, "validation_error", signalled_validation)
    monkeypatch.setattr(UNet, "forward", counting_forward)
    options = TrainOptions(steps=6, batch=2, arch=TEST_ARCH, eval_every=2, eval_samples=4, strip_frames=2,
                           strip_steps=20, checkpoint_every=100)  # fmt: skip
    result = train([two_clips], tmp_path / "m.safetensors", options)
    assert result.stopped == "signal" and result.steps_done == at_step and result.output is None, result
    assert calls["unet after the signal"] == 0, calls
    assert torch.load(result.workdir / "checkpoint.pt", weights_only=True)["step"] == at_step
    log = result.workdir / "metrics.jsonl"  # none at all when stopped in the step-0 validation
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert at_step not in [r["step"] for r in records if "val_error" in r], records  # no half validation
    assert not (result.workdir / f"samples-{at_step:07d}.png").exists()


def test_fine_tuning_an_official_checkpoint_gives_a_model_that_dubs(two_clips, official_dir, talkedit_home, tmp_path):
    checkpoint = official_dir / "735_Network.pth"
    model = tmp_path / "me.safetensors"
    proc = run_talkedit("train", str(two_clips), "-o", str(model), "--init", str(checkpoint), "--steps", "2",
                        "--batch", "2", "--eval-every", "2", "--eval-samples", "2", "--strip-frames", "1", "--quiet",
                        timeout=900)  # the full UNet: about 1.4 s per frame and step on a 2-core CPU  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from talkedit.checkpoint import import_checkpoint
    from talkedit.weights import load_model, read_weights

    import_checkpoint(checkpoint, tmp_path / "official.safetensors")
    before, after = read_weights(tmp_path / "official.safetensors"), read_weights(model)
    assert after.unet_config == before.unet_config
    moved = [k for k in before.state_dict if not torch.equal(before.state_dict[k], after.state_dict[k])]
    assert len(moved) > 0.9 * len(before.state_dict)  # it trained
    assert after.provenance["init"]["from"] == str(checkpoint)
    assert load_model(model, device="cpu").diffusion == before.diffusion_config

    video = tmp_path / "dubbed.mp4"
    dub = run_talkedit("dub", str(media(CLIPS[0])), str(media("en_short_voice_recording_22k05_mono_1.8s.m4a")),
                       "-o", str(video), "--model", str(model), "--steps", "1", "--guidance", "2", "--offline",
                       "--quiet", "--analysis-dir", str(two_clips.parent / "analysis"))  # fmt: skip
    assert dub.returncode == 0, dub.stderr
    assert video.stat().st_size > 10_000


def _lavfi(path: Path, *source: str) -> Path:
    from talkedit.media import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *source, str(path)], check=True)
    return path


@pytest.mark.parametrize("kind", ["video-without-audio", "no-face", "empty-folder", "pack-of-another-version"])
def test_bad_training_input_is_one_line_exit_1_and_no_output(kind, two_clips, talkedit_home, tmp_path):
    if kind == "video-without-audio":
        given = _lavfi(tmp_path / "mute.mp4", "-i", str(media(CLIPS[0])), "-an", "-c:v", "libx264")
    elif kind == "no-face":
        given = _lavfi(tmp_path / "pattern.mp4", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25:duration=2",
                       "-f", "lavfi", "-i", "sine=frequency=300:duration=2", "-shortest")  # fmt: skip
    elif kind == "empty-folder":
        given = tmp_path / "clips"
        given.mkdir()
    else:
        given = tmp_path / "old.pack"
        with safe_open(str(two_clips), framework="np") as f:
            meta = {**f.metadata(), "pack_version": "0"}
            save_file({k: f.get_tensor(k) for k in f.keys()}, str(given), metadata=meta)
    output = tmp_path / "m.safetensors"
    proc = run_talkedit("train", str(given), "-o", str(output), "--arch", "small", "--steps", "1", "--offline")
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(given) in lines[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == lines[0]  # the last word, after any progress bar
    assert "Traceback" not in proc.stderr
    assert not output.exists() and not (tmp_path / "m.train").exists()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("nowhere/m.safetensors", "nowhere does not exist; create it"), ("folder.safetensors", "is a folder"),
     ("m.pt", "name it NAME.safetensors")],
)  # fmt: skip
def test_a_bad_output_path_is_named_before_any_work(name, expected, tmp_path):
    """The model's path is checked before the inputs are read (none exist here), and the error says what to do."""
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(TrainError, match=expected):
        train([tmp_path / "absent.pack"], tmp_path / name, TrainOptions(steps=1, arch=TEST_ARCH, eval_every=0))
    assert not (tmp_path / "nowhere").exists()


_FAULTS = """
import resource, sys
import torch
from talkedit.train import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(2):  # warm up: the first buffer is faulted in either way
    torch.ones(64 << 20, dtype=torch.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(64 << 20, dtype=torch.uint8)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_training_on_a_cpu_keeps_large_freed_buffers_instead_of_faulting_them_in_again():
    """A 64 MiB buffer freed and allocated again: by default glibc maps it afresh each time (16,384 page faults of
    4 KiB), after keep_freed_memory() it comes from the heap (0 faults in most runs; one buffer's worth where a small
    allocation split the freed one). And a user's own MALLOC_ setting is left as it is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(how: str, **extra: str) -> tuple[str, int]:
        proc = subprocess.run([sys.executable, "-c", _FAULTS, how], capture_output=True, text=True, check=True,
                              env={**env, **extra})  # fmt: skip
        took, count = proc.stdout.split()
        return took, int(count)

    took, kept = faults("keep")
    _, default = faults("default")
    assert took == "True"
    assert default > 10 * 16_384 * 0.9, default  # each of the 10 faulted in again
    assert kept < default / 4, (kept, default)
    assert faults("keep", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"


def test_freed_memory_is_kept_only_where_there_is_room_for_it(tmp_path):
    from talkedit.train import available_memory, room_to_keep_freed_memory

    meminfo = tmp_path / "meminfo"
    for available_gib, batch, room in ((20, 32, True), (18, 32, False), (16, 24, True), (3, 2, True), (2, 2, False)):
        meminfo.write_text(f"MemTotal:       32000000 kB\nMemAvailable:   {available_gib << 20} kB\n")
        assert available_memory(meminfo) == available_gib << 30
        assert room_to_keep_freed_memory(batch, available_memory(meminfo)) is room, (available_gib, batch)
    # Where the step's peak with it was measured, that decides: it must fit.
    assert room_to_keep_freed_memory(32, 20 << 30, need=(20 << 30) + 1) is False
    assert room_to_keep_freed_memory(32, 18 << 30, need=18 << 30) is True
    meminfo.write_text("MemTotal:       32000000 kB\n")  # no MemAvailable (kernels before 3.14)
    assert available_memory(meminfo) is None and room_to_keep_freed_memory(1, None) is False
    assert available_memory(tmp_path / "absent") is None


@pytest.mark.parametrize("processes", [1, 2])
def test_a_cpu_run_that_will_not_fit_in_memory_is_told_the_batch_that_does(processes):
    from talkedit.train import cpu_memory_warning

    dve = UNetConfig(dropout=0.0)  # the paper's UNet, whatever its dropout
    available = 16 * 10**9
    warning = cpu_memory_warning(dve, "fp32", 32, processes, True, available)
    assert warning and "--batch 32" in warning and "16.0 GB is available" in warning, warning

    def fits_in(warning: str) -> int:
        return int(re.search(r"--batch (\d+) fits", warning).group(1))

    fits = fits_in(warning)
    assert 4 <= fits < 32 and fits % processes == 0, warning
    assert cpu_memory_warning(dve, "fp32", fits, processes, True, available) is None
    assert cpu_memory_warning(dve, "fp32", fits + processes, processes, True, available) is not None
    # Without freed memory kept, and in bf16, a sample takes less: more fits.
    for less in (cpu_memory_warning(dve, "fp32", 32, processes, False, available),
                 cpu_memory_warning(dve, "bf16", 32, processes, True, available)):  # fmt: skip
        assert less is None or fits_in(less) > fits, less
    assert "even --batch 1" in cpu_memory_warning(dve, "fp32", 4, processes, True, 10**8)
    assert cpu_memory_warning(SMALL, "fp32", 32, processes, True, available) is None  # a small UNet fits
    unmeasured = replace(SMALL, base_channels=64)
    assert cpu_memory_warning(unmeasured, "fp32", 32, processes, True, 10**8) is None
    assert cpu_memory_warning(SMALL, "bf16", 32, processes, True, 10**8) is None  # the small UNet with AMX: unmeasured
    # Emulated bf16 (a CPU without AMX) takes more than AMX's.
    amx, emulated = (cpu_memory_warning(dve, p, 32, processes, True, available) for p in ("bf16", "bf16-emulated"))
    assert emulated and amx and fits_in(emulated) < fits_in(amx), (emulated, amx)
    assert cpu_memory_warning(dve, "fp32", 32, processes, True, None) is None  # the kernel does not say


def test_a_cpu_trainer_warns_when_the_batch_will_not_fit(two_clips, tmp_path, monkeypatch, caplog):
    from talkedit import train as train_module

    monkeypatch.setattr(train_module, "available_memory", lambda: 3 * 10**8)
    pack = read_pack(two_clips)
    with caplog.at_level("WARNING", logger="talkedit"):
        Trainer(pack, split_pack(pack), tmp_path / "m.safetensors", TrainOptions(batch=4, arch=SMALL, device="cpu"))
    assert any("training at --batch 4 on this CPU" in r.getMessage() for r in caplog.records), caplog.text


def test_every_named_architecture_has_measured_cpu_memory():
    from talkedit.train import ARCHITECTURES, CPU_STEP_MIB

    assert {arch for arch, _ in CPU_STEP_MIB} == set(ARCHITECTURES)
    assert {precision for _, precision in CPU_STEP_MIB} == {"fp32", "bf16", "bf16-emulated"}
    for fixed, per_kept, per_freed in CPU_STEP_MIB.values():
        assert fixed > 0 and per_kept > per_freed > 0


@pytest.mark.parametrize(
    ("precision", "amx", "computes"),
    [("bf16", False, "bf16-emulated"), ("bf16", True, "bf16"), ("auto", False, "fp32")],
    ids=["bf16 emulated", "bf16 with AMX", "auto without AMX"],
)
def test_a_cpu_trainer_says_when_its_bf16_is_emulated(precision, amx, computes, two_clips, tmp_path, monkeypatch,
                                                       caplog):  # fmt: skip
    from talkedit import diffusion
    from talkedit import train as train_module
    from talkedit.train import step_memory

    monkeypatch.setattr(diffusion, "cpu_has_bf16_matrix_units", lambda: amx)
    needs = []
    monkeypatch.setattr(train_module, "room_to_keep_freed_memory", lambda batch, available, need: needs.append(need))
    pack = read_pack(two_clips)
    options = TrainOptions(batch=2, arch=SMALL, device="cpu", precision=precision)
    with caplog.at_level("WARNING", logger="talkedit"):
        trainer = Trainer(pack, split_pack(pack), tmp_path / "m.safetensors", options)
    assert trainer.autocast == (None if computes == "fp32" else torch.bfloat16)
    said = [r.getMessage() for r in caplog.records if "matrix units" in r.getMessage()]
    assert len(said) == (computes == "bf16-emulated"), caplog.text
    assert all("slower than in fp32" in m and "--precision fp32" in m for m in said)
    # Its memory is judged by the figures of what that CPU does (the small UNet in AMX's bf16 has none: None).
    assert needs == [step_memory(SMALL, computes, 2, 1, kept=True)]
    assert (needs[0] is None) is (computes == "bf16")


def test_a_run_leaves_the_process_group_it_created_and_only_that(two_clips, tmp_path, monkeypatch):
    """A gloo group left to the interpreter's exit can abort the process there (SIGABRT after a finished torchrun
    run, seen once in CI); a group the caller created is the caller's. One real process group of one gloo process."""
    import socket

    import torch.distributed as dist

    from talkedit import train as train_module
    from talkedit.train import Processes

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = TrainOptions(steps=1, batch=2, arch=TEST_ARCH, eval_every=0)
    for owns in (True, False):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        monkeypatch.setattr(
            train_module.Processes, "from_env", classmethod(lambda cls, owns=owns: cls(owns_group=owns))
        )
        try:
            train([two_clips], tmp_path / f"{owns}.safetensors", options)
            assert dist.is_initialized() is not owns
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    assert Processes.from_env() == Processes()  # one process, no torchrun: no group at all


def test_trainer_refuses_a_batch_that_does_not_split_over_the_processes(two_clips, tmp_path):
    from talkedit.train import Processes, TrainError

    pack = read_pack(two_clips)
    with pytest.raises(TrainError, match="multiple of the 2 processes"):
        Trainer(pack, split_pack(pack), tmp_path / "m.safetensors", TrainOptions(batch=3, arch=SMALL),
                Processes(rank=0, world=2))  # fmt: skip


@pytest.mark.parametrize("room", [True, False])
def test_a_cpu_trainer_keeps_freed_memory_where_there_is_room(room, two_clips, tmp_path, monkeypatch):
    from talkedit import train as train_module
    from talkedit.train import step_memory

    asked, kept = [], []
    monkeypatch.setattr(train_module, "available_memory", lambda: 12345)
    monkeypatch.setattr(
        train_module,
        "room_to_keep_freed_memory",
        lambda batch, available, need: asked.append((batch, available, need)) or room,
    )
    monkeypatch.setattr(train_module, "keep_freed_memory", lambda: kept.append(True) or True)
    pack = read_pack(two_clips)
    Trainer(pack, split_pack(pack), tmp_path / "m.safetensors", TrainOptions(batch=4, arch=SMALL, device="cpu"))
    assert asked == [(4, 12345, step_memory(SMALL, "fp32", 4, 1, kept=True))]  # the small UNet's measured need
    assert kept == ([True] if room else [])


def test_train_benchmark_prints_its_table_on_cpu():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), "--quick", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples/s" in proc.stdout and "cpu" in proc.stdout


def test_guidance_is_refused_for_a_model_trained_without_audio_dropout(talkedit_home, tmp_path):
    _, tiny = talkedit_home
    out = tmp_path / "out.mp4"
    proc = run_talkedit("dub", str(media(CLIPS[0])), str(media("en_short_voice_recording_22k05_mono_1.8s.m4a")),
                        "-o", str(out), "--model", str(tiny), "--guidance", "2", "--offline")  # fmt: skip
    assert proc.returncode == 1 and "audio dropout" in proc.stderr and not out.exists(), proc.stderr


@pytest.mark.parametrize("option", [["--steps", "0"], ["--audio-dropout", "1.5"], ["--lr", "-1"], ["--batch", "0"]])
def test_bad_training_options_are_usage_errors(option, two_clips, tmp_path):
    output = tmp_path / "m.safetensors"
    proc = run_talkedit("train", str(two_clips), "-o", str(output), "--arch", "small", *option)
    assert proc.returncode == 2 and f"'{option[0]}'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not output.exists()
