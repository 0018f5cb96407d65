"""The talkedit weights format, model names, and import of official checkpoints (CLI and library)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import talkedit
from talkedit.checkpoint import import_checkpoint
from talkedit.cli import app
from talkedit.diffusion import DiffusionConfig
from talkedit.errors import CheckpointError, WeightsError
from talkedit.weights import read_manifest, read_weights, save_weights

from .common import TINY, random_tiny_model, run_talkedit

runner = CliRunner()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def forward(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(reference["input.x"], reference["input.noise_level"], reference["input.audio"])


def test_imported_checkpoint_reproduces_the_official_unet(official_dir, tmp_path, unet_reference):
    out = tmp_path / "dve.safetensors"
    result = runner.invoke(app, ["import-weights", str(official_dir / "735_Network.pth"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = talkedit.load_model(out, device="cpu")
    assert not model.training
    torch.testing.assert_close(forward(model, unet_reference), unet_reference["output"], atol=1e-4, rtol=1e-4)
    assert model.provenance["ema"] is False
    assert model.provenance["source_sha256"] == sha256(official_dir / "735_Network.pth")
    assert model.diffusion == DiffusionConfig()


def test_weights_file_carries_its_configs_as_json(official_dir, tmp_path):
    out = tmp_path / "dve.safetensors"
    import_checkpoint(official_dir / "735_Network.pth", out, head_channels=32)
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        meta = f.metadata()
        assert len(list(f.keys())) == 324
    assert meta["format"] == "talkedit"
    assert json.loads(meta["unet_config"])["head_channels"] == 32
    assert json.loads(meta["diffusion_config"])["train_steps"] == 1000
    assert json.loads(meta["provenance"])["source_file"] == "735_Network.pth"


def test_head_channels_option_changes_the_loaded_model(official_dir, tmp_path, unet_reference):
    out = tmp_path / "dve32.safetensors"
    result = runner.invoke(
        app, ["import-weights", str(official_dir / "735_Network.pth"), "-o", str(out), "--head-channels", "32"]
    )
    assert result.exit_code == 0, result.output
    model = talkedit.load_model(out, device="cpu")
    assert model.config.head_channels == 32
    assert (forward(model, unet_reference) - unet_reference["output"]).abs().max() > 1e-3


def test_ema_flag_picks_the_ema_file_beside_the_raw_one(official_dir, tmp_path):
    out = tmp_path / "ema.safetensors"
    result = runner.invoke(app, ["import-weights", str(official_dir / "735_Network.pth"), "--ema", "-o", str(out)])
    assert result.exit_code == 0, result.output
    provenance = read_weights(out).provenance
    assert provenance["ema"] is True
    assert provenance["source_file"] == "735_Network_ema.pth"


def test_ema_file_without_the_flag_is_refused(official_dir, tmp_path):
    out = tmp_path / "x.safetensors"
    result = runner.invoke(app, ["import-weights", str(official_dir / "735_Network_ema.pth"), "-o", str(out)])
    assert result.exit_code == 1
    assert "--ema" in result.output and not out.exists()


def test_save_and_read_round_trip(tmp_path):
    model = random_tiny_model()
    path = tmp_path / "tiny.safetensors"
    save_weights(path, model.state_dict(), TINY, DiffusionConfig(steps=12), {"source": "test"})
    loaded = talkedit.load_model(path, device="cpu", dtype=torch.float64)
    assert loaded.config == TINY and loaded.diffusion.steps == 12
    assert next(loaded.parameters()).dtype == torch.float64
    x = torch.randn(1, 9, 32, 32)
    torch.testing.assert_close(
        loaded(x.double(), torch.tensor([0.5]), torch.zeros(1, 32)).float(),
        model(x, torch.tensor([0.5]), torch.zeros(1, 32)),
        atol=1e-5,
        rtol=1e-5,
    )


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    real_write = Path.write_bytes

    def disk_fills_up(path, data):
        real_write(path, data[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_fills_up)
    with pytest.raises(WeightsError, match="No space left"):
        save_weights(tmp_path / "w.safetensors", {"a": torch.zeros(1)}, TINY, DiffusionConfig(), {})
    assert list(tmp_path.iterdir()) == []


def test_model_names_resolve_through_the_manifest_to_the_cache(official_dir, tmp_path, monkeypatch, unet_reference):
    from talkedit.download import install_from

    monkeypatch.setenv("TALKEDIT_HOME", str(tmp_path))
    default, entries = read_manifest()
    assert default in entries
    with pytest.raises(WeightsError, match="--from FILE") as missing:
        talkedit.load_model(default)
    assert "not in the cache" in str(missing.value)
    # A file put in the cache by hand is not trusted: nothing records what it should be.
    import_checkpoint(official_dir / "735_Network.pth", tmp_path / f"{default}.safetensors")
    with pytest.raises(WeightsError, match="no hash to verify it against"):
        talkedit.load_model(default)
    installed, warning = install_from(entries[default], official_dir / "735_Network.pth")
    assert "no published hash" in warning and sha256(official_dir / "735_Network.pth") in warning
    model = talkedit.load_model(default, device="cpu")
    torch.testing.assert_close(forward(model, unet_reference), unet_reference["output"], atol=1e-4, rtol=1e-4)
    # Every load re-checks the file: a changed byte is caught.
    data = bytearray(installed.read_bytes())
    data[-1] ^= 1
    installed.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged or tampered"):
        talkedit.load_model(default, offline=True)


def test_unknown_names_and_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="unknown model 'no-such-model'"):
        talkedit.load_model("no-such-model")
    with pytest.raises(WeightsError, match="no such file"):
        talkedit.load_model(tmp_path / "missing.safetensors")


def test_foreign_safetensors_is_not_taken_for_weights(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="not a talkedit weights file"):
        talkedit.load_model(path)


# ----------------------------------------------------------------------------------------------------------------
# Files that are not official checkpoints: one line, exit 1, nothing written, input untouched.


def write_text(path: Path) -> None:
    path.write_text("this is not a checkpoint\n")


def write_truncated(path: Path, official: Path) -> None:
    path.write_bytes(official.read_bytes()[:5_000_000])


def write_foreign_keys(path: Path, official: Path) -> None:
    tensors = torch.load(official, weights_only=True)
    tensors["module.extra.weight"] = torch.zeros(3)
    del tensors["denoise_fn.out.2.bias"]
    torch.save(tensors, path)


def write_wrong_shape(path: Path, official: Path) -> None:
    tensors = torch.load(official, weights_only=True)
    tensors["denoise_fn.out.2.weight"] = torch.zeros(3, 64, 5, 5)
    torch.save(tensors, path)


def write_other_schedule(path: Path, official: Path) -> None:
    tensors = torch.load(official, weights_only=True)
    tensors["gammas"] = torch.linspace(0.999, 0.001, 1000)
    torch.save(tensors, path)


class RunsCode:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_code_pickle(path: Path, official: Path) -> None:
    torch.save({"denoise_fn.cond_embed.0.weight": RunsCode(path.with_suffix(".ran"))}, path)


class RunsShell:
    """Unpickling this runs a shell command: torch refuses its module (posix) in other words than a class's."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_shell_pickle(path: Path, official: Path) -> None:
    torch.save({"denoise_fn.cond_embed.0.weight": RunsShell(path.with_suffix(".ran"))}, path)


