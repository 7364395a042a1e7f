"""Files: writes that never leave half a file and say when the disk is full, and the Hugging Face hub's cache
and downloads.

Nothing here knows about models. The hub part uses the standard library only and huggingface_hub's own
cache layout, so a GPT-2 or a dataset that transformers already downloaded is used as it is."""
from __future__ import annotations

import ctypes
import errno
import http.client
import os
import shutil
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def atomic_write(dest: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) into a temp file beside dest, then rename it over dest: dest is never half-written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with writing(dest.parent, dest.name):
            write(tmp)
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def writing(folder: Path, what: str) -> Iterator[None]:
    """Writes of `what` into folder; one that fails for want of space says so, naming the folder. Libraries
    say it each their own way, if at all: torch "unexpected pos", numpy "N requested and M written"."""
    try:
        yield
    except Exception as e:
        if isinstance(e, ValueError) or not disk_full(e, folder):  # a user's mistake, or another fault
            raise
        raise OSError(f"no space left on the device of {folder}: {what} was not written; free some space and "
                      "run again") from None


def disk_full(e: Exception, folder: Path) -> bool:
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    try:  # no errno: ask the file system (the failed write's temp file still takes its space)
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def append_line(path: Path, line: str) -> None:
    """Append line + newline whole or not at all: a write cut short (a full disk, Ctrl-C) is taken back, so
    that a file of JSON lines stays one."""
    with writing(path.parent, path.name), open(path, "ab", buffering=0) as f:
        start, rest = f.tell(), (line + "\n").encode()
        try:
            while rest:
                rest = rest[f.write(rest):]
        except BaseException:
            f.truncate(start)
            raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step, so that neither is ever missing: Linux's renameat2(RENAME_EXCHANGE).
    False where the system has no such call (another OS, an old kernel, some file systems): nothing moved."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    if (err := ctypes.get_errno()) in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
