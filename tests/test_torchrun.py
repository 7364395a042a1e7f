"""torchrun: two CPU processes (gloo) share every batch and train exactly what one process trains; Ctrl-C,
SIGTERM or a rank that dies end the run with one line and a last.pt that --resume continues.

The one-process reference runs with one thread, as each torchrun rank does (torchrun sets OMP_NUM_THREADS=1):
a multi-threaded reduction adds in another order, and Adam turns last-bit differences into 1e-5 ones within
a few steps on these tiny random models. With equal thread counts the runs agree bit for bit.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import adapters, read_log, train_run

import eval as evaluate_cli
import train
from data import rank_share

TRAIN_PY = str(Path(train.__file__))
# 18 training documents in batches of 8, 8, 2: the full batches make 4 passes of 2 (2 per rank), the last one
# pass, so that rank 1 has none in that step; τ = 100 takes the (Θ, δ) step, where a prior counted twice shows
COMMON = ("--rank", "4", "--block-size", "32", "--batch-size", "8", "--micro-batch", "2", "--tau", "100")


def torchrun_argv(data: Path, hf: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", TRAIN_PY, "--data", str(data),
            "--init", str(hf), "--out", str(out), *COMMON, *extra]


def torchrun_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(data: Path, hf: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_argv(data, hf, out, *extra), env=torchrun_env(), capture_output=True, text=True,
                          timeout=600)


def one_thread_run(data: Path, hf: Path, out: Path, *extra: str) -> Path:
    """train.py in this process, with one thread like every torchrun rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_run(data, hf, out, *COMMON, *extra)
    finally:
        torch.set_num_threads(threads)


def assert_same_adapters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:  # the bar is 1e-5 relative; sharing whole passes and summing in float64 gives every bit
        assert ((a[key] - b[key]).norm() / a[key].norm()).item() <= 1e-5, key
        assert torch.equal(a[key], b[key]), key


def wait_for_epoch(run: subprocess.Popen, out: Path, epoch: int) -> None:
    """Until log.jsonl reports the validation after `epoch`; the run must still be going."""
    while f'"kind": "val", "epoch": {epoch},' not in ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text() or ""):
        assert run.poll() is None, run.communicate()
        time.sleep(0.2)


def our_lines(output: str) -> list[str]:
    """What train.py printed, without torchrun's own warnings and failure report."""
    return [line for line in output.splitlines() if line.startswith(("error:", "interrupted")) or 'train.py", line' in line]


def test_rank_share_deals_out_the_passes_one_process_would_make():
    passes = [[100 + 4 * p + j for j in range(4)] for p in range(4)] + [[116, 117]]  # 18 documents, 5 passes
    assert [rank_share(passes, r, 2) for r in range(2)] == [passes[:3], passes[3:]]  # 3 passes, then 2
    assert sum((rank_share(passes, r, 3) for r in range(3)), []) == passes  # every pass once, in order
    assert [len(rank_share(passes[:2], r, 3)) for r in range(3)] == [1, 1, 0]  # fewer passes than ranks
    assert rank_share(passes, 0, 1) == passes