BAD_CHECKPOINTS = {
    "text": (lambda p, o: write_text(p), "not a PyTorch checkpoint"),
    "truncated": (write_truncated, "truncated or damaged"),
    "foreign-keys": (write_foreign_keys, "1 expected keys missing (e.g. denoise_fn.out.2.bias), 1 unexpected"),
    "wrong-shape": (write_wrong_shape, "denoise_fn.out.2.weight has shape [3, 64, 5, 5]"),
    "other-schedule": (write_other_schedule, "noise schedule"),
    "code-pickle": (write_code_pickle, "pickled Python objects"),
    "shell-pickle": (write_shell_pickle, "pickled Python objects"),
    # Random bytes were described as "pickled Python objects" (issue 10, item 11).
    "random-bytes": (
        lambda p, o: p.write_bytes(b"\xc0" + random.Random(0).randbytes(4095)),
        "not a PyTorch checkpoint",
    ),
    "empty": (lambda p, o: p.write_bytes(b""), "the file is empty"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_refused(kind, official_dir, tmp_path):
    make, message = BAD_CHECKPOINTS[kind]
    bad = tmp_path / "735_Network.pth"
    make(bad, official_dir / "735_Network.pth")
    before = sha256(bad)
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["import-weights", str(bad), "-o", str(out)])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an exception that escaped
    assert message in result.output
    assert str(bad) in result.output.replace("\n", "")
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors*"))
    assert sha256(bad) == before
    assert not bad.with_suffix(".ran").exists()  # nothing in the file was executed


def test_output_may_not_overwrite_the_checkpoint(official_dir, tmp_path):
    src = tmp_path / "735_Network.pth"
    src.write_bytes((official_dir / "735_Network.pth").read_bytes())
    with pytest.raises(CheckpointError, match="overwrite the checkpoint"):
        import_checkpoint(src, src)


def test_console_script_prints_one_line_and_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    bad = tmp_path / "notes.pth"
    write_text(bad)
    out = tmp_path / "x.safetensors"
    proc = run_talkedit("import-weights", str(bad), "-o", str(out))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {bad}")
    assert not out.exists()


def test_pickle_module_is_not_needed_to_refuse_code(tmp_path):
    """A plain pickle (not torch.save's zip) carrying code is refused too."""
    bad = tmp_path / "735_Network.pth"
    with bad.open("wb") as f:
        pickle.dump(RunsCode(tmp_path / "ran"), f)
    with pytest.raises(CheckpointError, match="a plain Python pickle"):
        import_checkpoint(bad, tmp_path / "out.safetensors")
    assert not (tmp_path / "ran").exists()


def test_download_weights_from_the_published_zip(official_dir, tmp_path):
    """The official model arrives as a Drive zip with no published hash: installed with --from, loudly recorded."""
    import zipfile

    archive = tmp_path / "MultiSpeaker_Cremad_Epoch_735.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(official_dir / "735_Network.pth", "weights/multi-speaker_checkpoint/735_Network.pth")
        z.write(official_dir / "735_Network_ema.pth", "weights/multi-speaker_checkpoint/735_Network_ema.pth")
    cache = tmp_path / "cache"
    proc = run_talkedit("download-weights", "dve-multispeaker", "--from", str(archive), "--cache-dir", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" in proc.stderr and sha256(official_dir / "735_Network.pth") in proc.stderr
    listing = run_talkedit("download-weights", "--list", "--cache-dir", str(cache))
    assert "hash recorded, unverified" in listing.stdout
    assert talkedit.load_model(cache / "dve-multispeaker.safetensors", device="cpu").provenance["ema"] is False


def test_a_tensor_of_the_wrong_shape_is_a_weights_error_not_a_traceback(tmp_path):
    from talkedit.errors import WeightsError

    state = random_tiny_model().state_dict()
    key = next(k for k, v in state.items() if v.dim() == 4)
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 2)
    path = tmp_path / "bad.safetensors"
    save_weights(path, state, TINY, DiffusionConfig(), {})
    with pytest.raises(WeightsError, match=f"{key} has shape"):
        talkedit.load_model(path, device="cpu")


def test_weights_files_are_readable_by_others_as_any_new_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, random_tiny_model().state_dict(), TINY, DiffusionConfig(), {})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
