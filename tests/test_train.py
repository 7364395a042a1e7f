"""train.py: the objective (unbiased, exact micro-batches), checkpoints, exact resume, run safety, refusals.

Everything runs on CPU with the tiny GPT-2 and the small three-task corpus of conftest.py.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import adapters, perturb, prepare, prior_by_hand, random_split, read_log, train_run, write_hf_checkpoint

import bora
import files
import train
from bora import CKPT_FORMAT, BoRA, LoRAConfig
from data import EOT, forward_passes, load_meta, load_split, make_batch, pass_groups
from gpt2 import GPT

def perturbed_bora(hf: Path, shared: bool = False, seed: int = 0) -> BoRA:
    """A BoRA of the three tasks whose adapters all differ (B ≠ 0), so that every gradient below is non-trivial."""
    torch.manual_seed(seed)
    model = BoRA(GPT.from_pretrained(str(hf)), ["alpha", "beta", "gamma"], LoRAConfig(rank=4), shared=shared)
    return perturb(model, seed=seed).train()


def passes(split, doc_ids: list[int], micro_batch: int = 8, block_size: int = 32, pass_tokens: int = 512):
    """The forward passes train.py makes of a batch: at most pass_tokens positions, micro_batch documents each."""
    groups = pass_groups(split, doc_ids, block_size, pass_tokens, micro_batch)
    return list(forward_passes(split, groups, block_size, "cpu"))


# ---- the objective ------------------------------------------------------------------------------


def direct_objective(model: BoRA, split, tau: float, block_size: int = 32) -> float:
    """L = Σ_i nll_i + τ/2 · Σ_d ‖θ_d − Θ‖², one document at a time: the full-data objective."""
    total = 0.0
    with torch.no_grad():
        for i in range(len(split)):
            x, y, t = make_batch(split, [i], block_size, "cpu")
            logits = model(x, t)  # (1, T, V): the whole softmax, scored by hand
            nll = torch.nn.functional.cross_entropy(logits[0], y[0], ignore_index=-1, reduction="sum")
            total += nll.item() / (y != -1).sum().item()
        return total + prior_by_hand(model, tau)


@pytest.mark.parametrize("batch_size", [4, 7])  # 7 does not divide the 18 documents: a short last batch
def test_step_objective_averaged_over_an_epoch_is_the_full_objective(small, batch_size):
    """Unbiasedness, exactly: every document is in one of the epoch's S batches, so the mean of the S step
    losses is L, whatever each batch's mix of tasks (with the small task often absent)."""
    data, hf = small
    split = load_split(data, "train")
    model = perturbed_bora(hf).eval()  # no dropout: the same loss every time
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # measure, never move
    S = -(-len(split) // batch_size)
    full = direct_objective(model, split, tau=10.0)
    for seed in range(3):  # any order of the documents
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()
        steps = [train.train_step(model, opt, passes(split, order[k:k + batch_size]), S, 10.0)
                 for k in range(0, len(split), batch_size)]
        assert len(steps) == S
        assert sum(nll + prior for nll, prior in steps) / S == pytest.approx(full, rel=1e-6, abs=1e-6)


def test_token_sum_likelihood_is_the_exact_log_probability(small):
    data, hf = small
    split = load_split(data, "train")
    model = perturbed_bora(hf).eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    x, y, t = make_batch(split, list(range(len(split))), 32, "cpu")
    nll, _ = train.train_step(model, opt, passes(split, list(range(len(split)))), 1, 0.0, "token-sum")
    with torch.no_grad():
        log_p = torch.log_softmax(model(x, t), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]  # (N, T)
        assert nll == pytest.approx(-log_p[y != -1].sum().item(), rel=1e-6)  # −log P(D | θ)


def test_prior_is_tau_half_squared_distance_and_vanishes_at_the_limits(small):
    model = perturbed_bora(small[1])
    assert train.prior(model, 10.0).item() == pytest.approx(prior_by_hand(model, 10.0), rel=1e-6)
    assert train.prior(model, 0.0).item() == 0.0
    assert train.prior(perturbed_bora(small[1], shared=True), math.inf).item() == 0.0


def test_theta_map_is_the_mean_of_the_task_adapters(small):
    """The prior's gradient w.r.t. Θ vanishes exactly when Θ is the mean of the θ_d."""
    model = perturbed_bora(small[1])
    layers = list(model.adapted.values())

    def theta_grads() -> list[torch.Tensor]:
        model.zero_grad()
        train.prior(model, 10.0).backward()
        return [g for layer in layers for g in (layer.A_mean.grad, layer.B_mean.grad)]

    assert max(g.abs().max() for g in theta_grads()) > 1e-3  # Θ away from the mean: pulled
    train.theta_as_task_mean(model)
    assert max(g.abs().max() for g in theta_grads()) < 1e-6


def test_offset_steps_are_adam_on_theta_and_the_offsets(small):
    """step_offsets takes exactly the steps AdamW would take on Θ and δ_d = θ_d − Θ (same objective)."""
    model = perturbed_bora(small[1])
    layers = list(model.adapted.values())

    def objective(As, Bs, A_means, B_means) -> torch.Tensor:  # a stand-in likelihood, plus the prior with τ = 10
        return sum((A.sin() * (d + 1)).sum() + (B ** 2).sum() + 5 * ((A - Am) ** 2).sum() + 5 * ((B - Bm) ** 2).sum()
                   for d, (A, B, Am, Bm) in enumerate(zip(As, Bs, A_means, B_means)))

    theta = [p.detach().clone().requires_grad_() for m in layers for p in (m.A_mean, m.B_mean)]  # Θ, then δ
    delta = [(p - p0).detach().clone().requires_grad_() for m in layers
             for p, p0 in ((m.A, m.A_mean), (m.B, m.B_mean))]
    reference = torch.optim.AdamW(theta + delta, lr=0.01, weight_decay=0.0)
    ours = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.0)
    for _ in range(3):
        reference.zero_grad()
        objective([t + d for t, d in zip(theta[0::2], delta[0::2])], [t + d for t, d in zip(theta[1::2], delta[1::2])],
                  theta[0::2], theta[1::2]).backward()
        reference.step()
        ours.zero_grad()
        objective([m.A for m in layers], [m.B for m in layers], [m.A_mean for m in layers],
                  [m.B_mean for m in layers]).backward()
        train.step_offsets(model, ours)
    for i, m in enumerate(layers):
        assert torch.allclose(m.A_mean, theta[2 * i], atol=1e-6) and torch.allclose(m.B_mean, theta[2 * i + 1], atol=1e-6)
        assert torch.allclose(m.A, theta[2 * i] + delta[2 * i], atol=1e-6)
        assert torch.allclose(m.B, theta[2 * i + 1] + delta[2 * i + 1], atol=1e-6)


