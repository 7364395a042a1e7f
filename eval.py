"""Evaluate BoRA checkpoints: per-task perplexity, distances to the global mean, comparisons.

    python eval.py out/NAME/ckpt.pt                      # test split of the data it was trained on
    python eval.py out/t0/ckpt.pt out/t100/ckpt.pt out/tinf/ckpt.pt --split val --plot ppl.png

Per task: documents, scored tokens, mean log-likelihood per token, perplexity, ‖θ_d − Θ‖ and the
task's training size (the papers plot distance against data size). Two overall numbers, because
they answer different questions: the token-weighted perplexity exp(Σ NLL / Σ tokens) (every token
counts once, so big tasks dominate) and the task-averaged log-likelihood and its perplexity (every
task counts once: what the papers' tables report).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bora import BoRA, LoRAConfig
from gpt2 import GPT
from prepare_data import load_meta, load_split
from train import CKPT_FORMAT, data_identity, evaluate, jsonable, pick_device, summarise


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[BoRA, dict]:
    """Rebuild the trained BoRA from a train.py checkpoint: base GPT-2 + saved configs + adapters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one with train.py (it writes out/NAME/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # random bytes, a truncated file, a pickle with arbitrary objects
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); use a ckpt.pt written by train.py")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a train.py checkpoint (no format tag {CKPT_FORMAT!r}); use out/NAME/ckpt.pt")
    try:
        gpt = GPT.from_pretrained(ckpt["base_model"])
    except OSError as e:  # FileNotFoundError included
        raise FileNotFoundError(f"base model {ckpt['base_model']!r} of {path} is missing ({e}); "
                                f"put it back or download it") from None
    if asdict(gpt.config) != ckpt["gpt_config"]:
        raise ValueError(f"base model {ckpt['base_model']!r} has config {asdict(gpt.config)}, but {path} was "
                         f"trained on {ckpt['gpt_config']}: the base model changed")
    model = BoRA(gpt, ckpt["task_names"], LoRAConfig(**ckpt["lora_config"]), shared=ckpt["shared"])
    model.load_adapter_state_dict(ckpt["adapters"])  # strict: a mismatch is a one-line ValueError
    return model.to(device).eval(), ckpt


def evaluate_checkpoint(path: str | Path, split: str = "test", data: str | None = None,
                        batch_size: int = 16, device: str = "cpu") -> dict:
    """All numbers eval.py reports for one checkpoint on one split, as a JSON-ready dict."""
    model, ckpt = load_checkpoint(path, device)
    data = data or ckpt["data_path"]
    try:
        meta = load_meta(data)
    except FileNotFoundError as e:  # e.g. the dataset moved since training
        raise FileNotFoundError(f"{e}; or point --data at the dataset {path} was trained on") from None
    if data_identity(meta) != ckpt["data_meta"]:
        raise ValueError(f"{data} is not the dataset {path} was trained on (source file, tokenizer or "
                         f"tasks differ); pass the right folder with --data")
    s = load_split(data, split)
    num_tasks = len(ckpt["task_names"])
    # fp32 on every device: these are the numbers we report
    m = summarise(*evaluate(model, s, num_tasks, ckpt["args"]["block_size"], batch_size, device))
    docs = np.bincount(s.task_ids, minlength=num_tasks).tolist()
    distances = model.distances().tolist()  # ‖θ_d − Θ‖ over all adapted layers (0 when τ = ∞)
    tasks = [{"task": name, "train_docs": n_train, "docs": n_docs, "tokens": n_tok, "ll": ll, "ppl": ppl,
              "distance": dist}
             for name, n_train, n_docs, n_tok, ll, ppl, dist in
             zip(ckpt["task_names"], ckpt["train_sizes"], docs, m["tokens"], m["ll"], m["ppl"], distances)]
    overall = {k: m[k] for k in ("ll_token_weighted", "ppl_token_weighted", "ll_task_avg", "ppl_task_avg")}
    overall.update(docs=sum(docs), tokens=sum(m["tokens"]))
    return {"checkpoint": str(path), "tau": ckpt["tau"], "epoch": ckpt["epoch"], "split": split,
            "data": str(data), "source": ckpt["data_meta"]["source"], "tasks": tasks, "overall": overall}


def relative_improvement(first: float, other: float) -> float:
    """How much lower the first checkpoint's perplexity is, as a fraction of the other's."""
    return (other - first) / other


def improvements(results: list[dict]) -> list[dict]:
    """Per task and overall, the first checkpoint's relative improvement over each of the others."""
    first = results[0]
    return [{"checkpoint": r["checkpoint"], "tau": r["tau"],
             "tasks": {a["task"]: relative_improvement(a["ppl"], b["ppl"]) for a, b in zip(first["tasks"], r["tasks"])},
             "ppl_task_avg": relative_improvement(first["overall"]["ppl_task_avg"], r["overall"]["ppl_task_avg"]),
             "ppl_token_weighted": relative_improvement(first["overall"]["ppl_token_weighted"],
                                                        r["overall"]["ppl_token_weighted"])}
            for r in results[1:]]


def label(r: dict) -> str:
    return f"tau={r['tau']:g}"


