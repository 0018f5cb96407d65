from __future__ import annotations

import inspect
import io
import re
import subprocess
import sys
from pathlib import Path

from rich.text import Text
from typer.testing import CliRunner

import talkedit
from talkedit.cli import StageProgress, app

from .common import run_talkedit

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"talkedit {talkedit.__version__}"


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "talkedit", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"talkedit {talkedit.__version__}"


def test_help_lists_the_commands_and_needs_no_torch():
    code = "import sys; from talkedit.cli import app; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "import-weights" in result.output


def test_usage_errors_exit_2():
    result = runner.invoke(app, ["import-weights"])
    assert result.exit_code == 2


def test_every_command_has_help_with_an_example_and_sentences_unbroken():
    for info in app.registered_commands:
        command = info.name or info.callback.__name__
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "1000"})
        assert result.exit_code == 0 and "Example" in result.output, command
        # On a wide terminal each paragraph of the docstring is one line: no line breaks from the source's wrapping.
        lines = [" ".join(line.split()) for line in result.output.splitlines()]
        for paragraph in inspect.getdoc(info.callback).split("\n\n"):
            assert " ".join(Text.from_markup(paragraph).plain.split()) in lines, (command, paragraph)


def test_dub_help_states_the_defaults_dub_uses():
    """The help spells out defaults that live in the library (the CLI does not import it, to stay instant); a
    changed default must change its help too."""
    from talkedit import generate, pipeline

    result = runner.invoke(app, ["dub", "--help"], env={"COLUMNS": "1000"})
    text = " ".join(result.output.split())
    assert f"(default: {pipeline.CUDA_BATCH} on CUDA, {pipeline.CPU_BATCH} on CPU)" in text
    assert f"side by side (default {generate.CHAIN_SECONDS:g})" in text
    assert f"fades in over the one before (default {generate.CHAIN_OVERLAP};" in text