def test_micro_batches_give_the_same_step(small):
    data, hf = small
    split = load_split(data, "train")
    whole = perturbed_bora(hf)
    parts = copy.deepcopy(whole)
    results = []
    for model, micro in ((whole, 10), (parts, 3)):  # 3 does not divide 10: a short last micro-batch
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        results.append(train.train_step(model, opt, passes(split, list(range(10)), micro), 2, 10.0))  # all 3 tasks
    assert results[0] == pytest.approx(results[1], rel=1e-5)  # likelihood and prior terms
    for (name, a), b in zip(whole.named_parameters(), parts.parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
            assert torch.allclose(a, b, atol=1e-6), name


VARIED = [2, 70, 5, 33, 12, 90, 8, 41, 3, 64, 17, 25, 4, 66]  # tokens per document; block size 64 cuts three


def test_forward_passes_hold_every_document_once_trimmed_under_the_budget():
    split, doc_ids = random_split(VARIED), [11, 3, 0, 7, 13, 5, 9, 1, 4, 12, 10, 2, 8, 6]
    grouped = passes(split, doc_ids, 0, 64, 100)
    alone = [make_batch(split, [i], 64, "cpu") for i in doc_ids]  # each document in a pass of its own
    assert sorted(r for p in grouped for r in unpadded_rows(p)) == sorted(r for b in alone for r in unpadded_rows(b))
    for x, y, _ in grouped:
        assert x.numel() <= 100 or len(x) == 1  # the budget: rows × the pass's longest row
        assert (x[:, -1] != EOT).any()  # trimmed: the longest row fills the width
    assert max(len(x) for x, _, _ in grouped) > 3  # short documents share a pass ...
    assert max(len(x) for x, _, _ in passes(split, doc_ids, 3, 64, 100)) == 3  # ... or 3 at most
    padded = len(doc_ids) * max(x.shape[1] for x, _, _ in alone)  # one pass, every row as wide as the longest
    assert sum(x.numel() for x, _, _ in grouped) < padded / 2


def unpadded_rows(batch) -> list[tuple]:
    """Each row as (inputs, targets, task) without its padding, which is never scored (random_split's tokens
    are never EOT, so EOT in the inputs is padding)."""
    x, y, t = batch
    n = (x != EOT).sum(1).tolist()
    assert all((y[j, n[j]:] == -1).all() for j in range(len(x)))
    return [(x[j, :n[j]].tolist(), y[j, :n[j]].tolist(), t[j].item()) for j in range(len(x))]


@pytest.mark.parametrize("likelihood", ["doc-mean", "token-sum"])
def test_sorted_trimmed_passes_give_the_step_of_one_forward_over_the_whole_batch(small, likelihood):
    """The same 14 documents of varied length as one padded forward, or sorted into passes of <= 100 positions:
    the same gradients and the same AdamW step, to float rounding."""
    split, doc_ids = random_split(VARIED), list(range(len(VARIED)))
    whole = perturbed_bora(small[1])
    grouped = copy.deepcopy(whole)
    results = []
    for model, batch in ((whole, [make_batch(split, doc_ids, 64, "cpu")]),
                         (grouped, passes(split, doc_ids, 0, 64, 100))):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        results.append(train.train_step(model, opt, batch, 3, 10.0, likelihood))
    assert results[0] == pytest.approx(results[1], rel=1e-5)
    for (name, a), b in zip(whole.named_parameters(), grouped.parameters()):
        if a.requires_grad:  # float32 sums in another order: equal to 1e-5 of the gradient's scale
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5 * a.grad.abs().max().item()), name
            assert torch.allclose(a, b, atol=1e-6), name


