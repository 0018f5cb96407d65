from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import talkedit
from talkedit.cli import app

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
