"""Train BoRA: one LoRA adapter per task, all pulled towards a shared mean by a Gaussian prior.

    python prepare_data.py              # the default data: dair-ai/emotion -> data/emotion
    python train.py --tau 100           # -> out/emotion/ckpt.pt; then: python eval.py out/emotion/ckpt.pt

BoRA keeps every task's adapter θ_d near a global mean Θ, θ_d ~ N(Θ, τ⁻¹ I), and trains the MAP estimate of

    L(θ, Θ) = Σ_i nll_i  +  τ/2 · Σ_d ‖θ_d − Θ‖²            (train_step, prior)

with nll_i the mean NLL of training document i's tokens, as in the papers' code: τ acts per document
(`--likelihood token-sum` takes the exact −log P(D_d | θ_d), and τ acts per token). τ = 0: independent
adapters (Θ is then undefined; we store its τ → 0⁺ limit, the tasks' mean); τ = ∞: one shared adapter.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from bora import BoRA, LoRAConfig, pick_device
from gpt2 import GPT, atomic_write
from prepare_data import evaluate, load_meta, load_split, make_batch, token_nll

try:
    import fcntl  # the run lock; Windows has none, and runs there go unlocked
except ImportError:
    fcntl = None


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:  # every field is a flag: --block-size for block_size
    data: str = arg("data/emotion", "dataset folder written by prepare_data.py")
    out: str = arg("out/emotion", "run folder for ckpt.pt, last.pt, log.jsonl, args.json")
    init: str = arg("gpt2", "base model: gpt2 … gpt2-xl, or a Hugging Face folder / .safetensors file")
    tau: float = arg(100.0, "prior precision τ >= 0: 0 = independent adapters, inf = one shared adapter")
    lr: float = arg(3e-3, "AdamW learning rate > 0, the same for every τ (README: 'The learning rate')")
    likelihood: str = arg("doc-mean", "doc-mean (each document's mean token NLL, the papers' scale) or token-sum")
    rank: int = arg(16, "LoRA rank r >= 1")
    alpha: float = arg(16.0, "LoRA alpha; the adapters' output is scaled by alpha / rank")
    dropout: float = arg(0.0, "dropout on the adapters' input, in [0, 1)")
    targets: str = arg("c_attn", "comma list of c_attn, attn.c_proj, c_fc, mlp.c_proj")
    block_size: int = arg(256, "tokens per document >= 1; longer documents are cut")
    batch_size: int = arg(64, "documents per optimiser step >= 1")
    micro_batch: int = arg(0, "documents per forward pass: less memory, exactly the same step; "
                           "0 = 8 on a CPU (a laptop's memory), 32 on a GPU (16 GB)")
    max_epochs: int = arg(20, "epochs at most, >= 1")
    patience: int = arg(5, "stop after this many epochs (>= 1) without a better validation log-likelihood")
    seed: int = arg(1337, "seed of Θ's initialisation, the document order and dropout")
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    dtype: str = arg("auto", "auto (bfloat16 autocast on CUDA, float32 elsewhere), float32 or bfloat16")
    compile: bool = arg(False, "torch.compile the forward")
    save_every: float = arg(5.0, "minutes (> 0) between last.pt snapshots inside an epoch")
    resume: bool = arg(False, "continue the run in --out from its last.pt")
    overwrite: bool = arg(False, "start a new run in an --out that holds an old one, deleting it")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The flags come from TrainConfig's fields; every bad value is a one-line error."""
    p = argparse.ArgumentParser(description="Train task-indexed LoRA adapters with BoRA's hierarchical prior.")
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, not argparse's usage block
    for f in fields(TrainConfig):
        kind = {"action": "store_true"} if isinstance(f.default, bool) else {"type": type(f.default)}
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"], **kind)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    valid = dict(tau=cfg.tau >= 0, lr=cfg.lr > 0, likelihood=cfg.likelihood in ("doc-mean", "token-sum"),
                 block_size=cfg.block_size >= 1, batch_size=cfg.batch_size >= 1, micro_batch=cfg.micro_batch >= 0,
                 max_epochs=cfg.max_epochs >= 1, patience=cfg.patience >= 1, save_every=cfg.save_every > 0,
                 dtype=cfg.dtype in ("auto", "float32", "bfloat16"))
    for name in (name for name, ok in valid.items() if not ok):
        help = TrainConfig.__dataclass_fields__[name].metadata["help"]
        p.error(f"--{name.replace('_', '-')} {getattr(cfg, name)} is not valid: {help}")
    return cfg


