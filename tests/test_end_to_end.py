"""prepare_data.py -> train.py -> eval.py on a tiny GPT-2 and a synthetic corpus of 3 related tasks.

Besides the pipeline itself, the limits of τ and the shape the papers report: the stronger the prior,
the closer every adapter stays to Θ; under a given τ, tasks with more data move farther from Θ.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import prepare, read_log, train_run, write_hf_checkpoint

import eval as evaluate_cli
from bora import load_checkpoint
from data import load_split

SIZES = {"alpha": 4, "beta": 12, "gamma": 36}  # training documents per task
SWEEP = ("--lr", "5e-3", "--max-epochs", "3", "--seed", "1")  # the same for every τ: only τ differs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    return prepare(root, SIZES), write_hf_checkpoint(root / "tiny-gpt2"), root


@pytest.fixture(scope="module")
def sweep(corpus) -> dict[str, Path]:
    """One run per τ on the same data, seed and learning rate: {tau: run folder}."""
    data, hf, root = corpus
    return {tau: train_run(data, hf, root / f"tau{tau}", "--tau", tau, *SWEEP) for tau in ("0", "10", "1000")}


def eval_json(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluate_cli.main([*args, "--json"])
    return json.loads(out.getvalue())


def direct_nll(model, split, block_size: int) -> tuple[list[float], list[int]]:
    """Per-task summed NLL and scored tokens, one document at a time, no padding: the reference."""
    nll, tokens = [0.0] * len(model.task_names), [0] * len(model.task_names)
    with torch.no_grad():
        for i in range(len(split)):
            doc = torch.as_tensor(split.document(i).astype("int64"))[: block_size + 1]
            task, p = int(split.task_ids[i]), int(split.prompt_lens[i])
            logits = model(doc[None, :-1], torch.tensor([task]))  # (1, T, V)
            scored = slice(p - 1, None)  # logits at position j predict token j+1; the first text token is p
            nll[task] += F.cross_entropy(logits[0, scored], doc[1:][scored], reduction="sum").item()
            tokens[task] += len(doc[1:][scored])
    return nll, tokens


def test_prepare_train_eval(corpus):
    data, hf, root = corpus
    out = train_run(data, hf, root / "e2e", "--tau", "100", "--lr", "1e-2", "--max-epochs", "2")
    vals = [r for r in read_log(out) if r["kind"] == "val"]
    assert [v["epoch"] for v in vals] == [0, 1, 2]
    assert vals[-1]["ll_task_avg"] > vals[0]["ll_task_avg"]  # validation NLL went down from the base model

    report = eval_json(str(out / "ckpt.pt"), "--split", "val")["checkpoints"][0]
    model, ckpt = load_checkpoint(out / "ckpt.pt")
    assert report["epoch"] == ckpt.epoch >= 1
    nll, tokens = direct_nll(model, load_split(data, "val"), block_size=32)
    for d, task in enumerate(report["tasks"]):
        assert task["tokens"] == tokens[d] and task["train_docs"] == SIZES[task["task"]]
        assert task["ll"] == pytest.approx(-nll[d] / tokens[d], rel=1e-5)
        assert task["ppl"] == pytest.approx(math.exp(nll[d] / tokens[d]), rel=1e-5)
    overall = report["overall"]
    assert overall["ppl_token_weighted"] == pytest.approx(math.exp(sum(nll) / sum(tokens)), rel=1e-5)
    task_avg_ll = sum(-n / t for n, t in zip(nll, tokens)) / 3
    assert overall["ll_task_avg"] == pytest.approx(task_avg_ll, rel=1e-5)
    assert overall["ppl_task_avg"] == pytest.approx(math.exp(-task_avg_ll), rel=1e-5)
    logged = next(v for v in vals if v["epoch"] == ckpt.epoch)
    assert overall["ll_task_avg"] == pytest.approx(logged["ll_task_avg"], rel=1e-5)  # train's own validation


def test_tau_inf_is_one_adapter_for_all_tasks(corpus):
    data, hf, root = corpus
    out = train_run(data, hf, root / "tauinf", "--tau", "inf", "--max-epochs", "1")
    model, ckpt = load_checkpoint(out / "last.pt")  # after one epoch, whether it was the best or not
    assert ckpt.shared and ckpt.epoch == 1
    assert all(v.shape[0] == 0 for k, v in ckpt.adapters.items() if k.endswith((".A", ".B")))  # no θ_d at all
    idx = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        outputs = [model(idx, torch.tensor([task])) for task in (0, 1, 2, -1)]
        base = model.gpt.transformer.h[0].attn.c_attn.B_mean
    assert base.abs().max() > 0  # Θ was trained: the outputs below are not trivially the base model's
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
    assert torch.equal(model.distances(), torch.zeros(3))


def test_distances_shrink_as_tau_grows(sweep):
    # last.pt: every run after exactly the same number of steps (ckpt.pt is each run's best epoch)
    loaded = {tau: load_checkpoint(run / "last.pt") for tau, run in sweep.items()}
    assert all(ckpt.epoch == 3 for _, ckpt in loaded.values())
    d = {tau: model.distances() for tau, (model, _) in loaded.items()}
    assert (d["0"] > d["10"]).all() and (d["10"] > d["1000"]).all(), d


def test_tasks_with_more_data_sit_farther_from_theta(sweep):
    report = eval_json(str(sweep["10"] / "ckpt.pt"))["checkpoints"][0]
    by_size = sorted(report["tasks"], key=lambda t: t["train_docs"])
    assert [t["train_docs"] for t in by_size] == [4, 12, 36]
    assert by_size[0]["distance"] < by_size[1]["distance"] < by_size[2]["distance"], by_size


def test_comparison_table_over_tau(sweep, capsys):
    runs = [str(sweep[tau] / "ckpt.pt") for tau in ("10", "0", "1000")]
    evaluate_cli.main(runs)
    table = capsys.readouterr().out
    assert "tau=10" in table and "vs tau=0" in table and "vs tau=1000" in table and "task-averaged" in table