def test_tau_zero_one_task_leaves_the_others_untouched(small):
    data, hf = small
    split = load_split(data, "train")
    model = perturbed_bora(hf)
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    alpha_docs = [i for i in range(len(split)) if split.task_ids[i] == 0]
    for _ in range(3):
        train.train_step(model, opt, passes(split, alpha_docs), 4, 0.0)
    after = model.adapter_state_dict()
    for key in before:
        if key.endswith((".A", ".B")):
            assert not torch.equal(after[key][0], before[key][0])  # task 0 learned
            assert torch.equal(after[key][1:], before[key][1:])  # tasks 1, 2: bit for bit the same
        else:  # Θ: no data uses it and τ = 0 cuts the prior, so it is only kept at the tasks' mean
            assert torch.allclose(after[key], after[key[:-len("_mean")]].mean(0), atol=1e-7)


def test_tau_zero_stores_theta_as_the_mean_of_the_task_adapters(small, tmp_path):
    data, hf = small
    out = train_run(data, hf, tmp_path / "run", "--tau", "0", "--max-epochs", "1")
    for name in ("ckpt.pt", "last.pt"):
        a = adapters(out / name)
        for key in (k for k in a if k.endswith((".A_mean", ".B_mean"))):
            assert torch.allclose(a[key], a[key[:-len("_mean")]].mean(0), atol=1e-7), (name, key)


def test_default_pass_size_is_sized_for_the_device(small, tmp_path):
    """--pass-tokens 0 (the default) becomes 512 on a CPU, which a laptop holds; args.json records what ran."""
    data, hf = small
    run = train_run(data, hf, tmp_path / "run", "--tau", "10", "--max-epochs", "1")
    assert json.loads((run / "args.json").read_text())["pass_tokens"] == 512


def test_flags_come_from_the_config_dataclass():
    c = train.parse_args(["--tau", "inf", "--targets", "c_attn,mlp.c_proj", "--micro-batch", "4", "--resume"])
    assert isinstance(c, train.TrainConfig) and float(c.tau) == math.inf and c.micro_batch == 4 and c.resume
    assert c.targets == "c_attn,mlp.c_proj" and LoRAConfig(targets=c.targets).targets == ("c_attn", "mlp.c_proj")
    d = train.parse_args([])
    assert (d.rank, d.alpha, d.block_size, d.batch_size, d.max_epochs, d.patience) == (16, 16.0, 256, 64, 20, 5)
    assert d.data == "data/emotion" and d.pass_tokens == d.micro_batch == 0  # sized when the run starts
    assert d.tau == "auto"  # τ from the data unless the user fixes it


# ---- checkpoints, resume, divergence ------------------------------------------------------------


def test_checkpoint_contents_and_plain_types(small, tmp_path):
    data, hf = small
    out = train_run(data, hf, tmp_path / "run", "--tau", "10", "--max-epochs", "1")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # only tensors and plain Python values
    assert ckpt["format"] == CKPT_FORMAT and ckpt["base_model"] == str(hf.resolve())
    assert ckpt["task_names"] == ["alpha", "beta", "gamma"] and ckpt["train_sizes"] == [4, 6, 8]
    assert ckpt["tau"] == 10.0 and ckpt["shared"] is False and ckpt["lora_config"]["rank"] == 4
    assert ckpt["gpt_config"]["n_embd"] == 32 and ckpt["args"]["block_size"] == 32 and ckpt["task_prompt"] is True
    assert ckpt["data_id"] == load_meta(data)["fingerprint"] and ckpt["resume"] is None
    assert all(".transformer.wte" not in k and "c_attn.base" not in k for k in ckpt["adapters"])  # adapters only
    last = torch.load(out / "last.pt", weights_only=True)
    assert {"optimizer", "rng", "state"} <= last["resume"].keys() and last["resume"]["state"]["epoch"] == 2
    records = read_log(out)
    assert records[-1]["kind"] == "done" and sum(r["kind"] == "val" for r in records) == 2


