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

import cli  # first: Ctrl-C while the imports below load is one line (cli.exit_on_interrupt)

cli.exit_on_interrupt(__name__)

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bora import BoRA, load_checkpoint
from cli import ArgumentParser, all_sum, keep_freed_memory, one_line_errors, pick_device, to_json
from data import Split, load_meta, load_split, make_batch, pass_groups, rank_share, require_scored
from files import writing


@torch.no_grad()
def score_documents(model: BoRA, split: Split, block_size: int, pass_tokens: int, device: str,
                    autocast=nullcontext(), label: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """Each document's NLL, summed over its scored tokens (n_docs,), and its number of scored tokens (n_docs,).
    Documents are scored grouped by length, at most pass_tokens positions a pass (data.pass_groups): each
    document's sum is the same in any grouping."""
    was_training, started, shown = model.training, time.time(), time.time()
    model.eval()  # no adapter dropout while measuring
    nll, tokens = np.zeros(len(split)), np.zeros(len(split), dtype=np.int64)
    rank, ranks = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = rank_share(pass_groups(split, list(range(len(split))), block_size, pass_tokens), rank, ranks)
    done, total = 0, sum(len(docs) for docs in mine)  # torchrun: this rank's passes
    for docs in mine:
        x, y, t = make_batch(split, docs, block_size, device)
        with autocast:
            nll[docs] = model(x, t, y).sum(1).double().cpu().numpy()  # each document's NLL (in float32)
        tokens[docs] = (y != -1).sum(1).cpu().numpy()
        done += len(docs)
        if rank == 0 and (time.time() - shown > 10 or (done == total and time.time() - started > 10)):
            rate, shown = done / (time.time() - started), time.time()
            print(f"{label}: {done}/{total} docs, {rate:.1f} docs/s, {(total - done) / rate:.0f} s left",
                  file=sys.stderr, flush=True)
    model.train(was_training)
    if dist.is_initialized():  # each document was scored by one rank: the sums are every document's scores
        both = all_sum(torch.from_numpy(np.stack([nll, tokens.astype(np.float64)])).to(device)).cpu().numpy()
        nll, tokens = both[0], both[1].astype(np.int64)
    return nll, tokens


def summarise(nll: np.ndarray, tokens: np.ndarray, task_ids: np.ndarray, num_tasks: int, task_names=None) -> dict:
    """Mean log-likelihood per token and perplexity: per task, token-weighted (every token counts once: big
    tasks dominate) and averaged over tasks (every task counts once: the papers' tables)."""
    task_nll, task_tokens = np.bincount(task_ids, nll, num_tasks), np.bincount(task_ids, tokens, num_tasks)
    if (task_tokens == 0).any():  # exp(0 / 0) is no perplexity: refuse rather than report 1.0
        empty = int(task_tokens.argmin())
        raise ValueError(f"task {task_names[empty] if task_names else empty!r} has no scored token to measure")
    ll = (-task_nll / task_tokens).tolist()
    token_ll, task_ll = float(-task_nll.sum() / task_tokens.sum()), sum(ll) / len(ll)
    return {"ll": ll, "ppl": [math.exp(-v) for v in ll], "tokens": task_tokens.astype(int).tolist(),
            "ll_token_weighted": token_ll, "ppl_token_weighted": math.exp(-token_ll),
            "ll_task_avg": task_ll, "ppl_task_avg": math.exp(-task_ll)}


def evaluate(model: BoRA, split: Split, block_size: int, pass_tokens: int, device: str, autocast=nullcontext(),
             label: str = "eval") -> dict:
    """summarise(score_documents(...)): the numbers eval.py reports; train.py validates with this same function."""
    nll, tokens = score_documents(model, split, block_size, pass_tokens, device, autocast, label)
    return summarise(nll, tokens, split.task_ids, len(model.task_names), model.task_names)


# ---- How sure: a bootstrap over documents ----

def resampled_documents(task_ids: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """(samples, n_docs) document indices: each row redraws every task's documents with replacement, as
    many as the task has (a stratified bootstrap: the test set's design, resampled). The draw depends only
    on the split and the seed, so every checkpoint scored on the same split gets the same rows: paired."""
    by_task = np.argsort(task_ids, kind="stable")  # positions grouped by task
    counts = np.bincount(task_ids)
    first, size = np.repeat(np.cumsum(counts) - counts, counts), np.repeat(counts, counts)  # (n,) of each position's task
    u = np.random.default_rng(seed).random((samples, len(task_ids)))
    return by_task[first + (u * size).astype(np.int64)]  # position j keeps its task in every row


def bootstrap_ll(nll: np.ndarray, tokens: np.ndarray, task_ids: np.ndarray, rows: np.ndarray, num_tasks: int
                 ) -> dict[str, np.ndarray]:
    """The log-likelihoods of summarise() in every resampled row: per task (samples, D), overall (samples,)."""
    onehot = np.eye(num_tasks)[task_ids[rows[0]]]  # (n, D): the task of each position, the same in every row
    task_nll, task_tokens = nll[rows] @ onehot, tokens[rows] @ onehot  # (samples, D)
    ll = -task_nll / task_tokens
    return {"ll": ll, "ll_task_avg": ll.mean(1), "ll_token_weighted": -task_nll.sum(1) / task_tokens.sum(1)}


def interval(values: np.ndarray) -> list:
    """The central 95 % of the bootstrap values (along the first axis)."""
    return np.percentile(values, [2.5, 97.5], axis=0).T.tolist()


def report(nll: np.ndarray, tokens: np.ndarray, task_ids: np.ndarray, num_tasks: int, samples: int = 1000,
           seed: int = 0, task_names: list[str] | None = None) -> dict:
    """summarise() with 95 % intervals for every perplexity; "bootstrap" keeps the resampled log-likelihoods."""
    m = summarise(nll, tokens, task_ids, num_tasks, task_names)
    if not samples:
        return {**m, "ppl_interval": [None] * num_tasks, "bootstrap": None}
    boot = bootstrap_ll(nll, tokens, task_ids, resampled_documents(task_ids, samples, seed), num_tasks)
    return {**m, "ppl_interval": interval(np.exp(-boot["ll"])), "bootstrap": boot,
            **{k + "_interval": interval(np.exp(-boot[k.replace("ppl", "ll")])) for k in ("ppl_task_avg", "ppl_token_weighted")}}


def evaluate_checkpoint(path: str, split: str = "test", data: str | None = None, batch_size: int = 16,
                        device: str = "cpu", samples: int = 1000, seed: int = 0) -> dict:
    """Every number eval.py reports for one checkpoint on one split, as a JSON-ready dict; "bootstrap" holds
    the resampled log-likelihoods (for paired comparisons) and is not part of the JSON."""
    model, ckpt = load_checkpoint(path, device)
    data = data or ckpt.data_path
    if load_meta(data)["fingerprint"] != ckpt.data_id:
        raise ValueError(f"{data} is not the dataset {path} was trained on (its documents or splits differ: prepared "
                         f"from another source, --seed or --split?); pass the right folder with --data")
    s, D = load_split(data, split), len(model.task_names)
    block_size = ckpt.args["block_size"]
    require_scored(s, model.task_names, block_size, split)
    nll, tokens = score_documents(model, s, block_size, batch_size * block_size, device,
                                  label=f"{path} {split}")  # float32 on every device: these are the numbers we report
    m = report(nll, tokens, s.task_ids, D, samples, seed, model.task_names)
    columns = dict(task=model.task_names, train_docs=ckpt.train_sizes, docs=np.bincount(s.task_ids, minlength=D).tolist(),
                   tokens=m["tokens"], ll=m["ll"], ppl=m["ppl"], ppl_interval=m["ppl_interval"],
                   distance=model.distances().tolist())  # ‖θ_d − Θ‖ over all adapted layers (0 when τ = ∞)
    overall = {k: m[k] for k in ("ll_token_weighted", "ppl_token_weighted", "ll_task_avg", "ppl_task_avg",
                                 "ppl_token_weighted_interval", "ppl_task_avg_interval") if k in m}
    return {"checkpoint": str(path), "tau": ckpt.tau, "epoch": ckpt.epoch, "split": split, "data": str(data),
            "data_id": ckpt.data_id, "tasks": [dict(zip(columns, row)) for row in zip(*columns.values())],
            "overall": {**overall, "docs": len(s), "tokens": sum(m["tokens"])}, "bootstrap": m["bootstrap"]}


def improvements(results: list[dict]) -> list[dict]:
    """The first checkpoint's relative improvement over each other, (ppl_other − ppl_first) / ppl_other, with
    its 95 % interval from the same resampled documents for both (paired: the documents' own difficulty,
    shared by both models, cancels) and whether the interval excludes 0."""
    gain = lambda first, other: (other - first) / other  # noqa: E731  also on arrays of bootstrap values
    first = results[0]
    out = []
    for r in results[1:]:
        g = {"checkpoint": r["checkpoint"], "tau": r["tau"],
             "tasks": {a["task"]: gain(a["ppl"], b["ppl"]) for a, b in zip(first["tasks"], r["tasks"])},
             **{k: gain(first["overall"][k], r["overall"][k]) for k in ("ppl_task_avg", "ppl_token_weighted")}}
        if first["bootstrap"] is not None and r["bootstrap"] is not None and r["data_id"] == first["data_id"]:
            a, b = first["bootstrap"], r["bootstrap"]
            per_task = interval(gain(np.exp(-a["ll"]), np.exp(-b["ll"])))
            g["tasks_interval"] = {t["task"]: i for t, i in zip(first["tasks"], per_task)}
            for k in ("ppl_task_avg", "ppl_token_weighted"):
                g[k + "_interval"] = interval(gain(np.exp(-a[k.replace("ppl", "ll")]), np.exp(-b[k.replace("ppl", "ll")])))
        out.append(g)
    return out


def span(iv: list | None, fmt: str = ".2f") -> str:
    return f"[{iv[0]:{fmt}}, {iv[1]:{fmt}}]" if iv else ""


def print_one(r: dict) -> None:
    print(f"{r['checkpoint']} (tau={r['tau']:g}, epoch {r['epoch']}): {r['split']} split of {r['data']}")
    print(f"{'task':<20} {'train docs':>10} {'docs':>6} {'tokens':>8} {'ll/token':>9} {'ppl':>9} {'95% interval':>20} "
          f"{'‖θ_d−Θ‖':>9}")
    for t in r["tasks"]:
        print(f"{t['task']:<20} {t['train_docs']:>10} {t['docs']:>6} {t['tokens']:>8} {t['ll']:>9.4f} {t['ppl']:>9.3f} "
              f"{span(t['ppl_interval']):>20} {t['distance']:>9.4f}")
    o = r["overall"]
    print(f"{'all tokens':<20} {'':>10} {o['docs']:>6} {o['tokens']:>8} {o['ll_token_weighted']:>9.4f} "
          f"{o['ppl_token_weighted']:>9.3f} {span(o.get('ppl_token_weighted_interval')):>20}   token-weighted: "
          "exp(Σ NLL / Σ tokens)")
    print(f"{'task average':<37} {'':>8} {o['ll_task_avg']:>9.4f} {o['ppl_task_avg']:>9.3f} "
          f"{span(o.get('ppl_task_avg_interval')):>20}   task-averaged, as in the papers")
    if o.get("ppl_task_avg_interval"):
        print("95% intervals: bootstrap over the documents of each task (few documents: read them as rough)")


def versus(g: float, iv: list | None) -> str:
    """+3.2% [+1.0, +5.4]*: the gain, its interval, and * when the interval excludes 0."""
    return f"{g:+.1%} {span(iv, '+.1%')}" + ("*" if iv and (iv[0] > 0 or iv[1] < 0) else " " if iv else "")


def print_table(results: list[dict], gains: list[dict]) -> None:
    names, w = [f"tau={r['tau']:g}" for r in results], 27 if "ppl_task_avg_interval" in gains[0] else 10
    for i, r in enumerate(results):
        print(f"[{i + 1}] {names[i]:<12} {r['checkpoint']} (epoch {r['epoch']})")
    print(f"{results[0]['split']} perplexity (lower is better); 'vs' = relative improvement of [1] over the other"
          + ("\nwith its 95% interval (paired bootstrap over documents); * = the interval excludes 0" if w > 10 else ""))
    print(f"{'task':<20} {'train docs':>10}" + "".join(f"{n:>12}" for n in names) +
          "".join(f"{'vs ' + n:>{w + 2}}" for n in names[1:]))
    for j, t in enumerate(results[0]["tasks"]):
        print(f"{t['task']:<20} {t['train_docs']:>10}" + "".join(f"{r['tasks'][j]['ppl']:>12.3f}" for r in results)
              + "".join(f"{versus(g['tasks'][t['task']], g.get('tasks_interval', {}).get(t['task'])):>{w + 2}}"
                        for g in gains))
    for key, text in (("ppl_task_avg", "task-averaged"), ("ppl_token_weighted", "token-weighted")):
        print(f"{text:<31}" + "".join(f"{r['overall'][key]:>12.3f}" for r in results)
              + "".join(f"{versus(g[key], g.get(key + '_interval')):>{w + 2}}" for g in gains))
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
    with writing(Path(file).parent, file):
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
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of the documents for the 95%% intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    args = p.parse_args(argv)
    if args.bootstrap < 0 or args.bootstrap == 1:
        p.error(f"--bootstrap {args.bootstrap}: give 0 (no intervals) or at least 2 resamples (1000 is plenty)")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    keep_freed_memory()
    with one_line_errors():
        if args.plot:
            pyplot()  # fail before the slow part if matplotlib is missing
        device = pick_device(args.device)
        results = [evaluate_checkpoint(c, args.split, args.data, args.batch_size, device, args.bootstrap, args.seed)
                   for c in args.ckpts]
        if any([t["task"] for t in r["tasks"]] != [t["task"] for t in results[0]["tasks"]] for r in results):
            raise ValueError("the checkpoints were trained on different tasks; compare runs on the same data")
        if args.plot:
            plot(results, args.plot)
    gains = improvements(results)
    if args.json:
        checkpoints = [{k: v for k, v in r.items() if k != "bootstrap"} for r in results]
        print(to_json({"checkpoints": checkpoints, "relative_improvement_of_first": gains}, indent=2))
    else:
        print_one(results[0]) if len(results) == 1 else print_table(results, gains)
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
