"""What every script shares where a user's input enters: one-line errors, interruptions, the device, torchrun's
ranks, JSON output, and the C allocator's setting that keeps a CPU step from paying for fresh memory pages.

Nothing here is part of the method; it is the boundary that keeps a mistake from becoming a traceback. Scripts
import this module first, before torch (whose import takes seconds), and call exit_on_interrupt(__name__)."""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line ("error: ..."), not the usage block."""

    def parse_known_args(self, args=None, namespace=None):
        # argparse takes a value like "-inf" or "-1e-3" for a flag ("expected one argument"): glue it to its
        # option, "--tau=-inf", so that the value gets the value's own message
        args, glued = list(sys.argv[1:] if args is None else args), []
        for arg in args:
            action = self._option_string_actions.get(glued[-1]) if glued else None
            if action is not None and action.nargs is None and arg.startswith("-") and is_number(arg):
                glued[-1] += "=" + arg
            else:
                glued.append(arg)
        return super().parse_known_args(glued, namespace)

    def error(self, message: str):
        sys.exit(f"error: {message}")


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---- Interruptions: Ctrl-C and SIGTERM (`kill`, a scheduler's stop) ----

def exit_on_interrupt(module: str) -> None:
    """Run as a script (module == "__main__"), Ctrl-C or SIGTERM ends it at once with one line until main()
    enters one_line_errors: the imports have nothing to lose, and an interrupt inside torch's would
    print a traceback, or abort."""
    if module == "__main__":
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _exit_at_once)


def _exit_at_once(signum, frame) -> None:
    os.write(2, b"interrupted\n")
    os._exit(1)


class Interrupts:
    """The handler of Ctrl-C and SIGTERM inside one_line_errors: KeyboardInterrupt, except between hold()
    and release(), where the first one waits for release(), so that what must not stop half-way (an
    optimiser's update, a folder swap) ends first."""

    def __init__(self):
        self.held = self.pending = False

    def __call__(self, signum, frame) -> None:
        if not self.held:
            raise KeyboardInterrupt
        self.pending = True

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        """End the hold; an interrupt that came during it arrives now."""
        pending, self.held, self.pending = self.pending, False, False
        if pending:
            raise KeyboardInterrupt


interrupts = Interrupts()


@contextmanager
def uninterrupted() -> Iterator[None]:
    """A block that Ctrl-C and SIGTERM do not stop half-way: an interrupt during it arrives at its end."""
    interrupts.hold()
    try:
        yield
    except BaseException:
        interrupts.held = interrupts.pending = False  # the block's own error says more than an interrupt
        raise
    interrupts.release()


@contextmanager
def one_line_errors(interrupted: str = "interrupted") -> Iterator[None]:
    """A user's mistake (ValueError) or the system's refusal (OSError: no such file, disk full) ends the
    script with one line on stderr and exit status 1; so does Ctrl-C or SIGTERM, with the line `interrupted`
    (what the script's own handler of KeyboardInterrupt has not said better)."""
    main_thread = threading.current_thread() is threading.main_thread()  # where signals can be handled
    before = {s: signal.signal(s, interrupts) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        yield
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(interrupted)
    finally:
        interrupts.held = interrupts.pending = False
        for s, handler in before.items():  # in a script, the work is done or its error said: a signal during
            signal.signal(s, signal.SIG_IGN if handler is _exit_at_once else handler)  # the exit would only cut it short


def pick_device(name: str = "auto") -> str:
    """auto = cuda > mps > cpu; a device this machine lacks is a one-line error, not a traceback later."""
    import torch  # here, not at the top: scripts import this module before torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {name!r} is not usable here ({str(e).splitlines()[0]}); try --device auto") from None
    return name


def all_sum(x):
    """x (a tensor) summed in place over torchrun's ranks (one process: x as it is). Once a rank has ended
    (failed, or stopped by Ctrl-C), the others' sums fail, and to them that is an interruption, as Ctrl-C is."""
    import torch.distributed as dist  # here, not at the top: scripts import this module before torch
    if dist.is_initialized():
        try:
            dist.all_reduce(x)  # op=SUM
        except RuntimeError as e:  # gloo: "Connection closed by peer"; torchrun is ending every rank anyway
            raise KeyboardInterrupt(str(e).splitlines()[0]) from None
    return x


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for the next allocation instead of returning it to the OS. Every
    training step frees and allocates again the same GB of activations; memory given back returns as
    fresh pages, which the kernel zero-fills one page fault at a time (measured: a third of a CPU
    step). With blocks up to 32 MB taken from the heap (all of a step's, since GPT.forward computes
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
    from torch import Tensor  # here, not at the top: scripts import this module before torch
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items() if not isinstance(v, Tensor)}
    return [jsonable(v) for v in x] if isinstance(x, (list, tuple)) else x


def to_json(x, indent: int | None = None) -> str:
    return json.dumps(jsonable(x), indent=indent)
