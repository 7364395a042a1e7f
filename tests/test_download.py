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
from conftest import write_hf_checkpoint

from gpt2 import GPT


class FakeHub:
    """Serves {url path: bytes}; paths listed in `truncate` promise more bytes than they send."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.truncate, self.requests = files, set(), []
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


def cached(tmp_path: Path) -> Path:
    return tmp_path / "hf_home" / "bora-gpt2" / "gpt2"


def test_download_then_cache(hub, tiny_hf_dir, tmp_path, capsys):
    model = GPT.from_pretrained("gpt2")
    assert sorted(hub.requests) == [URL + "config.json", URL + "model.safetensors"]
    assert sorted(p.name for p in cached(tmp_path).iterdir()) == ["config.json", "model.safetensors"]
    assert (cached(tmp_path) / "model.safetensors").read_bytes() == hub.files[URL + "model.safetensors"]
    assert "model.safetensors" in capsys.readouterr().err  # the progress line
    idx = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], GPT.from_pretrained(str(tiny_hf_dir))(idx)[0])

    hub.stop()  # the second call must not need the network
    again = GPT.from_pretrained("openai-community/gpt2")
    assert len(hub.requests) == 2
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)


def test_xdg_cache_home_when_hf_home_is_unset(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    GPT.from_pretrained("gpt2")
    assert (tmp_path / "xdg" / "huggingface" / "bora-gpt2" / "gpt2" / "model.safetensors").is_file()


def test_interrupted_download_leaves_no_file_then_resumes(hub, tmp_path):
    hub.truncate.add(URL + "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors stopped after \d+ of \d+ bytes") as info:
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
    assert f"download it by hand into {cached(tmp_path)}/" in message
    assert not cached(tmp_path).exists() or not any(cached(tmp_path).iterdir())