def print_one(r: dict) -> None:
    print(f"{r['checkpoint']} ({label(r)}, epoch {r['epoch']}): {r['split']} split of {r['data']}")
    print(f"{'task':<20} {'train docs':>10} {'docs':>6} {'tokens':>8} {'ll/token':>9} {'ppl':>9} {'‖θ_d−Θ‖':>9}")
    for t in r["tasks"]:
        print(f"{t['task']:<20} {t['train_docs']:>10} {t['docs']:>6} {t['tokens']:>8} {t['ll']:>9.4f} "
              f"{t['ppl']:>9.3f} {t['distance']:>9.4f}")
    o = r["overall"]
    print(f"{'all tokens':<20} {'':>10} {o['docs']:>6} {o['tokens']:>8} {o['ll_token_weighted']:>9.4f} "
          f"{o['ppl_token_weighted']:>9.3f}   token-weighted: exp(Σ NLL / Σ tokens)")
    print(f"{'task average':<20} {'':>10} {'':>6} {'':>8} {o['ll_task_avg']:>9.4f} "
          f"{o['ppl_task_avg']:>9.3f}   task-averaged ll, as in the papers' tables")


def print_table(results: list[dict], gains: list[dict]) -> None:
    names = [label(r) for r in results]
    for i, r in enumerate(results):
        print(f"[{i + 1}] {names[i]:<12} {r['checkpoint']} (epoch {r['epoch']})")
    print(f"perplexity on the {results[0]['split']} split (lower is better); "
          f"'vs' = relative improvement of [1] over the other, (ppl_other − ppl_1) / ppl_other")
    head = "".join(f"{n:>12}" for n in names) + "".join(f"{'vs ' + n:>14}" for n in names[1:])
    print(f"{'task':<20} {'train docs':>10}" + head)
    for j, t in enumerate(results[0]["tasks"]):
        ppl = "".join(f"{r['tasks'][j]['ppl']:>12.3f}" for r in results)
        gain = "".join(f"{g['tasks'][t['task']]:>+14.1%}" for g in gains)
        print(f"{t['task']:<20} {t['train_docs']:>10}" + ppl + gain)
    for key, text in (("ppl_task_avg", "task-averaged"), ("ppl_token_weighted", "token-weighted")):
        ppl = "".join(f"{r['overall'][key]:>12.3f}" for r in results)
        print(f"{text:<31}" + ppl + "".join(f"{g[key]:>+14.1%}" for g in gains))
    print(f"\n{'‖θ_d − Θ‖':<20} {'train docs':>10}" + "".join(f"{n:>12}" for n in names))
    for j, t in enumerate(results[0]["tasks"]):
        distances = "".join(f"{r['tasks'][j]['distance']:>12.4f}" for r in results)
        print(f"{t['task']:<20} {t['train_docs']:>10}" + distances)


def pyplot():
    """matplotlib.pyplot drawing into files only, or a one-line error saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot(results: list[dict], file: str) -> None:
    """Perplexity against τ on a log axis; τ = 0 and τ = ∞ drawn one decade beyond the finite values."""
    plt = pyplot()
    finite = [r["tau"] for r in results if 0 < r["tau"] < math.inf]
    lo, hi = (min(finite) / 10, max(finite) * 10) if finite else (0.1, 10.0)
    position = {0.0: lo, math.inf: hi}  # where the two limits sit on the log axis
    rs = sorted(results, key=lambda r: r["tau"])
    xs = [position.get(r["tau"], r["tau"]) for r in rs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, t in enumerate(rs[0]["tasks"]):
        ax.plot(xs, [r["tasks"][j]["ppl"] for r in rs], lw=0.8, alpha=0.6, marker=".", label=t["task"])
    ax.plot(xs, [r["overall"]["ppl_task_avg"] for r in rs], lw=3, color="black", marker="o",
            label="task-averaged (exp of the mean ll over tasks)")
    ax.set_xscale("log")
    ax.set_xticks(xs, ["0" if r["tau"] == 0 else "∞" if math.isinf(r["tau"]) else f"{r['tau']:g}" for r in rs])
    ax.set_xlabel("τ (prior precision)")
    ax.set_ylabel(f"{rs[0]['split']} perplexity")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Per-task perplexity and distances of BoRA checkpoints.")
    p.add_argument("ckpts", nargs="+", help="one or more ckpt.pt files written by train.py")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--data", default=None, help="dataset folder (default: the one each checkpoint was trained on)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of tables")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw perplexity against tau (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        if args.plot:
            pyplot()  # fail before the slow part if matplotlib is missing
        device = pick_device(args.device)
        results = [evaluate_checkpoint(c, args.split, args.data, args.batch_size, device) for c in args.ckpts]
        same_data = [(r["source"], [t["task"] for t in r["tasks"]]) for r in results]
        if any(d != same_data[0] for d in same_data):
            raise ValueError("the checkpoints were trained on different datasets; compare runs on the same data")
        gains = improvements(results)
        if args.plot:
            plot(results, args.plot)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps(jsonable({"checkpoints": results, "relative_improvement_of_first": gains}), indent=2))
    elif len(results) == 1:
        print_one(results[0])
    else:
        print_table(results, gains)
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