# ---- The objective ----

def prior(model: BoRA, tau: float) -> torch.Tensor:
    """−log p(θ | Θ) = τ/2 · Σ_layers Σ_d (‖A_d − A0‖² + ‖B_d − B0‖²) + const: the hierarchical prior."""
    if tau == 0 or model.shared:  # τ = 0: no prior; τ = ∞: no θ_d exist, every task *is* Θ
        return torch.zeros(())
    return tau / 2 * sum((m.A - m.A0).pow(2).sum() + (m.B - m.B0).pow(2).sum() for m in model.adapted.values())


def train_step(model: BoRA, forward, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
               steps_per_epoch: int, cfg: TrainConfig, autocast) -> tuple[float, float]:
    """One AdamW step on an unbiased estimate of L(θ, Θ); returns its likelihood and prior terms.

    Each document lies in exactly one of the epoch's S batches, so weighting every document of a batch
    by S makes the mean of the epoch's S step losses exactly L, whatever tasks a batch happens to hold.
    (Weighting each task present by its size N_d instead under-weights small tasks, which a batch often
    misses: they would feel a stronger prior.) Micro-batches add up to the same step: every term is a document's."""
    opt.zero_grad(set_to_none=True)
    prior_term, nll_term = prior(model, cfg.tau), 0.0
    if prior_term.requires_grad:
        prior_term.backward()
    for start in range(0, len(x), cfg.micro_batch):
        mb = slice(start, start + cfg.micro_batch)
        with autocast:
            logits, _ = forward(x[mb], t[mb])  # (b, T, V)
        nll = token_nll(logits, y[mb]).sum(1)  # (b,) summed over each document's scored tokens
        if cfg.likelihood == "doc-mean":
            nll = nll / (y[mb] != -1).sum(1).clamp(min=1)  # nll_i, the document's mean token NLL
        loss = steps_per_epoch * nll.sum()  # S · Σ_{i in batch} nll_i
        loss.backward()
        nll_term += loss.item()
    if not math.isfinite(nll_term + prior_term.item()):
        raise FloatingPointError(f"loss is {nll_term + prior_term.item()}")  # before the step: weights stay sane
    if 0 < cfg.tau < math.inf:
        step_offsets(model, opt)
    else:
        opt.step()
    return nll_term, prior_term.item()


@torch.no_grad()
def step_offsets(model: BoRA, opt: torch.optim.Optimizer) -> None:
    """opt.step() taken in the coordinates Θ and δ_d = θ_d − Θ: the same objective, better steps.

    In θ, Θ learns only through the prior, so the shared part of the tasks' shift reaches Θ (and from
    there the small tasks) slowly. With δ held fixed, ∂L/∂Θ pools every task's likelihood gradient;
    Adam then moves Θ, and every θ_d moves with it."""
    layers = list(model.adapted.values())
    for m in layers:
        m.A0.grad += m.A.grad.sum(0)  # ∂L/∂Θ|δ = ∂L/∂Θ|θ + Σ_d ∂L/∂θ_d
        m.B0.grad += m.B.grad.sum(0)
    theta = [(m.A0.clone(), m.B0.clone()) for m in layers]
    opt.step()  # θ_d moves by its own step, which is δ_d's (∂L/∂δ_d = ∂L/∂θ_d) ...
    for m, (A0, B0) in zip(layers, theta):
        m.A += m.A0 - A0  # ... and by Θ's
        m.B += m.B0 - B0


@torch.no_grad()
def theta_as_task_mean(model: BoRA) -> None:
    """Θ's MAP value, the mean of the θ_d: at τ = 0 the objective leaves Θ free, so this is its τ → 0⁺ limit."""
    for m in model.adapted.values():
        m.A0.copy_(m.A.mean(0))
        m.B0.copy_(m.B.mean(0))


# ---- Checkpoints and the log ----

def checkpoint(cfg: TrainConfig, model: BoRA, meta: dict, epoch: int, val: dict) -> dict:
    if cfg.tau == 0:
        theta_as_task_mean(model)
    base = str(Path(cfg.init).resolve()) if Path(cfg.init).exists() else cfg.init
    return {**model.checkpoint(base), "tau": cfg.tau, "args": asdict(cfg), "epoch": epoch, "val": val,
            "train_sizes": [meta["counts"]["train"][task]["docs"] for task in meta["tasks"]],
            "data_path": str(Path(cfg.data).resolve()), "data_id": meta["fingerprint"], "task_prompt": meta["task_prompt"]}


