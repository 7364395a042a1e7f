"""Files: writes that never leave half a file, and the Hugging Face hub's cache and downloads.

Nothing here knows about models. The hub part uses the standard library only and huggingface_hub's own
cache layout, so a GPT-2 or a dataset that transformers already downloaded is used as it is."""
from __future__ import annotations

import http.client
import os
import sys
import urllib.request
from pathlib import Path
from typing import Callable


def atomic_write(dest: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) into a temp file beside dest, then rename it over dest: dest is never half-written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def hub_file(repo: str, file: str, revision: str = "main", kind: str = "model", fetch: bool = True) -> Path | None:
    """One file of a hub repo from the cache (for "main": any snapshot), else fetched from $HF_ENDPOINT into it."""
    # huggingface_hub's cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")).expanduser()
    snapshots = cache / f"{kind}s--{repo.replace('/', '--')}" / "snapshots"  # e.g. models--openai-community--gpt2
    found = [snapshots / revision / file] if revision != "main" else sorted(snapshots.glob(f"*/{file}"))
    if (cached := next((f for f in found if f.is_file()), None)) or not fetch:
        return cached
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{'datasets/' if kind == 'dataset' else ''}{repo}/resolve/{revision}/{file}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            commit = response.headers.get("X-Repo-Commit") or revision  # the hub says which commit it served
            atomic_write(snapshots / commit / file, lambda tmp: _stream(response, tmp, url))
    except (OSError, http.client.HTTPException) as e:  # no network, an HTTP error status, a timeout
        raise FileNotFoundError(f"could not fetch {url} ({e}); download it by hand to {snapshots / revision / file}") from None
    if commit != revision:  # as huggingface_hub does: refs/main names the commit main pointed to
        atomic_write(snapshots.parent / "refs" / revision, lambda tmp: tmp.write_text(commit))
    return snapshots / commit / file


def _stream(response, into: Path, url: str) -> None:
    """Copy the response body into a file with a progress line; a short body raises (urllib would not)."""
    total, done = int(response.headers.get("Content-Length") or 0), 0
    with open(into, "wb") as f:
        while chunk := response.read(1 << 20):
            done += f.write(chunk)
            print(f"\r{url}: {done / 1e6:.1f} of {total / 1e6:.1f} MB", end="", file=sys.stderr)
    print(file=sys.stderr)
    if done < total:
        raise OSError(f"download stopped after {done} of {total} bytes; run again")
