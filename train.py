"""Train BoRA: one LoRA adapter per task, all pulled towards a shared mean by a Gaussian prior.

    python prepare_data.py ...            # writes data/NAME (see its --help)
    python train.py --data data/NAME --out out/NAME --tau 100

BoRA's hierarchical model puts every task's adapter θ_d near a global mean Θ, θ_d ~ N(Θ, τ⁻¹ I).
Its MAP estimate minimises

    L(θ, Θ) = −Σ_d log P(D_d | θ_d)  +  τ/2 · Σ_d ‖θ_d − Θ‖²

Each step estimates the first term from the batch: nll_d, the mean token NLL of task d's sequences
in the batch, times N_d, task d's number of training documents. The second term is exact every step.
τ = 0 makes the adapters independent, τ = ∞ makes them one shared adapter (BoRA(shared=True)).
Outputs in --out: ckpt.pt (best validation epoch), last.pt (for --resume), log.jsonl, args.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bora import BoRA, LoRAConfig
from gpt2 import GPT, atomic_write
from prepare_data import Split, load_meta, load_split

CKPT_FORMAT = "bora-gpt2-ckpt/1"
EOT = 50256  # GPT-2's <|endoftext|>; fills the input after a document ends (its targets are -1)


@dataclass
class TrainConfig:
    data: str = "data/spotify"
    out: str = "out/spotify"
    init: str = "gpt2"  # GPT-2 name or a Hugging Face folder / .safetensors file
    tau: float = 100.0  # prior precision: 0 = independent adapters, inf = one shared adapter
    lr: float | None = None  # None = auto: 1e-5·τ clamped to [1e-4, 1e-2]
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("c_attn",)
    block_size: int = 256
    batch_size: int = 64
    micro_batch: int | None = None  # None = the whole batch in one forward
    max_epochs: int = 20
    patience: int = 5  # stop after this many epochs without a better validation log-likelihood
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False
    resume: bool = False
    log_every: int = 10


def auto_lr(tau: float) -> float:
    """The papers scale the learning rate with τ: 1e-5·τ, kept within [1e-4, 1e-2]."""
    return min(max(1e-5 * tau, 1e-4), 1e-2)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train task-indexed LoRA adapters with BoRA's hierarchical prior.")
    p.add_argument("--data", default=d.data, help="dataset folder written by prepare_data.py")
    p.add_argument("--out", default=d.out, help="run folder for ckpt.pt, last.pt, log.jsonl, args.json")
    p.add_argument("--init", default=d.init, help="base model: gpt2..gpt2-xl or a safetensors folder/file")
    p.add_argument("--tau", type=float, default=d.tau, help="prior precision τ; 0 = independent, inf = shared")
    p.add_argument("--lr", default="auto", help="learning rate, or auto = 1e-5·τ clamped to [1e-4, 1e-2]")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the adapters' input")
    p.add_argument("--targets", default=",".join(d.targets), help="comma list of c_attn, attn.c_proj, c_fc, mlp.c_proj")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per sequence; longer documents are cut")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="documents per optimiser step")
    p.add_argument("--micro-batch", type=int, default=None, help="documents per forward (gradient accumulation)")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the forward")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress lines")
    a = vars(p.parse_args(argv))
    a["lr"] = None if a["lr"] == "auto" else float(a["lr"])
    a["targets"] = tuple(t.strip() for t in a["targets"].split(",") if t.strip())
    return TrainConfig(**a)


def check_config(cfg: TrainConfig) -> None:
    if not cfg.tau >= 0:
        raise ValueError(f"--tau must be 0 or more (0 = independent adapters, inf = shared), got {cfg.tau}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"--lr must be positive or 'auto', got {cfg.lr}")
    for name in ("rank", "block_size", "batch_size", "max_epochs", "patience", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.micro_batch is not None and not 1 <= cfg.micro_batch <= cfg.batch_size:
        raise ValueError(f"--micro-batch must be between 1 and --batch-size {cfg.batch_size}, got {cfg.micro_batch}")


def pick_device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def autocast_for(device: str, dtype: str):
    """bf16 autocast on CUDA by default (the adapters and optimiser state stay fp32); fp32 elsewhere."""
    if dtype == "bfloat16" or (dtype == "auto" and device.startswith("cuda")):
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def data_identity(meta: dict) -> dict:
    """What makes a dataset the same dataset: its source file, tokenizer and task list."""
    return {"source": meta["source"], "encoding": meta["encoding"], "tasks": list(meta["tasks"]),
            "task_prompt": meta["task_prompt"]}


# ---------------------------------------------------------------------------------------------
# Batches and per-task NLL (shared with eval.py)

def make_batch(split: Split, doc_ids: list[int], block_size: int, device: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents -> inputs x (B, T), targets y (B, T) with -1 where not scored, task ids (B,).

    x = doc[:-1], y = doc[1:], cut to block_size and right-padded to the longest row. The target at
    position j is token j+1, so with a prompt of p tokens the targets j < p-1 are prompt: not scored.
    """
    docs = [split.document(i)[: block_size + 1].astype(np.int64) for i in doc_ids]
    T = max(1, max(len(doc) - 1 for doc in docs))
    x = np.full((len(docs), T), EOT, dtype=np.int64)
    y = np.full((len(docs), T), -1, dtype=np.int64)
    for row, (i, doc) in enumerate(zip(doc_ids, docs)):
        x[row, : len(doc) - 1], y[row, : len(doc) - 1] = doc[:-1], doc[1:]
        y[row, : max(int(split.prompt_lens[i]) - 1, 0)] = -1  # the task prompt is input only
    task_ids = torch.as_tensor(split.task_ids[doc_ids], dtype=torch.long)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), task_ids.to(device)


