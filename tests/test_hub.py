"""Hugging Face Hub ids ("org/name") for every command that takes a model.

Nothing leaves the machine: the cache is built here in the Hub's own layout (blobs, snapshot
symlinks, refs/main), and downloads come from a fake Hub on 127.0.0.1 that answers the few
requests huggingface_hub's snapshot_download makes.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from pissa.errors import PissaError
from pissa.files.loaders import init_folder, model_folder, resolve
from tests.conftest import BACKENDS, write_tiny_llama
from tests.test_cli import PISSA, assert_clean_failure

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/tiny"


def hub_cache(cache: Path, repo_id: str, src: Path, skip: tuple[str, ...] = ()) -> Path:
    """Put the files of folder `src` into `cache` as huggingface_hub lays out a download: content-named
    blobs, a snapshot of relative symlinks to them, refs/main naming the commit. Returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        if rel.parts[0] in skip:
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


def tiny_model(folder: Path, seed: int = 0) -> Path:
    write_tiny_llama(folder, seed=seed)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, used in this process with downloads off (as HF_HUB_CACHE and HF_HUB_OFFLINE=1
    would set it at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def pissa(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PISSA, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def hub_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    # Never send a token the user may have stored to the fake Hub.
    return {**env, "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **values}


def same_init_folders(a: Path, b: Path) -> None:
    """Two pissa init outputs hold the same files and tensors; only the fields naming where the
    model came from and where the output went may differ."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".safetensors":
            x, y = load_file(a / rel), load_file(b / rel)
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), rel
        elif rel.suffix == ".json":
            x, y = (json.loads((d / rel).read_text()) for d in (a, b))
            for d in (x, y):
                d.pop("base_model_name_or_path", None)  # adapter_config.json: the output folder
                d.pop("source", None)  # pissa_config.json: the model argument
            assert x == y, rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


# ----------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_init_from_a_cached_hub_id_equals_init_from_the_folder(variable, tmp_path):
    src = tiny_model(tmp_path / "tiny")
    home = tmp_path / "hf-home"
    cache = home / "hub"  # where huggingface_hub puts the cache under HF_HOME
    hub_cache(cache, REPO, src)
    env = hub_env(HF_HUB_OFFLINE="1", **{variable: str(cache if variable == "HF_HUB_CACHE" else home)})
    opts = ["--rank", "4", "--init", "pissa-fast", "--no-progress"]
    proc = pissa("init", REPO, "--out", str(tmp_path / "from-hub"), *opts, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = pissa("init", str(src), "--out", str(tmp_path / "from-folder"), *opts, env=env)
    assert proc.returncode == 0, proc.stderr
    same_init_folders(tmp_path / "from-hub", tmp_path / "from-folder")
    info = json.loads((tmp_path / "from-hub" / "pissa_init" / "pissa_config.json").read_text())
    assert info["source"] == REPO


def test_merge_takes_a_cached_hub_id(offline_cache, tmp_path):
    from pissa.cli import main

    src = tiny_model(tmp_path / "tiny")
    hub_cache(offline_cache, REPO, src)
    assert main(["init", str(src), "--out", str(tmp_path / "init"), "--rank", "4", "--no-progress"]) == 0
    adapter = str(tmp_path / "init" / "pissa_init")
    assert main(["merge", REPO, "--adapter", adapter, "--out", str(tmp_path / "m-hub")]) == 0
    assert main(["merge", str(src), "--adapter", adapter, "--out", str(tmp_path / "m-folder")]) == 0
    same_init_folders(tmp_path / "m-hub", tmp_path / "m-folder")


def test_an_id_not_in_the_cache_offline_is_one_line_with_the_id_and_the_cache(tmp_path):
    cache = tmp_path / "hf-cache"
    hub_cache(cache, "org/other", tiny_model(tmp_path / "tiny"))
    out = tmp_path / "out"
    proc = pissa("init", "org/absent", "--out", str(out), env=hub_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache)))
    assert_clean_failure(proc, "'org/absent' is not in the Hugging Face cache")
    assert str(cache) in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert not out.exists()


def test_a_partial_snapshot_offline_is_refused(offline_cache, tmp_path):
    src = tmp_path / "partial"
    src.mkdir()
    (src / "config.json").write_text("{}")  # what AutoConfig alone would have cached
    hub_cache(offline_cache, REPO, src)
    with pytest.raises(PissaError, match=rf"'{REPO}' is not in the Hugging Face cache .* \(or only in part\)"):
        resolve(REPO)


def test_a_local_folder_that_looks_like_an_id_wins(offline_cache, tmp_path, monkeypatch):
    snap = hub_cache(offline_cache, REPO, tiny_model(tmp_path / "tiny"))
    assert resolve(REPO) == snap
    monkeypatch.chdir(tmp_path)
    tiny_model(tmp_path / "org" / "tiny", seed=1)
    assert resolve(REPO) == Path(REPO)
    assert model_folder(REPO) == Path(REPO)
    assert resolve("smollm2-135m").suffix == ".gguf"  # the embedded name is never a Hub id


@pytest.mark.parametrize("model, words", [
    ("org/na me", "nor a valid Hugging Face Hub id"),
    ("org/-tiny", "nor a valid Hugging Face Hub id"),
    ("./org/tiny", "not found"),                  # a path, never a Hub id
    ("a/b/c", "not found"),
])
def test_malformed_ids_and_missing_paths_are_one_line(model, words, offline_cache, tmp_path, capsys):
    from pissa.cli import main

    assert main(["init", model, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pissa: error: ") and words in err, err


def test_train_takes_a_hub_id_only_when_it_is_a_pissa_init_folder(offline_cache, tmp_path, capsys):
    from pissa.cli import main

    src = tiny_model(tmp_path / "tiny")
    hub_cache(offline_cache, REPO, src)
    assert main(["train", REPO, "--data", "d.jsonl", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"run pissa init {REPO} --out DIR first" in err, err
    assert main(["train", "org/absent", "--data", "d.jsonl", "--out", str(tmp_path / "run")]) == 2
    assert "run pissa init org/absent" in capsys.readouterr().err
    # A Hub model in the official PiSSA layout (residual model + pissa_init/) is a pissa init folder.
    assert main(["init", str(src), "--out", str(tmp_path / "init"), "--rank", "4", "--no-progress"]) == 0
    snap = hub_cache(offline_cache, "org/tiny-pissa", tmp_path / "init")
    assert init_folder("org/tiny-pissa") == snap


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_generate_on_a_cached_hub_id_with_an_adapter(backend, tiny_chat, offline_cache, capsys):
    from pissa.cli import main

    hub_cache(offline_cache, "org/chat", tiny_chat, skip=("pissa_init",))  # the plain residual model
    opts = ["--prompt", "What is 2+3?", "--max-new-tokens", "4", "--backend", backend]
    assert main(["generate", "org/chat", "--adapter", str(tiny_chat / "pissa_init"), *opts]) == 0
    from_hub = capsys.readouterr().out
    assert main(["generate", str(tiny_chat), *opts]) == 0
    assert from_hub == capsys.readouterr().out


# ----------------------------------------------------------------------------- downloads


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's answers to snapshot_download: the revision, the file tree, each file; "missing"
    and "gated" repos answer as the Hub does (404 RepoNotFound, 403 GatedRepo)."""

    files: dict[str, bytes] = {}
    requested: list[str] = []

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        type(self).requested.append(f"{self.command} {path}")
        if path == f"/api/models/{REPO}/revision/main":
            return self._send(200, json.dumps({"id": REPO, "sha": COMMIT}).encode())
        if path == f"/api/models/{REPO}/tree/{COMMIT}":
            tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in self.files.items()]
            return self._send(200, json.dumps(tree).encode())
        name = path.split("/resolve/", 1)[-1].split("/", 1)[-1]  # /org/tiny/resolve/<revision>/<file>
        if path.startswith(f"/{REPO}/resolve/") and name in self.files:
            data = self.files[name]
            return self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
        if path.startswith(f"/{REPO}/resolve/"):
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
        if path.startswith("/api/models/org/gated/"):
            return self._send(403, b"", {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access is restricted."})
        self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})

    do_HEAD = do_GET

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def serve(folder: Path) -> None:
    """Let the fake Hub serve `folder` as REPO, beside what real repos carry and pissa must not download."""
    FakeHub.files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    FakeHub.files.update({"pytorch_model.bin": b"duplicate", "onnx/model.onnx": b"duplicate", "README.md": b"# tiny",
                          "original/consolidated.00.pth": b"duplicate", "tiny-q4_0.gguf": b"GGUF", ".gitattributes": b""})
    FakeHub.requested = []


@pytest.fixture
def fake_hub(tmp_path):
    src = tiny_model(tmp_path / "tiny")
    serve(src)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield src, f"http://127.0.0.1:{server.server_port}", server
    server.shutdown()
    server.server_close()


def test_download_fetches_only_what_pissa_reads_then_uses_the_cache(fake_hub, tmp_path):
    src, endpoint, _ = fake_hub
    cache = tmp_path / "hf-cache"
    env = hub_env(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="0")
    proc = pissa("init", REPO, "--out", str(tmp_path / "first"), "--rank", "4", "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    snap = cache / "models--org--tiny" / "snapshots" / COMMIT
    assert f"downloaded {REPO} from the Hugging Face Hub into {snap}" in proc.stderr
    assert sorted(p.name for p in snap.rglob("*") if p.is_file()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    # Complete in the cache: used as it is, without a request to the Hub, though the network is on.
    FakeHub.requested.clear()
    proc = pissa("init", REPO, "--out", str(tmp_path / "again"), "--rank", "4", "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "downloaded" not in proc.stderr and FakeHub.requested == []
    proc = pissa("init", str(src), "--out", str(tmp_path / "local"), "--rank", "4", "--no-progress", env=env)
    same_init_folders(tmp_path / "first", tmp_path / "local")
    same_init_folders(tmp_path / "again", tmp_path / "local")


@pytest.mark.parametrize("repo, words", [
    ("org/missing", "'org/missing' not found: no such local file or folder, and no such model on the Hugging Face Hub"),
    ("org/gated", "'org/gated' is gated on the Hugging Face Hub"),
])
def test_hub_refusals_are_one_line(repo, words, fake_hub, tmp_path):
    _, endpoint, _ = fake_hub
    env = hub_env(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp_path / "hf-cache"), HF_HUB_OFFLINE="0")
    assert_clean_failure(pissa("init", repo, "--out", str(tmp_path / "out"), env=env), words)


def test_an_unreachable_hub_is_one_line(fake_hub, tmp_path):
    _, endpoint, server = fake_hub
    server.shutdown()
    server.server_close()  # the port now refuses connections
    cache = tmp_path / "hf-cache"
    env = hub_env(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="0")
    proc = pissa("init", REPO, "--out", str(tmp_path / "out"), env=env)
    assert_clean_failure(proc, f"cannot reach the Hugging Face Hub for '{REPO}'")
    assert str(cache) in proc.stderr


def test_train_downloads_a_hub_pissa_init_folder_but_never_a_plain_model(fake_hub, tmp_path):
    src, endpoint, _ = fake_hub
    env = hub_env(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp_path / "hf-cache"), HF_HUB_OFFLINE="0")
    proc = pissa("train", REPO, "--data", "d.jsonl", "--out", str(tmp_path / "run"), env=env)
    assert_clean_failure(proc, f"run pissa init {REPO} --out DIR first")
    asked = [r for r in FakeHub.requested if "/resolve/" in r]
    assert asked and all(r.endswith("/pissa_init/adapter_config.json") for r in asked), asked  # nothing fetched
    assert pissa("init", str(src), "--out", str(tmp_path / "init"), "--rank", "4", "--no-progress", env=env).returncode == 0
    serve(tmp_path / "init")
    code = f"from pissa.files.loaders import init_folder; print(init_folder({REPO!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (Path(proc.stdout.strip()) / "pissa_init" / "adapter_model.safetensors").is_file()
