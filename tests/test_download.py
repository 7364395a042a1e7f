"""The real download code against a local HTTP server that plays the Hugging Face hub.

HF_ENDPOINT points at http://127.0.0.1:<port>, HF_HOME at tmp_path: nothing leaves the machine.
"""
from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

import files
from data import load_meta
from gpt2 import GPT


class FakeHub:
    """Serves {url path: bytes}; paths listed in `truncate` promise more bytes than they send."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.truncate, self.requests, self.headers = files, set(), [], {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append(self.path)
                body = hub.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                promised = len(body) + 1000 if self.path in hub.truncate else len(body)
                self.send_response(200)
                self.send_header("Content-Length", str(promised))
                for key, value in hub.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in hub.truncate else body)
                self.close_connection = True  # HTTP/1.0: the connection ends here, short or not

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


URL = "/openai-community/gpt2/resolve/main/"


@pytest.fixture
def hub(tiny_hf_dir, tmp_path, monkeypatch):
    files = {URL + name: (tiny_hf_dir / name).read_bytes() for name in ("config.json", "model.safetensors")}
    hub = FakeHub(files)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)  # talk to 127.0.0.1 directly
    yield hub
    hub.stop()


def cached(tmp_path: Path, revision: str = "main") -> Path:
    """Where huggingface_hub keeps a snapshot of openai-community/gpt2 (a commit hash when the hub names one)."""
    return tmp_path / "hf_home" / "hub" / "models--openai-community--gpt2" / "snapshots" / revision


def test_download_then_cache(hub, tiny_hf_dir, tmp_path, capsys):
    model = GPT.from_pretrained("gpt2")
    assert sorted(hub.requests) == [URL + "config.json", URL + "model.safetensors"]
    assert sorted(p.name for p in cached(tmp_path).iterdir()) == ["config.json", "model.safetensors"]
    assert (cached(tmp_path) / "model.safetensors").read_bytes() == hub.files[URL + "model.safetensors"]
    assert "model.safetensors" in capsys.readouterr().err  # the progress line
    idx = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.equal(model(idx), GPT.from_pretrained(str(tiny_hf_dir))(idx))

    hub.stop()  # the second call must not need the network
    again = GPT.from_pretrained("openai-community/gpt2")
    assert len(hub.requests) == 2
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)


def test_xdg_cache_home_when_hf_home_is_unset(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    GPT.from_pretrained("gpt2")
    assert (tmp_path / "xdg" / "huggingface" / "hub" / "models--openai-community--gpt2" / "snapshots" / "main"
            / "model.safetensors").is_file()


def test_interrupted_download_leaves_no_file_then_resumes(hub, tmp_path):
    hub.truncate.add(URL + "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors \(download stopped after \d+ of \d+ bytes") as info:
        GPT.from_pretrained("gpt2")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in cached(tmp_path).iterdir()) == ["config.json"]  # no partial or temp file

    hub.truncate.clear()
    GPT.from_pretrained("gpt2")  # the next call fetches only what is missing
    assert hub.requests.count(URL + "config.json") == 1
    assert (cached(tmp_path) / "model.safetensors").read_bytes() == hub.files[URL + "model.safetensors"]


def test_http_error_names_the_url(hub, tmp_path):
    del hub.files[URL + "model.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"could not fetch http://127\.0\.0\.1:\d+" + URL + r"model\.safetensors \(HTTP Error 404"):
        GPT.from_pretrained("gpt2")
    assert not (cached(tmp_path) / "model.safetensors").exists()


def test_no_network_says_what_and_where(hub, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(FileNotFoundError) as info:
        GPT.from_pretrained("gpt2")
    message = str(info.value)
    assert "\n" not in message
    assert f"could not fetch http://127.0.0.1:{port}{URL}config.json" in message
    assert f"download it by hand to {cached(tmp_path) / 'config.json'}" in message
    assert not cached(tmp_path).exists() or not any(cached(tmp_path).iterdir())


def test_a_gpt2_already_in_the_hugging_face_cache_is_used_without_the_network(hub, tiny_hf_dir, tmp_path):
    # as transformers leaves it: snapshots/<commit>/ with refs/main naming the commit, under the old repo id "gpt2"
    snapshot = tmp_path / "hf_home" / "hub" / "models--gpt2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((tiny_hf_dir / name).read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    hub.stop()
    model = GPT.from_pretrained("gpt2")
    assert hub.requests == [] and model.config.n_embd == 32


def test_the_commit_the_hub_names_becomes_the_snapshot(hub, tmp_path):
    hub.headers["X-Repo-Commit"] = "0123abcd"
    GPT.from_pretrained("gpt2")
    assert sorted(p.name for p in cached(tmp_path, "0123abcd").iterdir()) == ["config.json", "model.safetensors"]
    assert (cached(tmp_path).parents[1] / "refs" / "main").read_text() == "0123abcd"


def test_dataset_files_are_fetched_at_their_pinned_revision(hub, tmp_path):
    url = "/datasets/dair-ai/emotion/resolve/feed42/data/train.jsonl.gz"
    hub.files[url] = b"{}"
    path = files.hub_file("dair-ai/emotion", "data/train.jsonl.gz", "feed42", kind="dataset")
    assert hub.requests == [url] and path.read_bytes() == b"{}"
    assert path == tmp_path / "hf_home" / "hub" / "datasets--dair-ai--emotion" / "snapshots" / "feed42" / "data" / "train.jsonl.gz"
    assert files.hub_file("dair-ai/emotion", "data/train.jsonl.gz", "feed42", kind="dataset") == path  # cached now
    assert len(hub.requests) == 1


def test_prepare_data_without_arguments_fetches_the_emotion_corpus(hub, tmp_path, monkeypatch):
    """The default data: dair-ai/emotion's three files at the pinned revision, integer labels named."""
    import gzip
    import json

    import prepare_data

    repo, revision, files = prepare_data.EMOTION
    labels = prepare_data.PRESETS["emotion"]["labels"]
    for n, file in enumerate(files):
        rows = [{"text": f"i feel number {i} of {file}", "label": i % 6} for i in range(12 + n)]
        hub.files[f"/datasets/{repo}/resolve/{revision}/{file}"] = gzip.compress(
            "".join(json.dumps(r) + "\n" for r in rows).encode())
    monkeypatch.chdir(tmp_path)
    prepare_data.main([])
    meta = load_meta(tmp_path / "data" / "emotion")
    assert meta["tasks"] == sorted(labels.values()) == ["anger", "fear", "joy", "love", "sadness", "surprise"]
    assert sum(c["docs"] for split in meta["counts"].values() for c in split.values()) == 12 + 13 + 14
    hub.stop()  # a second preparation needs no network
    prepare_data.main(["--out", str(tmp_path / "again")])
    assert load_meta(tmp_path / "again")["fingerprint"] == meta["fingerprint"]


def test_prepare_data_offline_says_what_to_fetch_and_where(hub, tmp_path, monkeypatch):
    import prepare_data

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        prepare_data.main([])
    message = str(e.value.code)
    assert message.startswith("error: could not fetch") and "data/train.jsonl.gz" in message
    assert "download it by hand to" in message and "datasets--dair-ai--emotion" in message and "\n" not in message
    assert message.endswith(f"snapshots/{prepare_data.EMOTION[1]}/data/train.jsonl.gz")