def task_nll_sums(logits: torch.Tensor, y: torch.Tensor, task_ids: torch.Tensor, num_tasks: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token NLL per task (D,) and scored tokens per task (D,), for the whole batch at once."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="none")
    nll = nll.view_as(y)  # (B, T); 0 where y == -1
    zeros = torch.zeros(num_tasks, device=y.device)
    nll_sum = zeros.index_add(0, task_ids, nll.sum(dim=1))  # (D,): rows added into their task's slot
    tokens = zeros.index_add(0, task_ids, (y != -1).sum(dim=1).float())  # (D,)
    return nll_sum, tokens


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, num_tasks: int, block_size: int, batch_size: int,
             device: str, autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task summed NLL (D,) float64 and scored tokens (D,) int64 over a whole split."""
    was_training = model.training
    model.eval()  # no adapter dropout while measuring
    nll_sum, tokens = torch.zeros(num_tasks, dtype=torch.float64), torch.zeros(num_tasks, dtype=torch.int64)
    for start in range(0, len(split), batch_size):
        x, y, t = make_batch(split, list(range(start, min(start + batch_size, len(split)))), block_size, device)
        with autocast or nullcontext():
            logits, _ = model(x, t)  # (B, T, V)
        s, n = task_nll_sums(logits, y, t, num_tasks)
        nll_sum += s.double().cpu()
        tokens += n.long().cpu()
    model.train(was_training)
    return nll_sum, tokens


def summarise(nll_sum: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Log-likelihoods per token and perplexities: per task, token-weighted, and averaged over tasks."""
    ll = (-nll_sum / tokens.clamp(min=1)).tolist()  # mean log-likelihood per token, per task
    seen = [v for v, n in zip(ll, tokens.tolist()) if n > 0]
    token_ll = -nll_sum.sum().item() / max(tokens.sum().item(), 1)
    task_avg_ll = sum(seen) / max(len(seen), 1)  # the papers' tables: every task counts once
    return {"ll": ll, "ppl": [math.exp(-v) for v in ll], "tokens": tokens.tolist(),
            "ll_token_weighted": token_ll, "ppl_token_weighted": math.exp(-token_ll),
            "ll_task_avg": task_avg_ll, "ppl_task_avg": math.exp(-task_avg_ll)}


# ---------------------------------------------------------------------------------------------
# The objective and one optimiser step

def objective(nll_sum: torch.Tensor, tokens: torch.Tensor, N: torch.Tensor, penalty: torch.Tensor, tau: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP objective of BoRA:  L = −Σ_d log P(D_d | θ_d) + τ/2 · Σ_d ‖θ_d − Θ‖²  (likelihood, prior)."""
    nll_term = (N * nll_sum / tokens.clamp(min=1)).sum()  # Σ_{d in batch} N_d · nll_d
    prior_term = tau / 2 * penalty  # τ/2 · Σ_d ‖θ_d − Θ‖²
    return nll_term, prior_term


def train_step(model: BoRA, forward, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               t: torch.Tensor, N: torch.Tensor, tau: float, micro_batch: int, autocast) -> tuple[float, float]:
    """One AdamW step on a batch, in micro-batches whose gradients add up to the whole batch's."""
    tau = 0.0 if model.shared else tau  # τ = ∞: no θ_d exist, every task *is* Θ, the prior vanishes
    # scored tokens per task over the WHOLE batch first: each micro-batch then adds exactly its share
    tokens = torch.zeros(len(N), device=y.device).index_add(0, t, (y != -1).sum(dim=1).float())  # (D,)
    opt.zero_grad(set_to_none=True)
    nll_total = prior_total = 0.0
    for start in range(0, len(x), micro_batch):
        mb = slice(start, start + micro_batch)
        with autocast:
            logits, _ = forward(x[mb], t[mb])  # (b, T, V)
        nll_sum, _ = task_nll_sums(logits, y[mb], t[mb], len(N))  # (D,)
        penalty = model.penalty() if start == 0 and tau > 0 else torch.zeros((), device=y.device)  # once a step
        nll_term, prior_term = objective(nll_sum, tokens, N, penalty, tau)
        loss = nll_term + prior_term
        loss.backward()
        nll_total, prior_total = nll_total + nll_term.item(), prior_total + prior_term.item()
    if not math.isfinite(nll_total + prior_total):
        raise FloatingPointError(f"loss is {nll_total + prior_total}")  # before the step: weights stay sane
    opt.step()
    return nll_total, prior_total


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def jsonable(obj):
    """∞ and NaN as strings ("inf"), so that every JSON reader accepts our files."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    return [jsonable(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


class Logger:
    """Prints a line and appends the same record to log.jsonl."""

    def __init__(self, path: Path, append: bool):
        self.file = open(path, "a" if append else "w")

    def __call__(self, text: str, **record) -> None:
        print(text, flush=True)
        self.file.write(json.dumps(jsonable(record)) + "\n")
        self.file.flush()


# ---------------------------------------------------------------------------------------------
# The run

def setup(cfg: TrainConfig, device: str) -> tuple[BoRA, dict, Split, Split]:
    """Check the data and the model, build the BoRA; every refusal is a one-line ValueError."""
    meta = load_meta(cfg.data)  # missing folder, another format or tokenizer -> error naming prepare_data.py
    lora = LoRAConfig(cfg.rank, cfg.alpha, cfg.dropout, cfg.targets)  # unknown target -> ValueError
    gpt = GPT.from_pretrained(cfg.init)
    if cfg.block_size > gpt.config.block_size:
        raise ValueError(f"--block-size {cfg.block_size} is longer than {cfg.init}'s context "
                         f"{gpt.config.block_size}; use --block-size {gpt.config.block_size} or less")
    torch.manual_seed(cfg.seed)  # Θ's random init (A0)
    model = BoRA(gpt, meta["tasks"], lora, shared=math.isinf(cfg.tau)).to(device).train()  # adapter dropout on
    return model, meta, load_split(cfg.data, "train"), load_split(cfg.data, "val")


def checkpoint(cfg: TrainConfig, model: BoRA, meta: dict, N: list[int], epoch: int, val: dict) -> dict:
    """Everything eval.py needs to rebuild the model: adapters only, never the frozen GPT-2."""
    init = str(Path(cfg.init).resolve()) if Path(cfg.init).exists() else cfg.init
    return {"format": CKPT_FORMAT, "base_model": init, "gpt_config": asdict(model.gpt.config),
            "lora_config": {**asdict(model.lora), "targets": list(model.lora.targets)},
            "task_names": list(model.task_names), "train_sizes": N, "tau": cfg.tau, "shared": model.shared,
            "args": {**asdict(cfg), "targets": list(cfg.targets)}, "epoch": epoch, "val": val,
            "data_path": str(Path(cfg.data).resolve()), "data_meta": data_identity(meta),
            "adapters": model.adapter_state_dict()}


def resume(cfg: TrainConfig, model: BoRA, meta: dict, opt: torch.optim.Optimizer, shuffle: torch.Generator) -> dict:
    """Restore adapters, optimiser, RNGs and early-stopping state from last.pt; return that state."""
    path = Path(cfg.out) / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"--resume: no {path} to continue; run without --resume first")
    try:
        last = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"--resume: {path} is unreadable ({type(e).__name__}); start a new --out") from None
    ours = checkpoint(cfg, model, meta, last["train_sizes"], 0, {})
    for key, what in (("data_meta", "data"), ("base_model", "base model"), ("gpt_config", "base model"),
                      ("lora_config", "LoRA config"), ("tau", "--tau")):
        if last[key] != ours[key]:
            raise ValueError(f"--resume: {cfg.out}/last.pt was trained with different {what} "
                             f"({last[key]} vs now {ours[key]}); use the same arguments or a new --out")
    model.load_adapter_state_dict(last["adapters"])
    opt.load_state_dict(last["optimizer"])
    torch.set_rng_state(last["rng"]["torch"])  # adapter dropout continues where it was
    shuffle.set_state(last["rng"]["shuffle"])  # so does the order of the documents
    return last["state"]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def run(cfg: TrainConfig) -> None:
    check_config(cfg)
    device = pick_device(cfg.device)
    model, meta, train_split, val_split = setup(cfg, device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lr = cfg.lr if cfg.lr is not None else auto_lr(cfg.tau)
    N_list = [meta["counts"]["train"][task]["docs"] for task in meta["tasks"]]
    N = torch.tensor(N_list, dtype=torch.float32, device=device)  # N_d: training documents of task d
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    shuffle = torch.Generator().manual_seed(cfg.seed)  # the epoch order; saved with last.pt
    state = {"epoch": 0, "step": 0, "best_ll": -math.inf, "best_epoch": 0, "bad_epochs": 0}  # early stopping
    if cfg.resume:
        state = resume(cfg, model, meta, opt, shuffle)
    (out / "args.json").write_text(json.dumps(jsonable({**asdict(cfg), "lr_used": lr}), indent=2) + "\n")
    log = Logger(out / "log.jsonl", append=cfg.resume)
    forward = torch.compile(model) if cfg.compile else model  # checkpoints always save `model` itself
    autocast = autocast_for(device, cfg.dtype)
    micro_batch = cfg.micro_batch or cfg.batch_size
    trainable, frozen = model.parameter_counts()
    log(f"{len(meta['tasks'])} tasks, {len(train_split)} train docs, {len(val_split)} val docs | "
        f"tau={cfg.tau} lr={lr:g} | trainable {trainable:,} frozen {frozen:,} params | {device}",
        kind="start", lr=lr, device=device, trainable=trainable, frozen=frozen)

    def validate(epoch: int) -> dict:
        m = summarise(*evaluate(model, val_split, len(N), cfg.block_size, micro_batch, device, autocast))
        improved = m["ll_task_avg"] > state["best_ll"]
        if improved:
            state.update(best_ll=m["ll_task_avg"], best_epoch=epoch, bad_epochs=0)
            save_atomic(checkpoint(cfg, model, meta, N_list, epoch, m), out / "ckpt.pt")
        else:
            state["bad_epochs"] += 1
        per_task = "  ".join(f"{name} {p:.2f}" for name, p in zip(meta["tasks"], m["ppl"]))
        log(f"epoch {epoch} val: ll/token {m['ll_task_avg']:.4f} (task avg), ppl {m['ppl_task_avg']:.2f} task avg, "
            f"{m['ppl_token_weighted']:.2f} token-weighted | {per_task} | "
            + ("improved, saved ckpt.pt" if improved else f"no better for {state['bad_epochs']} epoch(s)"),
            kind="val", epoch=epoch, improved=improved, **m)
        return m

    if not cfg.resume:
        validate(0)  # the base model (every adapter is still Θ with B = 0): the reference point
    steps_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    t0, steps_done, tokens_done = time.time(), 0, 0
    while state["epoch"] < cfg.max_epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"] + 1
        order = torch.randperm(len(train_split), generator=shuffle).tolist()  # tasks mixed in every batch
        for i in range(steps_per_epoch):
            ids = order[i * cfg.batch_size: (i + 1) * cfg.batch_size]
            x, y, t = make_batch(train_split, ids, cfg.block_size, device)
            try:
                nll, prior = train_step(model, forward, opt, x, y, t, N, cfg.tau, micro_batch, autocast)
            except FloatingPointError as e:
                raise ValueError(f"{e} at step {state['step'] + 1} (epoch {epoch}): training diverged; try a "
                                 f"smaller --lr (was {lr:g}); the best checkpoint so far, {out / 'ckpt.pt'}, is intact")
            state["step"] += 1
            steps_done, tokens_done = steps_done + 1, tokens_done + int((y != -1).sum())
            if state["step"] % cfg.log_every == 0 or i == steps_per_epoch - 1:
                elapsed = time.time() - t0
                tok_s = tokens_done / max(elapsed, 1e-9)  # scored tokens per second in this session
                eta = elapsed / steps_done * ((cfg.max_epochs - epoch + 1) * steps_per_epoch - i - 1)
                log(f"epoch {epoch} step {state['step']}: nll term {nll:.2f}  prior term {prior:.4f}  "
                    f"{tok_s:,.0f} tok/s  ETA {eta / 60:.1f} min (if all {cfg.max_epochs} epochs run)",
                    kind="train", epoch=epoch, step=state["step"], nll_term=nll, prior_term=prior,
                    tokens_per_s=tok_s, eta_s=eta)
        validate(epoch)
        state["epoch"] = epoch
        save_atomic({**checkpoint(cfg, model, meta, N_list, epoch, {}), "state": dict(state),
                     "optimizer": opt.state_dict(),
                     "rng": {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}}, out / "last.pt")
    log(f"done: best epoch {state['best_epoch']}, val ll/token {state['best_ll']:.4f} (task avg); "
        f"evaluate with: python eval.py {out / 'ckpt.pt'}", kind="done", **state)


if __name__ == "__main__":
    main()