def test_download_weights_list_from_the_console_script(tmp_path):
    proc = run_talkedit("download-weights", "--list", env={"TALKEDIT_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "face-landmarker" in proc.stdout and "dve-multispeaker" in proc.stdout and "not cached" in proc.stdout


def test_json_summaries_and_quiet(talkedit_home, tmp_path):
    import json

    from .common import media

    home, tiny = talkedit_home
    env = {"TALKEDIT_HOME": str(home)}
    video, speech = (
        media("grid_swiz3n_black_male_360x288_25fps.mpg"),
        media("en_short_voice_recording_22k05_mono_1.8s.m4a"),
    )
    proc = run_talkedit("preprocess", str(video), "--json", "--quiet", env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["frames"] == 75 and summary["frames_tracked"] == 75 and summary["preview"].endswith("preview.png")
    out = tmp_path / "out.mp4"
    strip = tmp_path / "strip.png"
    args = ["-o", str(out), "--model", str(tiny), "--steps", "1", "--json", "-q", "--preview", str(strip)]
    proc = run_talkedit("dub", str(video), str(speech), *args, env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["output"] == str(out) and summary["frames_written"] == 44 and out.is_file()
    assert summary["frames_generated"] + summary["frames_passed_through"] == 44
    png = strip.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (8 * 128, 2 * 128)


def test_every_progress_stage_the_library_reports_has_a_label():
    """A stage without a label would show its internal name ("compare") beside "Finding the face"."""
    source = "\n".join(path.read_text() for path in Path(talkedit.__file__).parent.glob("*.py"))
    stages = set(re.findall(r'progress\(\s*"(\w+)"', source))
    assert {"analyse", "generate", "compare"} <= stages  # the pattern finds them
    assert stages <= set(StageProgress.LABELS), stages - set(StageProgress.LABELS)


def test_a_long_progress_note_gives_way_on_an_80_column_terminal():
    """Training's note (loss, validation) once squeezed the bar, the step count and the ETA out of the row."""
    from rich.console import Console

    bars = StageProgress(plain=False)
    bars.progress.add_task("Packing the clips", total=1, completed=1, note="")
    note = "loss 0.0123  301.5 samples/s  val 0.1176  audio-shift ratio 1.006  sampled 0.4898"
    bars.progress.add_task("Training", total=2500, completed=7, note=note)
    console = Console(width=80, color_system=None, record=True, file=io.StringIO())
    console.print(bars.progress.make_tasks_table(bars.progress.tasks))
    packing, training = console.export_text().splitlines()
    assert "━" in packing and "1/1" in packing and "ETA" in packing
    assert "7/2500" in training and "ETA" in training and "loss 0.0123" in training and training.endswith("…")


def test_downloads_count_in_bytes_and_stages_in_frames(monkeypatch):
    from rich.console import Console

    console = Console(width=120, color_system=None, record=True, file=io.StringIO())
    bars = StageProgress(plain=False)
    monkeypatch.setattr(bars.progress, "start", lambda: None)  # no live display; the table is printed below
    bars("download face-landmarker", 1_900_000, 3_758_596)
    bars("analyse", 7, 250)
    console.print(bars.progress.make_tasks_table(bars.progress.tasks))
    download, frames = console.export_text().splitlines()
    assert download.startswith("Downloading face-landmarker") and "1.9/3.8 MB" in download
    assert frames.startswith("Finding the face") and "7/250" in frames


def test_progress_to_a_log_file_is_plain_lines_now_and_then():
    """Where stderr is a file or a pipe, rich's bars printed nothing until the end: `talkedit train ... > log 2>&1`
    said nothing for hours. There each stage gets a line when it starts, then every PLAIN_EVERY_SECONDS, and when
    it is done."""
    from rich.console import Console

    from talkedit.cli import PLAIN_EVERY_SECONDS, PlainProgress

    clock = [0.0]
    out = io.StringIO()
    plain = PlainProgress(Console(file=out, width=80, color_system=None), lambda: clock[0])
    plain.update("train", "Training", 0, 2500, "validating", False)
    for step in range(1, 11):  # a step every 10 s, a note with each
        clock[0] += 10.0
        plain.update(
            "train", "Training", step, 2500, f"loss 0.{step:04d}  2.4 samples/s  val 0.1176  ratio 1.006", False
        )
    clock[0] += 10.0
    plain.update("train", "Training", 11, 2500, None, False)  # no note: the last one stays
    clock[0] += 10.0
    plain.update("train", "Training", 2500, 2500, None, False)
    plain.update("train", "Training", 2500, 2500, None, False)  # done once
    lines = out.getvalue().splitlines()
    assert lines[0] == "Training: 0/2500 (0 %), 0:00:00 elapsed, ETA -; validating"
    assert len(lines) == 1 + 100 // PLAIN_EVERY_SECONDS + 1, lines
    # at 30 s, 3 steps done in 30 s: 2497 more at 10 s each
    note = "2.4 samples/s  val 0.1176  ratio 1.006"  # lines longer than the console's 80 columns stay whole
    assert lines[1] == f"Training: 3/2500 (0 %), 0:00:30 elapsed, ETA 6:56:10; loss 0.0003  {note}", lines[1]
    assert lines[-1] == f"Training: 2500/2500 (100 %), 0:02:00 elapsed; loss 0.0010  {note}"
    assert "\x1b" not in out.getvalue()  # no colour codes


def test_plain_progress_of_a_stage_that_runs_again():
    """eval --holdout dubs the clip several times under one progress: each round of a stage gets its own lines."""
    from rich.console import Console

    from talkedit.cli import PlainProgress

    clock = [0.0]
    out = io.StringIO()
    plain = PlainProgress(Console(file=out, width=80, color_system=None), lambda: clock[0])
    for _ in range(2):
        for done in (1, 2, 3, 4):
            clock[0] += 1.0
            plain.update("generate", "Generating the mouth", done, 4, None, False)
    assert (
        out.getvalue().splitlines()
        == [
            "Generating the mouth: 1/4 (25 %), 0:00:00 elapsed, ETA -",
            "Generating the mouth: 4/4 (100 %), 0:00:03 elapsed",
        ]
        * 2
    )


def test_the_commands_write_plain_progress_to_a_pipe(talkedit_home, tmp_path):
    from .common import media

    home, _ = talkedit_home
    proc = run_talkedit("preprocess", str(media("grid_swiz3n_black_male_360x288_25fps.mpg")), "-o", str(tmp_path),
                        env={"TALKEDIT_HOME": str(home)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Finding the face: 75/75 (100 %)" in proc.stderr and "━" not in proc.stderr, proc.stderr


def test_the_eta_shows_when_updates_come_a_minute_apart(monkeypatch):
    """A CPU generates a frame at 50 steps, or takes a training step, about once a minute: rich's default 30 s
    speed window then held one update at a time, and the ETA stayed at -:--:-- for the whole run."""
    clock = [0.0]
    bars = StageProgress(plain=False)
    monkeypatch.setattr(bars.progress, "start", lambda: None)
    bars.progress.get_time = lambda: clock[0]
    for done in range(1, 4):
        bars("generate", done, 250)
        clock[0] += 65.0
    task = bars.progress.tasks[0]
    assert task.time_remaining is not None and abs(task.time_remaining - 247 * 65.0) < 1, task.time_remaining