@pytest.mark.parametrize("tau", ["100", "auto"])  # auto: the curvature is summed over the ranks with the gradient
def test_two_ranks_train_what_one_process_trains(small, tmp_path, tau):
    data, hf = small
    done = torchrun(data, hf, tmp_path / "ddp", "--max-epochs", "3", "--tau", tau)
    assert done.returncode == 0, done.stderr[-3000:]
    one = one_thread_run(data, hf, tmp_path / "one", "--max-epochs", "3", "--tau", tau)
    ddp = tmp_path / "ddp"

    assert sorted(f.name for f in ddp.iterdir()) == [".lock", "args.json", "ckpt.pt", "last.pt", "log.jsonl"]
    for name in ("ckpt.pt", "last.pt"):
        assert_same_adapters(adapters(one / name), adapters(ddp / name))
    a, b = (torch.load(run / "ckpt.pt", weights_only=True) for run in (one, ddp))
    assert a["epoch"] == b["epoch"] and a["val"].keys() == b["val"].keys()
    for key in a["val"]:  # per-task sums added over ranks: the same numbers, to float64's last digits
        assert a["val"][key] == pytest.approx(b["val"][key], rel=1e-12), key
    log = read_log(ddp)  # rank 0 alone wrote it: one start, one line per validation
    assert [r["kind"] for r in log].count("start") == 1 and log[0]["world_size"] == 2
    assert [r["epoch"] for r in log if r["kind"] == "val"] == [0, 1, 2, 3]
    assert "rank 0 of 2 (torchrun)" in done.stdout and done.stdout.count("epoch 3 val:") == 1
    assert [r["tau"] for r in log if r["kind"] == "val"] == [r["tau"] for r in read_log(one) if r["kind"] == "val"]

    # eval.py reads the torchrun checkpoint like any other, with the numbers training logged
    measured = evaluate_cli.evaluate_checkpoint(str(ddp / "ckpt.pt"), split="val")
    assert [t["ll"] for t in measured["tasks"]] == pytest.approx(b["val"]["ll"], rel=1e-6)


def stopped_after_epoch_1(data: Path, hf: Path, out: Path, stop) -> tuple[int, str, str]:
    """A long torchrun run, stopped by stop(the torchrun process) once epoch 1 is validated: its exit status
    and output. No rank may hang: every process must be gone within two minutes."""
    run = subprocess.Popen(torchrun_argv(data, hf, out, "--max-epochs", "1000", "--patience", "1000"),
                           env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_epoch(run, out, 1)
        stop(run)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    return run.returncode, stdout, stderr


def test_sigterm_ends_every_rank_with_one_line_and_resume_continues_exactly(small, tmp_path):
    data, hf = small
    out = tmp_path / "ddp"
    returncode, stdout, stderr = stopped_after_epoch_1(  # as a scheduler's stop or `kill` sends it
        data, hf, out, lambda run: run.send_signal(signal.SIGTERM))
    assert returncode != 0
    lines = our_lines(stdout + stderr)
    assert len(lines) == 1 and lines[0].startswith("interrupted at epoch ") and "--resume" in lines[0], stderr[-3000:]

    epoch = torch.load(out / "last.pt", weights_only=True)["resume"]["state"]["epoch"]  # the epoch it was in
    resumed = torchrun(data, hf, out, "--max-epochs", str(epoch), "--patience", "1000", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one = one_thread_run(data, hf, tmp_path / "one", "--max-epochs", str(epoch), "--patience", "1000")
    assert_same_adapters(adapters(one / "last.pt"), adapters(out / "last.pt"))


def test_a_rank_that_dies_ends_the_run_in_one_line_with_a_resumable_last_pt(small, tmp_path):
    """kill -9 of rank 1 (a crash, the OOM killer): rank 0's next sum fails, and it saves last.pt and says so."""
    data, hf = small
    out = tmp_path / "ddp"
    returncode, stdout, stderr = stopped_after_epoch_1(
        data, hf, out, lambda run: os.kill(worker_pid(run.pid, local_rank=1), signal.SIGKILL))
    assert returncode != 0
    lines = our_lines(stdout + stderr)
    assert len(lines) == 1 and lines[0].startswith("interrupted at epoch "), stderr[-3000:]
    resumed = torchrun(data, hf, out, "--max-epochs", "1", "--resume")  # last.pt is whole and this run's
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def worker_pid(torchrun_pid: int, local_rank: int) -> int:
    """The process torchrun started for local_rank (Linux: read from /proc)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == torchrun_pid and f"LOCAL_RANK={local_rank}\0" in Path(f"/proc/{pid}/environ").read_text():
                return pid
    raise AssertionError(f"torchrun {torchrun_pid} has no worker of local rank {local_rank}")
