"""Evaluate BoRA checkpoints: per-task perplexity, distances to the global mean, comparisons.

    python eval.py out/emotion/ckpt.pt                  # the test split of the data it was trained on
    python eval.py out/t100/ckpt.pt out/t0/ckpt.pt out/tinf/ckpt.pt --split val --plot ppl.png

Per task: documents, scored tokens, mean log-likelihood per token, perplexity, ‖θ_d − Θ‖ and the
task's training size (the papers plot distance against data size). Two overall numbers, because they
answer different questions: the token-weighted perplexity exp(Σ NLL / Σ tokens), where every token
counts once and big tasks dominate, and the task-averaged log-likelihood with its perplexity, where
every task counts once, as in the papers' tables.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from bora import BoRA, load_checkpoint
from cli import ArgumentParser, keep_freed_memory, one_line_errors, pick_device, to_json
from data import Split, forward_passes, load_meta, load_split


@torch.no_grad()
def evaluate(model: BoRA, split: Split, block_size: int, pass_tokens: int, device: str, autocast=nullcontext(),
             label: str = "eval") -> dict:
    """Mean log-likelihood per token and perplexity of a split: per task, token-weighted (every token
    counts once: big tasks dominate) and averaged over tasks (every task counts once: the papers' tables).
    Documents are scored grouped by length, at most pass_tokens positions a pass (forward_passes): the sums
    are the same in any order. train.py validates with this same function."""
    was_training, started, shown = model.training, time.time(), time.time()
    model.eval()  # no adapter dropout while measuring
    D = len(model.task_names)
    nll, tokens, done = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.int64), 0
    for x, y, t in forward_passes(split, list(range(len(split))), block_size, pass_tokens, device):
        with autocast:
            doc_nll = model(x, t, y).sum(1)  # (n,) each document's NLL, summed over its scored tokens
        nll.index_add_(0, t.cpu(), doc_nll.double().cpu())  # each row into its task's slot
        tokens.index_add_(0, t.cpu(), (y != -1).sum(1).cpu())
        done += len(t)
        if time.time() - shown > 10 or (done == len(split) and time.time() - started > 10):
            rate, shown = done / (time.time() - started), time.time()
            print(f"{label}: {done}/{len(split)} docs, {rate:.1f} docs/s, {(len(split) - done) / rate:.0f} s left",
                  file=sys.stderr, flush=True)
    model.train(was_training)
    ll = (-nll / tokens.clamp(min=1)).tolist()
    token_ll, task_ll = -nll.sum().item() / max(tokens.sum().item(), 1), sum(ll) / len(ll)
    return {"ll": ll, "ppl": [math.exp(-v) for v in ll], "tokens": tokens.tolist(),
            "ll_token_weighted": token_ll, "ppl_token_weighted": math.exp(-token_ll),
            "ll_task_avg": task_ll, "ppl_task_avg": math.exp(-task_ll)}


def evaluate_checkpoint(path: str, split: str = "test", data: str | None = None, batch_size: int = 16,
                        device: str = "cpu") -> dict:
    """Every number eval.py reports for one checkpoint on one split, as a JSON-ready dict."""
    model, ckpt = load_checkpoint(path, device)
    data = data or ckpt.data_path
    if load_meta(data)["fingerprint"] != ckpt.data_id:
        raise ValueError(f"{data} is not the dataset {path} was trained on (its documents or splits differ: prepared "
                         f"from another source, --seed or --split?); pass the right folder with --data")
    s = load_split(data, split)
    m = evaluate(model, s, ckpt.args["block_size"], batch_size * ckpt.args["block_size"], device,
                 label=f"{path} {split}")  # float32 on every device: these are the numbers we report
    columns = dict(task=model.task_names, train_docs=ckpt.train_sizes, docs=np.bincount(s.task_ids,
                   minlength=len(model.task_names)).tolist(), tokens=m["tokens"], ll=m["ll"], ppl=m["ppl"],
                   distance=model.distances().tolist())  # ‖θ_d − Θ‖ over all adapted layers (0 when τ = ∞)
    overall = {k: m[k] for k in ("ll_token_weighted", "ppl_token_weighted", "ll_task_avg", "ppl_task_avg")}
    return {"checkpoint": str(path), "tau": ckpt.tau, "epoch": ckpt.epoch, "split": split, "data": str(data),
            "tasks": [dict(zip(columns, row)) for row in zip(*columns.values())],
            "overall": {**overall, "docs": len(s), "tokens": sum(m["tokens"])}}


def improvements(results: list[dict]) -> list[dict]:
    """The first checkpoint's relative improvement over each other, (ppl_other − ppl_first) / ppl_other."""
    gain = lambda first, other: (other - first) / other  # noqa: E731
    first = results[0]
    return [{"checkpoint": r["checkpoint"], "tau": r["tau"],
             "tasks": {a["task"]: gain(a["ppl"], b["ppl"]) for a, b in zip(first["tasks"], r["tasks"])},
             **{k: gain(first["overall"][k], r["overall"][k]) for k in ("ppl_task_avg", "ppl_token_weighted")}}
            for r in results[1:]]


def print_one(r: dict) -> None:
    print(f"{r['checkpoint']} (tau={r['tau']:g}, epoch {r['epoch']}): {r['split']} split of {r['data']}")
    print(f"{'task':<20} {'train docs':>10} {'docs':>6} {'tokens':>8} {'ll/token':>9} {'ppl':>9} {'‖θ_d−Θ‖':>9}")
    for t in r["tasks"]:
        print(f"{t['task']:<20} {t['train_docs']:>10} {t['docs']:>6} {t['tokens']:>8} {t['ll']:>9.4f} {t['ppl']:>9.3f} "
              f"{t['distance']:>9.4f}")
    o = r["overall"]
    print(f"{'all tokens':<20} {'':>10} {o['docs']:>6} {o['tokens']:>8} {o['ll_token_weighted']:>9.4f} "
          f"{o['ppl_token_weighted']:>9.3f}   token-weighted: exp(Σ NLL / Σ tokens)")
    print(f"{'task average':<37} {'':>8} {o['ll_task_avg']:>9.4f} {o['ppl_task_avg']:>9.3f}   task-averaged, as in the papers")


def print_table(results: list[dict], gains: list[dict]) -> None:
    names = [f"tau={r['tau']:g}" for r in results]
    for i, r in enumerate(results):
        print(f"[{i + 1}] {names[i]:<12} {r['checkpoint']} (epoch {r['epoch']})")
    print(f"{results[0]['split']} perplexity (lower is better); 'vs' = relative improvement of [1] over the other")
    print(f"{'task':<20} {'train docs':>10}" + "".join(f"{n:>12}" for n in names) + "".join(f"{'vs ' + n:>14}" for n in names[1:]))
    for j, t in enumerate(results[0]["tasks"]):
        print(f"{t['task']:<20} {t['train_docs']:>10}" + "".join(f"{r['tasks'][j]['ppl']:>12.3f}" for r in results)
              + "".join(f"{g['tasks'][t['task']]:>+14.1%}" for g in gains))
    for key, text in (("ppl_task_avg", "task-averaged"), ("ppl_token_weighted", "token-weighted")):
        print(f"{text:<31}" + "".join(f"{r['overall'][key]:>12.3f}" for r in results) + "".join(f"{g[key]:>+14.1%}" for g in gains))
    print(f"\n{'‖θ_d − Θ‖':<20} {'train docs':>10}" + "".join(f"{n:>12}" for n in names))
    for j, t in enumerate(results[0]["tasks"]):
        print(f"{t['task']:<20} {t['train_docs']:>10}" + "".join(f"{r['tasks'][j]['distance']:>12.4f}" for r in results))


def pyplot():
    """matplotlib.pyplot drawing into files only, or a one-line error saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot(results: list[dict], file: str) -> None:
    """Perplexity against τ on a log axis; τ = 0 and τ = ∞ drawn one decade beyond the finite values."""
    plt, rs = pyplot(), sorted(results, key=lambda r: r["tau"])
    finite = [r["tau"] for r in rs if 0 < r["tau"] < math.inf] or [1.0]
    xs = [{0.0: min(finite) / 10, math.inf: max(finite) * 10}.get(r["tau"], r["tau"]) for r in rs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, t in enumerate(rs[0]["tasks"]):
        ax.plot(xs, [r["tasks"][j]["ppl"] for r in rs], lw=0.8, alpha=0.6, marker=".", label=t["task"])
    ax.plot(xs, [r["overall"]["ppl_task_avg"] for r in rs], lw=3, color="black", marker="o", label="task-averaged")
    ax.set_xscale("log")
    ax.set_xticks(xs, ["0" if r["tau"] == 0 else "∞" if math.isinf(r["tau"]) else f"{r['tau']:g}" for r in rs])
    ax.set(xlabel="τ (prior precision)", ylabel=f"{rs[0]['split']} perplexity")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description="Per-task perplexity and distances of BoRA checkpoints.")
    p.add_argument("ckpts", nargs="+", help="one or more ckpt.pt files written by train.py")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--data", help="dataset folder (default: the one each checkpoint was trained on)")
    p.add_argument("--batch-size", type=int, default=16, help="memory of one forward pass, in documents of the "
                   "run's block size: it bounds the positions a pass computes; the numbers do not depend on it")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of tables")
    p.add_argument("--plot", metavar="FILE.png", help="draw perplexity against tau (needs matplotlib)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    keep_freed_memory()
    with one_line_errors():
        if args.plot:
            pyplot()  # fail before the slow part if matplotlib is missing
        device = pick_device(args.device)
        results = [evaluate_checkpoint(c, args.split, args.data, args.batch_size, device) for c in args.ckpts]
        if any([t["task"] for t in r["tasks"]] != [t["task"] for t in results[0]["tasks"]] for r in results):
            raise ValueError("the checkpoints were trained on different tasks; compare runs on the same data")
        if args.plot:
            plot(results, args.plot)
    gains = improvements(results)
    if args.json:
        print(to_json({"checkpoints": results, "relative_improvement_of_first": gains}, indent=2))
    else:
        print_one(results[0]) if len(results) == 1 else print_table(results, gains)
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