def test_resume_after_an_epoch_ends_with_the_same_adapters(small, tmp_path, monkeypatch):
    data, hf = small
    common = ("--tau", "10", "--lr", "1e-2", "--max-epochs", "2", "--dropout", "0.1", "--batch-size", "8")
    straight = train_run(data, hf, tmp_path / "straight", *common)
    real_write = bora.atomic_write

    def killed_after_epoch_1(path, write):
        real_write(path, write)
        if path.name == "last.pt" and torch.load(path, weights_only=True)["resume"]["state"]["epoch"] == 2:
            raise SystemExit("killed")  # the process dies right after epoch 1 is on disk

    monkeypatch.setattr(bora, "atomic_write", killed_after_epoch_1)
    with pytest.raises(SystemExit):
        train_run(data, hf, tmp_path / "resumed", *common)
    monkeypatch.setattr(bora, "atomic_write", real_write)
    resumed = train_run(data, hf, tmp_path / "resumed", *common, "--resume")
    for name in ("last.pt", "ckpt.pt"):
        a, b = adapters(straight / name), adapters(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["epoch"] for r in read_log(resumed) if r["kind"] == "val"] == [0, 1, 2]


@pytest.mark.parametrize("tau, step", [("10", 3), ("auto", 8)])  # auto: in epoch 2, after τ has moved once
def test_ctrl_c_mid_epoch_saves_last_pt_and_resume_continues_exactly(small, tmp_path, monkeypatch, tau, step):
    """Two threads, dropout on, interrupted in the middle of an epoch: the resumed run ends bit for bit equal."""
    data, hf = small
    torch.set_num_threads(2)
    common = ("--tau", tau, "--lr", "1e-2", "--max-epochs", "3", "--dropout", "0.1", "--batch-size", "4",
              "--micro-batch", "2")
    straight = train_run(data, hf, tmp_path / "straight", *common)
    real_step, steps = train.train_step, []

    def ctrl_c_at(*args):
        steps.append(1)
        if len(steps) == step:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", ctrl_c_at)
    with pytest.raises(SystemExit) as e:
        train_run(data, hf, tmp_path / "resumed", *common)
    epoch, done = 1 + (step - 1) // 5, (step - 1) % 5  # 18 documents in batches of 4: 5 steps an epoch
    assert str(e.value.code).startswith(f"interrupted at epoch {epoch}, step {done}/5") and "--resume" in str(e.value.code)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["resume"]["state"]["done_in_epoch"] == done
    monkeypatch.setattr(train, "train_step", real_step)
    resumed = train_run(data, hf, tmp_path / "resumed", *common, "--resume")
    a, b = adapters(straight / "last.pt"), adapters(resumed / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    taus = [[r["tau"] for r in read_log(run) if r["kind"] == "val"] for run in (straight, resumed)]
    assert taus[0] == taus[1] and (tau != "auto" or len(set(taus[0])) > 1)  # the same τ, moving for auto


def test_a_killed_run_saves_last_pt_and_says_so_in_one_line(small, tmp_path):
    """SIGTERM (`kill`, a cluster's time limit) stops a real train.py process like Ctrl-C: one line, a last.pt."""
    data, hf = small
    out = tmp_path / "run"
    argv = [sys.executable, str(Path(train.__file__)), "--data", str(data), "--init", str(hf), "--out", str(out),
            "--tau", "10", "--block-size", "32", "--batch-size", "2", "--max-epochs", "1000", "--patience", "1000"]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not run.stdout.readline().startswith("about "):  # the estimate: three steps are done
            assert run.poll() is None, run.stderr.read()
        run.terminate()
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 1 and err.startswith("interrupted at epoch ") and err.count("\n") == 1, err
    assert torch.load(out / "last.pt", weights_only=True)["resume"]["state"]["step"] >= 3


# Runs train.py with a pause at one chosen moment of one step, announced on stdout, for a real signal to land
# there: "backward", between two micro-batches (dropout has drawn, gradients half-summed), or "update", between
# AdamW's step and the shift of the task adapters by Θ's move (step_offsets): the weights half-stepped.
PAUSED_TRAIN = """
import sys, time
import cli
cli.exit_on_interrupt("__main__")
import train
from torch.optim.optimizer import register_optimizer_step_post_hook
where, at_step, steps = sys.argv[1], int(sys.argv[2]), []

def pause():  # until the test's signal: it raises KeyboardInterrupt here, or, during an update, waits for its end
    print("paused", flush=True)
    for _ in range(6000):
        if cli.interrupts.pending:
            break
        time.sleep(0.01)

def forward_passes(*args):
    steps.append(1)
    for k, batch in enumerate(real_forward_passes(*args)):
        yield batch
        if where == "backward" and len(steps) == at_step and k == 0:
            pause()

real_forward_passes, train.forward_passes = train.forward_passes, forward_passes
register_optimizer_step_post_hook(
    lambda *_: pause() if where == "update" and len(steps) == at_step else None)
sys.argv = ["train.py", *sys.argv[3:]]
train.main()
"""


def test_a_real_interruption_mid_step_resumes_bit_for_bit(small, tmp_path):
    """Ctrl-C in the middle of a step's backward and SIGTERM in the middle of its update, dropout on, two
    threads: last.pt holds the step's start (or its end), and --resume ends exactly where the uninterrupted run
    ends. Every run is a process of its own, with the same threads."""
    data, hf = small
    argv = ["--data", str(data), "--init", str(hf), "--rank", "4", "--block-size", "32", "--batch-size", "4",
            "--micro-batch", "2", "--max-epochs", "1", "--tau", "10", "--lr", "1e-2", "--dropout", "0.1", "--device", "cpu"]
    script, env = str(Path(train.__file__)), {**os.environ, "OMP_NUM_THREADS": "2"}  # 5 steps an epoch
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, script, *argv, "--out", str(straight)], check=True, capture_output=True, env=env)
    for signal_, where in ((signal.SIGINT, "backward"), (signal.SIGTERM, "update")):
        out = tmp_path / where
        run = subprocess.Popen([sys.executable, "-c", PAUSED_TRAIN, where, "4", *argv, "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            while run.stdout.readline().strip() != "paused":
                assert run.poll() is None, run.stderr.read()
            run.send_signal(signal_)
            _, err = run.communicate(timeout=60)
        finally:
            run.kill()
        assert run.returncode == 1 and err.startswith("interrupted at epoch 1, step ") and err.count("\n") == 1, err
        assert torch.load(out / "last.pt", weights_only=True)["resume"]["state"]["step"] == (3 if where == "backward" else 4)
        subprocess.run([sys.executable, script, *argv, "--out", str(out), "--resume"], check=True, capture_output=True,
                       env=env)
        for name in ("ckpt.pt", "last.pt"):
            a, b = adapters(straight / name), adapters(out / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (where, name)


def test_snapshots_inside_an_epoch(small, tmp_path, monkeypatch):
    data, hf = small
    saved = []
    real_write = bora.atomic_write
    monkeypatch.setattr(bora, "atomic_write", lambda path, write: (saved.append(path.name), real_write(path, write)))
    train_run(data, hf, tmp_path / "run", "--tau", "10", "--max-epochs", "1", "--batch-size", "4", "--save-every", "1e-9")
    assert saved.count("last.pt") == 5 + 1  # after each of the 5 steps, and at the end of the epoch


def test_nan_loss_stops_with_a_message_and_keeps_the_best(small, tmp_path, monkeypatch):
    data, hf = small
    real_prior, calls = train.prior, []

    def prior_nan_from_step_4(model, tau):
        calls.append(1)
        return real_prior(model, tau) * (float("nan") if len(calls) >= 4 else 1.0)

    monkeypatch.setattr(train, "prior", prior_nan_from_step_4)
    with pytest.raises(SystemExit) as e:  # 18 documents in batches of 8: 3 steps an epoch
        train_run(data, hf, tmp_path / "run", "--tau", "10", "--batch-size", "8", "--max-epochs", "3")
    message = str(e.value.code)
    assert message.startswith("error:") and "step 4" in message and "smaller --lr" in message and "\n" not in message
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)  # intact, from the last good epoch
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["adapters"].values())


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_best(small, tmp_path, monkeypatch):
    data, hf = small
    real_save = torch.save

    def save(obj, path):  # the disk fills up while last.pt is written; torch then says only "unexpected pos"
        if Path(path).name.startswith(".last.pt"):
            Path(path).write_bytes(b"part of a checkpoint")
            monkeypatch.setattr(files.shutil, "disk_usage", lambda p: SimpleNamespace(free=0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    message = refusal("--data", str(data), "--init", str(hf), "--out", str(out), "--block-size", "32", "--rank", "4",
                      "--max-epochs", "1")
    assert message == f"error: no space left on the device of {out}: last.pt was not written; free some space and run again"
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == 1 and not list(out.glob(".*.tmp"))


# ---- runs never destroy each other; refusals are one line ---------------------------------------


def refusal(*args: str) -> str:
    with pytest.raises(SystemExit) as e:
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(list(args))
    message = str(e.value.code)  # sys.exit("error: ...") exits with status 1 and prints this on stderr
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_refusals(small, tmp_path):
    data, hf = small
    base = ["--data", str(data), "--init", str(hf), "--out", str(tmp_path / "o"), "--block-size", "32", "--rank", "4"]
    assert "does not exist" in refusal(*base, "--data", str(tmp_path / "nowhere"))
    assert "--tau" in refusal(*base, "--tau", "-1")
    assert "--lr" in refusal(*base, "--lr", "abc")
    assert "--lr" in refusal(*base, "--lr", "0")
    assert "c_foo" in refusal(*base, "--targets", "c_attn,c_foo")
    assert "--block-size 300" in refusal(*base, "--block-size", "300")  # the tiny model has 256 positions
    assert "not found" in refusal(*base, "--init", "./missing")
    assert "unknown model 'gpt3'" in refusal(*base, "--init", "gpt3")
    assert "--no-such-flag" in refusal(*base, "--no-such-flag")
    if not torch.cuda.is_available():
        assert "device 'cuda' is not usable here" in refusal(*base, "--device", "cuda")
    assert "last.pt" in refusal(*base, "--resume")  # nothing to resume yet
    assert "--tau -inf is not valid" in refusal(*base, "--tau", "-inf")  # not argparse's "expected one argument"
    for flag, value in (("--alpha", "nan"), ("--alpha", "inf"), ("--lr", "inf"), ("--lr", "nan"), ("--tau", "nan"),
                        ("--dropout", "nan"), ("--dropout", "1.0"), ("--rank", "0"), ("--save-every", "nan")):
        assert f"{flag} {value} is not valid" in refusal(*base, flag, value)
    (tmp_path / "corpus.csv").write_text("text,task\n")
    assert "is a file, not a dataset folder" in refusal(*base, "--data", str(tmp_path / "corpus.csv"))
    assert not (tmp_path / "o").exists()  # a failed run leaves no --out behind


def test_nothing_to_score_is_refused_naming_the_task(small, tmp_path):
    """At --block-size 1 every target of a document lies in its "[task]" prompt: no token is scored, and a
    perplexity over no tokens would read as a perfect 1.0."""
    data, hf = small
    message = refusal("--data", str(data), "--init", str(hf), "--out", str(tmp_path / "o"), "--block-size", "1")
    assert "task 'alpha'" in message and "train" in message and "--block-size" in message
    split = load_split(data, "train")
    assert f"--block-size {split.prompt_lens[split.task_ids == 0].min()} or more" in message  # alpha's "[alpha]"
    assert not (tmp_path / "o").exists()
    longest = str(split.prompt_lens.max())  # at this block size every document scores its first text token
    train_run(data, hf, tmp_path / "o", "--block-size", longest, "--max-epochs", "1")
    assert all(n > 0 for n in read_log(tmp_path / "o")[-2]["tokens"])


def test_a_finished_run_is_never_overwritten_by_accident(small, tmp_path):
    data, hf = small
    out = train_run(data, hf, tmp_path / "run", "--tau", "10", "--max-epochs", "1")
    before = (out / "ckpt.pt").read_bytes()
    message = refusal("--data", str(data), "--init", str(hf), "--out", str(out), "--block-size", "32", "--rank", "4")
    assert "already holds a run" in message and "--resume" in message and "--overwrite" in message
    assert (out / "ckpt.pt").read_bytes() == before
    train_run(data, hf, out, "--tau", "100", "--max-epochs", "1", "--overwrite")  # explicit: a new run
    assert torch.load(out / "ckpt.pt", weights_only=True)["tau"] == 100.0
    assert [r["epoch"] for r in read_log(out) if r["kind"] == "val"] == [0, 1]  # the old log is gone too


def test_a_second_process_on_the_same_out_is_refused(small, tmp_path):
    data, hf = small
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert "another train.py is running" in refusal("--data", str(data), "--init", str(hf), "--out", str(out))
    finally:
        holder.kill()
        holder.wait()
    train_run(data, hf, out, "--tau", "10", "--max-epochs", "1")  # a killed holder leaves no stuck lock


def test_stray_temp_files_of_a_killed_write_are_cleaned_up(small, tmp_path):
    data, hf = small
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.12345.tmp").write_bytes(b"half a checkpoint")
    train_run(data, hf, out, "--tau", "10", "--max-epochs", "1")
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_resume_refuses_other_data_or_model(small, tmp_path):
    data, hf = small
    out = train_run(data, hf, tmp_path / "run", "--tau", "10", "--max-epochs", "1")
    other_data = prepare(tmp_path, {"alpha": 4, "beta": 6, "gamma": 8}, seed=1)  # same tasks, other texts
    other_model = write_hf_checkpoint(tmp_path / "other-gpt2", seed=1)
    base = ["--init", str(hf), "--data", str(data), "--out", str(out), "--block-size", "32", "--rank", "4",
            "--tau", "10", "--resume"]
    assert "different data_id" in refusal(*base, "--data", str(other_data))
    assert "different base_model" in refusal(*base, "--init", str(other_model))
    assert "different tau" in refusal(*base, "--tau", "100")


# ---- τ from the data ------------------------------------------------------------------------------


def test_the_fisher_comes_from_each_documents_own_gradient(small):
    """add_fisher's h_d = Σ_{i in task d} g_i², read off the per-row adapter copies of batched passes, equals
    the same sum with every document's gradient of −log P(doc) computed alone, one backward each."""
    data, hf = small
    split = load_split(data, "train")
    model = perturbed_bora(hf).eval()
    for m in model.adapted.values():
        m.keep_rows = True
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    curvature = {path: (torch.zeros_like(m.A), torch.zeros_like(m.B)) for path, m in model.adapted.items()}
    train.train_step(model, opt, passes(split, list(range(len(split))), 5), 3, 10.0, "doc-mean", curvature=curvature)
    expected = {path: (torch.zeros_like(m.A), torch.zeros_like(m.B)) for path, m in model.adapted.items()}
    for i in range(len(split)):
        model.zero_grad()
        x, y, t = make_batch(split, [i], 32, "cpu")
        model(x, t, y).sum().backward()  # this document's −log P, summed over its tokens
        for path, m in model.adapted.items():
            task = int(t)
            expected[path][0][task] += m.A.grad[task].square()
            expected[path][1][task] += m.B.grad[task].square()
    for path in curvature:
        for got, want in zip(curvature[path], expected[path]):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-10), path


def random_effects(model: BoRA, tau_true: float, tau_trained: float, seed: int = 0) -> dict:
    """Put model's adapters where training at tau_trained would put them in the quadratic picture, for a world
    drawn from it: θ_d ~ N(0, 1/tau_true); task d's data measure θ_d with precision h_d (more data, larger h);
    the optimum is θ_d = (h z_d + τ Θ) / (h + τ) with Θ the mean of the θ_d. Returns the curvature h."""
    g = torch.Generator().manual_seed(seed)
    curvature = {}
    with torch.no_grad():
        for path, m in model.adapted.items():
            pair = []
            for theta, mean in ((m.A, m.A_mean), (m.B, m.B_mean)):
                D = theta.shape[0]
                h = torch.logspace(-1, 2, D).view(D, *[1] * (theta.dim() - 1)).expand_as(theta).clone()
                h *= torch.rand(theta.shape, generator=g) + 0.5  # per parameter, too
                truth = torch.randn(theta.shape, generator=g) / math.sqrt(tau_true) if tau_true < math.inf else 0
                z = truth + torch.randn(theta.shape, generator=g) / h.sqrt()  # the data's estimate of θ_d
                centre = z.mean(0)
                for _ in range(200):  # the joint optimum of θ_d and Θ
                    estimate = (h * z + tau_trained * centre) / (h + tau_trained)
                    centre = estimate.mean(0)
                theta.copy_(estimate)
                mean.copy_(centre)
                pair.append(h)
            curvature[path] = tuple(pair)
    return curvature


def test_evidence_finds_the_prior_precision_of_a_known_world(small):
    """In a world drawn from the quadratic picture with τ = 3, adapters trained at τ = 3 return 3: the
    evidence's fixed point is the world's own τ. From a weaker or a stronger prior, one step goes the right
    way and not past it. Identical tasks (the spread is noise) ask for more, tasks with nothing in common
    (a huge spread) for less; and on the doc-mean scale, documents of 10 tokens ask for τ / 10."""
    model = BoRA(GPT.from_pretrained(str(small[1])), [f"t{d}" for d in range(8)], LoRAConfig(rank=4))
    estimate = lambda truth, trained, n=1.0: train.evidence_tau(model, random_effects(model, truth, trained * n), trained, n)  # noqa: E731
    assert estimate(3.0, 3.0) == pytest.approx(3.0, rel=0.1)
    assert estimate(3.0, 0.3, n=10.0) == pytest.approx(0.3, rel=0.1)  # trained at the doc-mean τ 0.3 = 3 / 10
    assert 0.3 < estimate(3.0, 0.3) <= 3.3 and 2.7 <= estimate(3.0, 30.0) < 30.0
    for trained in (0.3, 3.0, 30.0):
        assert estimate(math.inf, trained) > trained and estimate(1e-3, trained) < min(trained, 0.01)


# ---- the τ path -----------------------------------------------------------------------------------

def test_a_task_model_started_from_the_shared_one_computes_the_shared_model(small):
    data, hf = small
    shared = perturbed_bora(hf, shared=True)
    ckpt = train.checkpoint(train.TrainConfig(data=str(data), init=str(hf), tau="inf"), shared, load_meta(data), 1, {},
                            math.inf)
    tasks = BoRA(GPT.from_pretrained(str(hf)), ["alpha", "beta", "gamma"], LoRAConfig(rank=4))
    train.start_from(tasks, ckpt)
    x, y, t = make_batch(load_split(data, "val"), list(range(6)), 32, "cpu")
    with torch.no_grad():
        assert torch.equal(tasks(x, t), shared(x, t)) and train.prior(tasks, 10.0).item() == 0.0


def val_rows(run: Path) -> list[dict]:
    return [r for r in read_log(run) if r["kind"] == "val"]


def test_the_tau_path_races_every_tau_from_one_first_epoch_and_keeps_the_best(small, tmp_path):
    data, hf = small
    taus = ("0", "10", "100", "inf")
    out = train_run(data, hf, tmp_path / "path", "--tau", ",".join(taus), "--max-epochs", "4", "--batch-size", "8")
    # one first epoch, from the base model, at the smallest τ > 0
    assert [(r["epoch"], float(r["tau"])) for r in val_rows(out / "first")] == [(0, 10.0), (1, 10.0)]
    runs = {tau: val_rows(out / f"tau_{tau}") for tau in taus}
    for tau, rows in runs.items():  # every τ went on from it (epoch 2 on), trained at its own τ
        assert rows[0]["epoch"] == 2 and all(float(r["tau"]) == float(tau) for r in rows), tau
    # the race: after epoch 2 the better half goes on, after epoch 3 the better of those, to the end
    best_at = lambda tau, epoch: max(r["ll_task_avg"] for r in runs[tau] if r["epoch"] <= epoch)  # noqa: E731
    on = sorted(taus, key=lambda tau: best_at(tau, 2), reverse=True)[:2]
    assert {tau for tau in taus if runs[tau][-1]["epoch"] >= 3} == set(on)
    winner = max(on, key=lambda tau: best_at(tau, 3))
    assert [tau for tau in taus if runs[tau][-1]["epoch"] == 4] == [winner]
    # OUT/ckpt.pt is the τ with the best validation, as the papers choose
    best = max(taus, key=lambda tau: best_at(tau, 4))
    chosen = torch.load(out / "ckpt.pt", weights_only=True)
    assert chosen["tau"] == float(best) and all(torch.equal(v, adapters(out / f"tau_{best}" / "ckpt.pt")[k])
                                                for k, v in chosen["adapters"].items())
    done = read_log(out)[-1]
    assert done["kind"] == "path done" and float(done["tau"]) == float(best) and done["epochs"][winner] == 4
    assert "at least 2" in refusal("--data", str(data), "--init", str(hf), "--out", str(tmp_path / "one"),
                                   "--tau", "0,inf", "--max-epochs", "1")


def test_a_tau_of_the_path_at_the_first_tau_is_the_plain_run_to_the_bit(small, tmp_path):
    """The first epoch, then epoch 2 on from its last.pt: exactly what one run at that τ does."""
    data, hf = small
    common = ("--max-epochs", "2", "--batch-size", "8", "--dropout", "0.1")  # dropout: the RNG travels too
    path = train_run(data, hf, tmp_path / "path", "--tau", "10,inf", *common)
    plain = train_run(data, hf, tmp_path / "plain", "--tau", "10", *common)
    for name in ("last.pt", "ckpt.pt"):
        a, b = adapters(path / "tau_10" / name), adapters(plain / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_the_tau_path_resumes_where_it_was_interrupted(small, tmp_path, monkeypatch):
    data, hf = small
    common = ("--tau", "0,10,inf", "--max-epochs", "3", "--batch-size", "8")
    straight = train_run(data, hf, tmp_path / "straight", *common)
    real_step, steps = train.train_step, []

    def ctrl_c_at_step_8(*args):  # 3 steps an epoch: the first epoch, then in the second τ's epoch 2
        steps.append(1)
        if len(steps) == 8:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", ctrl_c_at_step_8)
    with pytest.raises(SystemExit) as e:
        train_run(data, hf, tmp_path / "resumed", *common)
    assert "/tau_10" in str(e.value.code) and "--resume" in str(e.value.code)
    monkeypatch.setattr(train, "train_step", real_step)
    assert "already holds a run" in refusal("--data", str(data), "--init", str(hf), "--out", str(tmp_path / "resumed"),
                                            "--tau", "0,10,inf")
    resumed = train_run(data, hf, tmp_path / "resumed", *common, "--resume")
    for name in ("ckpt.pt", "first/last.pt", "tau_0/ckpt.pt", "tau_10/ckpt.pt", "tau_inf/ckpt.pt"):
        a, b = adapters(straight / name), adapters(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert read_log(resumed)[-1]["tau"] == read_log(straight)[-1]["tau"]
    # --overwrite starts the whole path afresh, old τ runs included
    again = train_run(data, hf, tmp_path / "resumed", *common, "--overwrite")
    assert [r["epoch"] for r in val_rows(again / "tau_0")][0] == 2 and len(read_log(again / "first")) == len(
        read_log(straight / "first"))
