"""Downloads against a local HTTP server on 127.0.0.1 standing in for the Hugging Face Hub (through HF_ENDPOINT) and
for a plain URL source. Nothing here touches the internet."""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from talkedit.diffusion import DiffusionConfig
from talkedit.download import check_cached, ensure, install_from
from talkedit.errors import WeightsError
from talkedit.unet import UNet
from talkedit.weights import WeightsEntry, read_manifest, save_weights

from .common import LANDMARKER, TINY, run_talkedit

REVISION = "0123456789abcdef0123456789abcdef01234567"


class FakeServer:
    """Serves `files` (URL path -> bytes) like a CDN, and `hub` files like the Hub's /{repo}/resolve/{rev}/{file}.

    `mode` makes it misbehave: "500" answers every request with an error, "slow" stalls before answering.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.mode = "ok"
        self.requests: list[str] = []
        self.port = 0
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, body: bool) -> None:
                owner.requests.append(f"{self.command} {self.path}")
                if owner.mode == "slow":
                    time.sleep(3)
                if owner.mode == "500":
                    self.send_error(500)
                    return
                path = self.path.split("?")[0]
                data = owner.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if (rng := self.headers.get("Range")) and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                if "/resolve/" in path:
                    self.send_header("X-Repo-Commit", REVISION)
                    self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if body:
                    self.wfile.write(data[start:])

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that gave up (the timeout test) is expected

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def server():
    s = FakeServer()
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    torch.manual_seed(0)
    save_weights(path, UNet(TINY).state_dict(), TINY, DiffusionConfig(), {"source": "test"})
    return path.read_bytes()


def write_manifest(tmp_path: Path, server: FakeServer, tiny: bytes, landmarker: bytes, **overrides) -> Path:
    hub_sha = overrides.get("hub_sha", hashlib.sha256(tiny).hexdigest())
    url_sha = overrides.get("url_sha", hashlib.sha256(landmarker).hexdigest())
    text = f'''
default = "tiny"

[weights.face-landmarker]
url = "{server.url}/files/face_landmarker.task"
sha256 = "{url_sha}"
size = {overrides.get("url_size", len(landmarker))}
license = "Apache-2.0"

[weights.tiny]
repo = "talkedit/tiny"
filename = "model.safetensors"
revision = "{REVISION}"
sha256 = "{hub_sha}"
size = {len(tiny)}
format = "talkedit"
license = "MIT"
'''
    path = tmp_path / "weights.toml"
    path.write_text(text)
    return path


def test_download_weights_end_to_end(tmp_path, server, tiny_weights):
    """The issue's acceptance: hub + URL entries from 127.0.0.1, cache hit with the server down, a tampered file
    refused offline with its hash named, repaired online, and a URL file whose manifest hash is wrong refused."""
    landmarker = LANDMARKER.read_bytes()
    server.files[f"/talkedit/tiny/resolve/{REVISION}/model.safetensors"] = tiny_weights
    server.files["/files/face_landmarker.task"] = landmarker
    manifest = write_manifest(tmp_path, server, tiny_weights, landmarker)
    cache = tmp_path / "cache"
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf-home")}
    args = ["download-weights", "--manifest", str(manifest), "--cache-dir", str(cache)]

    # 1. Fresh download of both.
    first = run_talkedit(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert (cache / "tiny.safetensors").read_bytes() == tiny_weights
    assert (cache / "face-landmarker.task").read_bytes() == landmarker
    assert any("/resolve/" in r for r in server.requests) and "GET /files/face_landmarker.task" in server.requests

    # 2. Cache hit with the server stopped.
    server.stop()
    again = run_talkedit(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert "verified" in again.stderr

    # 3. A tampered cached file is refused offline, with the hashes named.
    data = bytearray((cache / "tiny.safetensors").read_bytes())
    data[100] ^= 0xFF
    (cache / "tiny.safetensors").write_bytes(bytes(data))
    tampered_sha = hashlib.sha256(data).hexdigest()
    offline = run_talkedit(*args, "tiny", "--offline", env=env)
    assert offline.returncode == 1
    assert tampered_sha in offline.stderr and hashlib.sha256(tiny_weights).hexdigest() in offline.stderr
    assert "download-weights tiny" in offline.stderr and "Traceback" not in offline.stderr

    # 4. Repaired once the server is back.
    server.start()
    env["HF_ENDPOINT"] = server.url
    repaired = run_talkedit(*args, "tiny", env=env)
    assert repaired.returncode == 0, repaired.stderr
    assert (cache / "tiny.safetensors").read_bytes() == tiny_weights

    # 5. A URL file that does not match its manifest hash is refused, and nothing valid-looking is left.
    bad_manifest = write_manifest(tmp_path, server, tiny_weights, landmarker, url_sha="0" * 64)
    other_cache = tmp_path / "other-cache"
    refused = run_talkedit("download-weights", "face-landmarker", "--manifest", str(bad_manifest), "--cache-dir",
                  str(other_cache), env=env)  # fmt: skip
    assert refused.returncode == 1
    assert "0" * 64 in refused.stderr and hashlib.sha256(landmarker).hexdigest() in refused.stderr
    assert not (other_cache / "face-landmarker.task").exists()
    assert not [p for p in other_cache.rglob("*") if p.is_file()]


def entry_for(server: FakeServer, data: bytes, **fields) -> WeightsEntry:
    server.files["/files/blob.bin"] = data
    base = {"url": f"{server.url}/files/blob.bin", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return WeightsEntry(name="blob", **{**base, **fields})


def test_wrong_size_is_refused(tmp_path, server):
    entry = entry_for(server, b"x" * 1000, size=999)
    with pytest.raises(WeightsError, match="size 1000 bytes, the manifest says 999"):
        ensure(entry, root=tmp_path, offline=False)
    assert not (tmp_path / "blob.bin").exists()


def test_server_errors_are_one_line(tmp_path, server):
    entry = entry_for(server, b"x" * 1000)
    server.mode = "500"
    with pytest.raises(WeightsError, match="HTTP 500"):
        ensure(entry, root=tmp_path, offline=False)


def test_timeouts_are_reported(tmp_path, server):
    entry = entry_for(server, b"x" * 1000)
    server.mode = "slow"
    with pytest.raises(WeightsError, match="timed out"):
        ensure(entry, root=tmp_path, offline=False, timeout=0.5)


def test_hub_errors_are_one_line(tmp_path, server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    entry = WeightsEntry(name="gone", repo="talkedit/gone", filename="x.safetensors", revision=REVISION,
                         sha256="0" * 64, size=1, format="talkedit")  # fmt: skip
    with pytest.raises(WeightsError, match="download of talkedit/gone/x.safetensors"):
        ensure(entry, root=tmp_path, offline=False)


def test_interrupted_download_resumes(tmp_path, server):
    data = bytes(range(256)) * 40
    entry = entry_for(server, data)
    partial = tmp_path / ".partial"
    partial.mkdir()
    (partial / "blob.download").write_bytes(data[:3000])  # what an interrupted run left
    server.requests.clear()
    path = ensure(entry, root=tmp_path, offline=False)
    assert path.read_bytes() == data
    assert server.requests == ["GET /files/blob.bin"]
    assert not (partial / "blob.download").exists()


def test_hf_hub_offline_env_means_no_download(tmp_path, server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = entry_for(server, b"x" * 10)
    with pytest.raises(WeightsError, match="downloads are off"):
        ensure(entry, root=tmp_path)
    assert server.requests == []


def test_from_file_checks_the_entry(tmp_path, server):
    data = b"y" * 500
    entry = entry_for(server, data)
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    good.write_bytes(data)
    bad.write_bytes(b"z" * 500)
    root = tmp_path / "cache"
    with pytest.raises(WeightsError, match="refused"):
        install_from(entry, bad, root=root)
    path, warning = install_from(entry, good, root=root)
    assert warning is None and check_cached(entry, root).valid and path.read_bytes() == data


def test_shipped_manifest_is_honest():
    default, entries = read_manifest()
    landmarker = entries["face-landmarker"]
    assert landmarker.sha256 == hashlib.sha256(LANDMARKER.read_bytes()).hexdigest()
    assert landmarker.size == LANDMARKER.stat().st_size
    official = entries[default]
    assert official.format == "dve-palette" and official.manual and "CREMA-D" in official.description
    for entry in entries.values():
        if entry.repo:
            assert entry.revision and len(entry.revision) == 40  # pinned commits, never branches
        if entry.url or entry.repo:
            assert entry.sha256 and entry.size


def test_dub_fetches_what_it_needs_on_first_use(tmp_path, server, monkeypatch):
    import talkedit.manifest
    from talkedit.pipeline import DubOptions, dub

    from .common import TINY_128, media

    torch.manual_seed(0)
    save_weights(tmp_path / "w.safetensors", UNet(TINY_128).state_dict(), TINY_128, DiffusionConfig(), {})
    tiny_weights = (tmp_path / "w.safetensors").read_bytes()
    landmarker = LANDMARKER.read_bytes()
    server.files[f"/talkedit/tiny/resolve/{REVISION}/model.safetensors"] = tiny_weights
    server.files["/files/face_landmarker.task"] = landmarker
    manifest = write_manifest(tmp_path, server, tiny_weights, landmarker)
    monkeypatch.setattr(talkedit.manifest, "manifest_path", lambda: manifest)
    monkeypatch.setenv("TALKEDIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    video, speech = (
        media("grid_swiz3n_black_male_360x288_25fps.mpg"),
        media("en_short_voice_recording_22k05_mono_1.8s.m4a"),
    )

    with pytest.raises(WeightsError, match="downloads are off"):
        dub(video, speech, tmp_path / "offline.mp4", DubOptions(steps=1, offline=True))
    assert server.requests == [] and not (tmp_path / "offline.mp4").exists()

    stages = set()
    dub(video, speech, tmp_path / "out.mp4", DubOptions(steps=1), progress=lambda s, d, t: stages.add(s))
    assert {"download tiny", "download face-landmarker"} <= stages
    assert (tmp_path / "home" / "tiny.safetensors").read_bytes() == tiny_weights
    assert (tmp_path / "out.mp4").is_file()