def resume(cfg: TrainConfig, model: BoRA, meta: dict, opt: torch.optim.Optimizer) -> dict:
    """Adapters, optimiser, RNG and loop state from last.pt, after checking that it is this run's."""
    try:
        last = torch.load(Path(cfg.out) / "last.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"--resume: {cfg.out}/last.pt is unreadable ({type(e).__name__}); start a new --out") from None
    then, now = {**last["args"], **last}, {**asdict(cfg), **checkpoint(cfg, model, meta, 0, {})}
    for key in ("data_id", "base_model", "gpt_config", "lora_config", "tau", "lr", "likelihood", "batch_size",
                "block_size", "seed"):
        if then[key] != now[key]:
            raise ValueError(f"--resume: {cfg.out}/last.pt was trained with different {key} ({then[key]} vs now "
                             f"{now[key]}); use the same arguments or a new --out")
    model.load_adapter_state_dict(last["adapters"])
    opt.load_state_dict(last["optimizer"])
    torch.set_rng_state(last["rng"])  # adapter dropout continues where it was
    return last["state"]


def jsonable(record: dict) -> dict:
    """∞ and NaN as strings ("inf"), so that every JSON reader accepts our files; tensors left out."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
            if not isinstance(v, torch.Tensor)}


# ---- The run: one at a time in its folder, never destroyed by another ----

def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    out = Path(cfg.out)
    try:
        runs = [f for f in ("ckpt.pt", "last.pt", "log.jsonl") if (out / f).exists()]
        if cfg.resume and "last.pt" not in runs:
            raise FileNotFoundError(f"--resume: {out} has no last.pt to continue; run without --resume")
        if runs and not cfg.resume and not cfg.overwrite:
            raise ValueError(f"{out} already holds a run ({', '.join(runs)}); continue it with --resume, "
                             f"start afresh with --overwrite, or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ".lock", "w") as lock:  # the OS drops the lock when the file closes or the process ends
            if fcntl:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while another process holds it
            for stray in out.glob(".*.tmp"):  # left by a write that was killed midway
                stray.unlink()
            run(cfg)
    except BlockingIOError:
        sys.exit(f"error: another train.py is running in {out}; wait for it to end or choose another --out")
    except (ValueError, OSError) as e:  # every mistake a user can make, as one line
        sys.exit(f"error: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"error: out of GPU memory with --micro-batch {cfg.micro_batch}; a smaller one gives the same result")


def run(cfg: TrainConfig) -> None:
    device, out = pick_device(cfg.device), Path(cfg.out)
    cfg.micro_batch = cfg.micro_batch or (32 if device.startswith("cuda") else 8)  # README: Memory
    meta, train_split, val_split = load_meta(cfg.data), load_split(cfg.data, "train"), load_split(cfg.data, "val")
    gpt = GPT.from_pretrained(cfg.init)
    if cfg.block_size > gpt.config.block_size:
        raise ValueError(f"--block-size {cfg.block_size} exceeds {cfg.init}'s {gpt.config.block_size} positions")
    torch.manual_seed(cfg.seed)  # Θ's initialisation (A0), then dropout
    model = BoRA(gpt, meta["tasks"], LoRAConfig(cfg.rank, cfg.alpha, cfg.dropout, cfg.targets), math.isinf(cfg.tau))
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    shuffle = torch.Generator().manual_seed(cfg.seed)  # the document order, one permutation per epoch
    state = resume(cfg, model, meta, opt) if cfg.resume else dict(
        epoch=1, step=0, done_in_epoch=0, epoch_rng=shuffle.get_state(), best_ll=-math.inf, best_epoch=0, bad_epochs=0)
    for old in ("ckpt.pt", "last.pt", "log.jsonl") if cfg.overwrite and not cfg.resume else ():
        (out / old).unlink(missing_ok=True)  # only now, once data and model are known to load
    (out / "args.json").write_text(json.dumps(jsonable({**asdict(cfg), "lr_used": cfg.lr}), indent=2) + "\n")
    forward = torch.compile(model) if cfg.compile else model  # checkpoints always save `model` itself
    autocast = torch.autocast("cuda", torch.bfloat16) if cfg.dtype == "bfloat16" or (
        cfg.dtype == "auto" and device.startswith("cuda")) else nullcontext()
    S, D, shown = math.ceil(len(train_split) / cfg.batch_size), len(meta["tasks"]), time.time()  # S: steps per epoch

    def log(text: str, **record) -> None:  # a line on stdout, the same record in log.jsonl
        nonlocal shown
        print(text, flush=True)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")
        shown = time.time()  # the train lines below come every 30 s at most

    def save_last() -> None:  # ckpt.pt's contents, and what --resume needs to go on exactly
        last = {**checkpoint(cfg, model, meta, state["epoch"] - 1, {}), "state": state, "optimizer": opt.state_dict()}
        atomic_write(out / "last.pt", lambda tmp: torch.save({**last, "rng": torch.get_rng_state()}, tmp))

    def validate(epoch: int) -> None:  # every task's validation perplexity; ckpt.pt keeps the best epoch
        m = evaluate(model, val_split, D, cfg.block_size, cfg.micro_batch, device, autocast, f"epoch {epoch} val")
        if improved := m["ll_task_avg"] > state["best_ll"]:
            atomic_write(out / "ckpt.pt", lambda tmp: torch.save(checkpoint(cfg, model, meta, epoch, m), tmp))
            state.update(best_ll=m["ll_task_avg"], best_epoch=epoch)
        state.update(bad_epochs=0 if improved else state["bad_epochs"] + 1)
        per_task = "  ".join(f"{name} {p:.2f}" for name, p in zip(meta["tasks"], m["ppl"]))
        log(f"epoch {epoch} val: ppl {m['ppl_task_avg']:.3f} task-averaged, {m['ppl_token_weighted']:.3f} token-weighted"
            f" | {per_task} | " + ("saved ckpt.pt" if improved else f"no better for {state['bad_epochs']} epoch(s)"),
            kind="val", epoch=epoch, improved=improved, **m)

    log(f"{D} tasks, {len(train_split)} train / {len(val_split)} val docs | tau={cfg.tau:g} lr={cfg.lr:g} | "
        "{:,} trainable, {:,} frozen params | ".format(*model.parameter_counts()) + device, kind="start", **asdict(cfg))
    try:
        if state["step"] == 0:
            validate(0)  # the base model (every B_d = 0): the reference point
        t0, steps0, saved_at = time.time(), state["step"], time.time()
        while state["epoch"] <= cfg.max_epochs and state["bad_epochs"] < cfg.patience:
            epoch = state["epoch"]
            shuffle.set_state(state["epoch_rng"])
            order = torch.randperm(len(train_split), generator=shuffle).tolist()  # tasks mixed in every batch
            for i in range(state["done_in_epoch"], S):
                x, y, t = make_batch(train_split, order[i * cfg.batch_size:(i + 1) * cfg.batch_size], cfg.block_size, device)
                nll, prior_term = train_step(model, forward, opt, x, y, t, S, cfg, autocast)
                state.update(step=state["step"] + 1, done_in_epoch=i + 1)
                per_step = (time.time() - t0) / (state["step"] - steps0)
                if state["step"] - steps0 == 3:  # enough steps to say how long this will take
                    epoch_time, run_time = (f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"
                                            for s in (per_step * S, per_step * S * cfg.max_epochs))
                    log(f"about {epoch_time} per epoch of {S} steps, {run_time} if all {cfg.max_epochs} epochs run "
                        f"(plus validation)", kind="estimate", seconds_per_step=per_step)
                if i == S - 1 or time.time() - shown > 30:
                    log(f"epoch {epoch} step {i + 1}/{S}: likelihood term {nll:.1f}  prior term {prior_term:.4f}  "
                        f"{per_step:.2f} s/step", kind="train", epoch=epoch, step=state["step"], nll_term=nll, prior_term=prior_term)
                if time.time() - saved_at > 60 * cfg.save_every:
                    save_last()
                    saved_at = time.time()
            validate(epoch)
            state.update(epoch=epoch + 1, done_in_epoch=0, epoch_rng=shuffle.get_state())
            save_last()
    except FloatingPointError as e:  # train_step's, raised before the step: the weights are still sane
        raise ValueError(f"{e} at step {state['step'] + 1} (epoch {state['epoch']}): training diverged; try a smaller "
                         f"--lr than {cfg.lr:g}; {out / 'ckpt.pt'} keeps the best epoch so far") from None
    except KeyboardInterrupt:
        save_last()
        sys.exit(f"interrupted at epoch {state['epoch']}, step {state['done_in_epoch']}/{S}: saved {out / 'last.pt'}; "
                 f"continue with the same command and --resume")
    log(f"done: best epoch {state['best_epoch']}, validation ppl {math.exp(-state['best_ll']):.3f} (task-averaged); "
        f"evaluate with: python eval.py {out / 'ckpt.pt'}", kind="done", **state)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`, a scheduler's stop: saved like Ctrl-C
    main()
