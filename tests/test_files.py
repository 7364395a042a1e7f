"""The boundary every script shares (cli.py, files.py): interruptions at any moment, a full disk, writes
that are whole or not at all, a folder swapped in one step, flags whose values look like flags."""
from __future__ import annotations

import math
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import cli
import files

ROOT = Path(cli.__file__).parent
SCRIPTS = ("train", "prepare_data", "eval", "sample", "export", "bench")


# ---- interruptions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("signal_", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_a_script_starts_is_one_line(signal_):
    """Before main() takes over (torch's import takes seconds), Ctrl-C or SIGTERM ends the script at once."""
    code = "import cli, time; cli.exit_on_interrupt('__main__'); print('importing', flush=True); time.sleep(60)"
    run = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline() == "importing\n"
        run.send_signal(signal_)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert (run.returncode, err) == (1, "interrupted\n")


def test_a_signal_once_a_script_has_done_its_work_changes_nothing():
    """While a finished script exits (torch's teardown takes a while), Ctrl-C or SIGTERM is ignored: it used to
    kill the process silently (exit 143) after it had written its result."""
    code = ("import cli, time; cli.exit_on_interrupt('__main__')\nwith cli.one_line_errors():\n    pass\n"
            "print('done', flush=True); time.sleep(1)")
    run = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline() == "done\n"
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert (run.returncode, err) == (0, "")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_takes_over_interrupts_before_its_imports(script):
    lines = (ROOT / f"{script}.py").read_text().splitlines()
    imports = [i for i, line in enumerate(lines) if re.match(r"(import|from) ", line)
               and not line.startswith(("from __future__", "import cli "))]
    assert lines.index("cli.exit_on_interrupt(__name__)") < imports[0]


def test_signals_inside_one_line_errors_are_one_line_and_wait_for_a_held_block():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        with cli.one_line_errors("interrupted: nothing written"):
            os.kill(os.getpid(), signal.SIGTERM)  # `kill`: its handler runs before the next line
    assert e.value.code == "interrupted: nothing written"
    done = []
    with pytest.raises(SystemExit) as e:
        with cli.one_line_errors():
            with cli.uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("the block went on")
            done.append("never")
    assert e.value.code == "interrupted" and done == ["the block went on"]
    assert signal.getsignal(signal.SIGTERM) is before  # put back


def test_a_value_that_looks_like_a_flag_is_a_value():
    p = cli.ArgumentParser()
    p.add_argument("--tau", type=float)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("rest", nargs="*")
    assert p.parse_args(["--tau", "-inf"]).tau == -math.inf  # argparse alone: "expected one argument"
    assert p.parse_args(["--tau", "-1e-3", "--quiet"]).tau == -1e-3
    assert p.parse_args(["--quiet", "-5"]).rest == ["-5"]  # a flag without a value takes none
    with pytest.raises(SystemExit, match="^error: argument --tau: expected one argument$"):
        p.parse_args(["--tau", "--quiet"])


# ---- a full disk, whole writes, one-step swaps ------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch):
    """The file system says it has no space left (what a real full disk shows after a failed write)."""
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))


def test_a_full_disk_is_named_whatever_the_library_says(tmp_path, full_disk):
    dest = tmp_path / "last.pt"
    dest.write_bytes(b"the earlier checkpoint")

    def torch_save_on_a_full_disk(tmp):  # torch.save's words; numpy says "N requested and M written"
        tmp.write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(OSError, match=f"^no space left on the device of {re.escape(str(tmp_path))}: last.pt was not "
                                      "written; free some space"):
        files.atomic_write(dest, torch_save_on_a_full_disk)
    assert dest.read_bytes() == b"the earlier checkpoint" and os.listdir(tmp_path) == ["last.pt"]
    with pytest.raises(ValueError, match="a mistake"):  # a user's mistake stays itself
        with files.writing(tmp_path, "x"):
            raise ValueError("a mistake")


def test_other_write_failures_stay_themselves(tmp_path):
    with pytest.raises(RuntimeError, match="unexpected pos"):  # the disk has room: not a full disk
        with files.writing(tmp_path, "x"):
            raise RuntimeError("unexpected pos")
    with pytest.raises(FileNotFoundError):
        with files.writing(tmp_path, "x"):
            open(tmp_path / "no" / "such" / "file", "wb")


@pytest.mark.skipif(not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
                    reason="needs Linux's /dev/full, where every write fails for want of space")
def test_a_real_no_space_error_is_named():
    with pytest.raises(OSError, match="^no space left on the device of /dev: full was not written"):
        with files.writing(Path("/dev"), "full"), open("/dev/full", "wb") as f:
            f.write(b"x" * 100_000)


def test_a_line_is_appended_whole_or_not_at_all(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    files.append_line(log, '{"epoch": 0}')
    real_open = open

    class FillingUp:  # the disk fills up in the middle of the next line: 5 bytes go in, then no more
        def __init__(self, path, mode, buffering):
            self.file, self.room = real_open(path, mode, buffering=buffering), 5

        def write(self, data: bytes) -> int:
            if not self.room:
                raise OSError(28, "No space left on device")
            n = self.file.write(data[:self.room])
            self.room -= n
            return n

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(files, "open", FillingUp, raising=False)
    with pytest.raises(OSError, match="no space left on the device of"):
        files.append_line(log, '{"epoch": 1, "a long record": true}')
    assert log.read_text() == '{"epoch": 0}\n'


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "which").write_text("a")
    (tmp_path / "b" / "which").write_text("b")
    if not files.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this system cannot swap two paths in one step")
    assert [(tmp_path / x / "which").read_text() for x in "ab"] == ["b", "a"]
    with pytest.raises(FileNotFoundError):
        files.exchange(tmp_path / "a", tmp_path / "missing")
