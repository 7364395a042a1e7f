"""What every script shares where a user's input enters: one-line errors, the device, torchrun's ranks, JSON output.

Nothing here is part of the method; it is the boundary that keeps a mistake from becoming a traceback."""
from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist


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


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed in place over torchrun's ranks (one process: x as it is). Once a rank has ended (failed, or
    stopped by Ctrl-C), the others' sums fail, and to them that is an interruption, as Ctrl-C is."""
    if dist.is_initialized():
        try:
            dist.all_reduce(x)  # op=SUM
        except RuntimeError as e:  # gloo: "Connection closed by peer"; torchrun is ending every rank anyway
            raise KeyboardInterrupt(str(e).splitlines()[0]) from None
    return x


def jsonable(x):
    """x with ∞ and NaN as strings ("inf"), which every JSON reader accepts, and tensors left out."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items() if not isinstance(v, torch.Tensor)}
    return [jsonable(v) for v in x] if isinstance(x, (list, tuple)) else x


def to_json(x, indent: int | None = None) -> str:
    return json.dumps(jsonable(x), indent=indent)
