"""What every script shares where a user's input enters: one-line errors, the device, JSON output, and
the C allocator's setting that keeps a CPU step from paying for fresh memory pages.

Nothing here is part of the method; it is the boundary that keeps a mistake from becoming a traceback."""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import sys
from contextlib import contextmanager
from typing import Iterator

import torch


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line ("error: ..."), not the usage block."""

    def error(self, message: str):
        sys.exit(f"error: {message}")


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A user's mistake (ValueError) or the system's refusal (OSError: no such file, disk full) ends the
    script with one line on stderr and exit status 1."""
    try:
        yield
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


def pick_device(name: str = "auto") -> str:
    """auto = cuda > mps > cpu; a device this machine lacks is a one-line error, not a traceback later."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {name!r} is not usable here ({str(e).splitlines()[0]}); try --device auto") from None
    return name


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for the next allocation instead of returning it to the OS. Every
    training step frees and allocates again the same GB of activations; memory given back returns as
    fresh pages, which the kernel zero-fills one page fault at a time (a quarter of a CPU run's time,
    issue 18). With blocks up to 32 MB taken from the heap (all of a step's, since GPT.forward computes
    the head in chunks) and the heap never trimmed, a step reuses the pages of the last one, at the
    same peak memory. A no-op where the C library is not glibc (macOS, Windows, musl)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's own ceiling for the threshold it would adapt by itself
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the largest value a C int holds: in effect, never trim


def jsonable(x):
    """x with ∞ and NaN as strings ("inf"), which every JSON reader accepts, and tensors left out."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items() if not isinstance(v, torch.Tensor)}
    return [jsonable(v) for v in x] if isinstance(x, (list, tuple)) else x


def to_json(x, indent: int | None = None) -> str:
    return json.dumps(jsonable(x), indent=indent)
