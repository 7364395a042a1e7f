"""Train BoRA: one LoRA adapter per task, all pulled towards a shared mean by a Gaussian prior.

    python prepare_data.py              # the default data: dair-ai/emotion -> data/emotion
    python train.py --tau 100           # -> out/emotion/ckpt.pt; then: python eval.py out/emotion/ckpt.pt

BoRA keeps every task's adapter θ_d near a global mean Θ, θ_d ~ N(Θ, τ⁻¹ I), and trains the MAP estimate of

    L(θ, Θ) = Σ_i nll_i  +  τ/2 · Σ_d ‖θ_d − Θ‖²            (train_step, prior)

with nll_i the mean NLL of training document i's tokens, as in the papers' code: τ acts per document
(`--likelihood token-sum` takes the exact −log P(D_d | θ_d), and τ acts per token). τ = 0: independent
adapters (Θ is then undefined; we keep its τ → 0⁺ limit, the tasks' mean); τ = ∞: one shared adapter.
The validation numbers come from eval.py's `evaluate`, the one that eval.py reports.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch

from bora import BoRA, Checkpoint, LoRAConfig
from cli import ArgumentParser, jsonable, keep_freed_memory, one_line_errors, pick_device
from data import forward_passes, load_meta, load_split
from eval import evaluate
from gpt2 import GPT

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
    pass_tokens: int = arg(0, "positions one forward pass computes at most (documents × the longest, padding "
                           "included): it bounds a pass's memory, and a batch's documents, sorted by length, share "
                           "passes under it; any value gives exactly the same step; 0 = 512 on a CPU, 8192 on a "
                           "GPU (16 GB)")
    micro_batch: int = arg(0, "documents per forward pass at most, 0 = as many as --pass-tokens holds; any value "
                           "gives exactly the same step")
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
    p = ArgumentParser(description="Train task-indexed LoRA adapters with BoRA's hierarchical prior.")
    for f in fields(TrainConfig):
        kind = {"action": "store_true"} if isinstance(f.default, bool) else {"type": type(f.default)}
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"], **kind)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    valid = dict(tau=cfg.tau >= 0, lr=cfg.lr > 0, likelihood=cfg.likelihood in ("doc-mean", "token-sum"),
                 block_size=cfg.block_size >= 1, batch_size=cfg.batch_size >= 1, pass_tokens=cfg.pass_tokens >= 0,
                 micro_batch=cfg.micro_batch >= 0, max_epochs=cfg.max_epochs >= 1, patience=cfg.patience >= 1,
                 save_every=cfg.save_every > 0, dtype=cfg.dtype in ("auto", "float32", "bfloat16"))
    for name in (name for name, ok in valid.items() if not ok):
        p.error(f"--{name.replace('_', '-')} {getattr(cfg, name)} is not valid: {TrainConfig.__dataclass_fields__[name].metadata['help']}")
    return cfg


# ---- The objective ----

def prior(model: BoRA, tau: float) -> torch.Tensor:
    """−log p(θ | Θ) = τ/2 · Σ_layers Σ_d (‖A_d − A_mean‖² + ‖B_d − B_mean‖²) + const: the hierarchical prior."""
    if tau == 0 or model.shared:  # τ = 0: no prior; τ = ∞: no θ_d exist, every task *is* Θ
        return torch.zeros(())
    return tau / 2 * sum((m.A - m.A_mean).pow(2).sum() + (m.B - m.B_mean).pow(2).sum() for m in model.adapted.values())


def train_step(model: BoRA, opt: torch.optim.Optimizer, passes, steps_per_epoch: int, tau: float,
               likelihood: str = "doc-mean", autocast=nullcontext()) -> tuple[float, float]:
    """One AdamW step on an unbiased estimate of L(θ, Θ); returns its likelihood and prior terms.

    `passes` are the forward passes (x, y, t) of one batch of documents. Each document lies in exactly one
    of the epoch's S batches, so weighting every document of a batch by S makes the mean of the epoch's S
    step losses exactly L, whatever tasks a batch happens to hold. (Weighting each task present by its size
    N_d instead under-weights small tasks, which a batch often misses: they would feel a stronger prior.)
    Any grouping of the batch into passes gives the same step: every term is one document's."""
    opt.zero_grad(set_to_none=True)
    prior_term, nll_term = prior(model, tau), 0.0
    if prior_term.requires_grad:
        prior_term.backward()
    for x, y, t in passes:
        with autocast:
            nll = model(x, t, y).sum(1)  # (n,) each document's NLL, summed over its scored tokens
        if likelihood == "doc-mean":
            nll = nll / (y != -1).sum(1).clamp(min=1)  # nll_i, the document's mean token NLL
        loss = steps_per_epoch * nll.sum()  # S · Σ_{i in batch} nll_i
        loss.backward()
        nll_term += loss.item()
    if not math.isfinite(nll_term + prior_term.item()):
        raise FloatingPointError(f"loss is {nll_term + prior_term.item()}")  # before the step: weights stay sane
    if 0 < tau < math.inf:
        step_offsets(model, opt)
    else:
        opt.step()
    if tau == 0:
        theta_as_task_mean(model)  # Θ is free at τ = 0: keep it at its τ → 0⁺ limit
    return nll_term, prior_term.item()


@torch.no_grad()
def step_offsets(model: BoRA, opt: torch.optim.Optimizer) -> None:
    """opt.step() taken in the coordinates Θ and δ_d = θ_d − Θ: the same objective, better steps.

    In θ, Θ learns only through the prior, so the shared part of the tasks' shift reaches Θ (and from
    there the small tasks) slowly. With δ held fixed, ∂L/∂Θ pools every task's likelihood gradient;
    Adam then moves Θ, and every θ_d moves with it."""
    layers = list(model.adapted.values())
    for m in layers:
        m.A_mean.grad += m.A.grad.sum(0)  # ∂L/∂Θ|δ = ∂L/∂Θ|θ + Σ_d ∂L/∂θ_d
        m.B_mean.grad += m.B.grad.sum(0)
    theta = [(m.A_mean.clone(), m.B_mean.clone()) for m in layers]
    opt.step()  # θ_d moves by its own step, which is δ_d's (∂L/∂δ_d = ∂L/∂θ_d) ...
    for m, (A_mean, B_mean) in zip(layers, theta):
        m.A += m.A_mean - A_mean  # ... and by Θ's
        m.B += m.B_mean - B_mean


@torch.no_grad()
def theta_as_task_mean(model: BoRA) -> None:
    """Θ's MAP value, the mean of the θ_d: at τ = 0 the objective leaves Θ free, so this is its τ → 0⁺ limit."""
    for m in model.adapted.values():
        m.A_mean.copy_(m.A.mean(0))
        m.B_mean.copy_(m.B.mean(0))


# ---- What a run writes ----

def checkpoint(cfg: TrainConfig, model: BoRA, meta: dict, epoch: int, val: dict, resume: dict | None = None
               ) -> Checkpoint:
    base = str(Path(cfg.init).resolve()) if Path(cfg.init).exists() else cfg.init
    return model.checkpoint(base, tau=cfg.tau, args=asdict(cfg), epoch=epoch, val=val, resume=resume,
                            train_sizes=[meta["counts"]["train"][task]["docs"] for task in meta["tasks"]],
                            data_path=str(Path(cfg.data).resolve()), data_id=meta["fingerprint"],
                            task_prompt=meta["task_prompt"])


def save_last(cfg: TrainConfig, model: BoRA, meta: dict, opt: torch.optim.Optimizer, state: dict) -> None:
    """last.pt: ckpt.pt's contents, plus what --resume needs to go on exactly (optimiser, RNG, loop state)."""
    resume_state = dict(state=state, optimizer=opt.state_dict(), rng=torch.get_rng_state())
    checkpoint(cfg, model, meta, state["epoch"] - 1, {}, resume_state).save(Path(cfg.out) / "last.pt")


def log(out: Path, text: str, /, **record) -> None:
    """A line on stdout, and the same record in log.jsonl."""
    print(text, flush=True)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(jsonable(record)) + "\n")


def resume(cfg: TrainConfig, model: BoRA, meta: dict, opt: torch.optim.Optimizer) -> dict:
    """Adapters, optimiser, RNG and loop state from last.pt, after checking that it is this run's."""
    try:
        last = Checkpoint.load(Path(cfg.out) / "last.pt")
    except ValueError as e:  # a truncated or foreign file
        raise ValueError(f"--resume: {e}; or start a new --out") from None
    then, now = {**last.args, **vars(last)}, {**asdict(cfg), **vars(checkpoint(cfg, model, meta, 0, {}))}
    for key in ("data_id", "base_model", "gpt_config", "lora_config", "tau", "lr", "likelihood", "batch_size",
                "block_size", "seed"):
        if then[key] != now[key]:
            raise ValueError(f"--resume: {cfg.out}/last.pt was trained with different {key} ({then[key]} vs now "
                             f"{now[key]}); use the same arguments or a new --out")
    model.load_adapter_state_dict(last.adapters)
    opt.load_state_dict(last.resume["optimizer"])
    torch.set_rng_state(last.resume["rng"])  # adapter dropout continues where it was
    return last.resume["state"]


# ---- The run ----

def train(cfg: TrainConfig) -> None:
    # the device, the data, the model, the optimiser
    device, out = pick_device(cfg.device), Path(cfg.out)
    cfg.pass_tokens = cfg.pass_tokens or (8192 if device.startswith("cuda") else 512)  # README: Memory
    autocast = torch.autocast("cuda", torch.bfloat16) if cfg.dtype == "bfloat16" or (
        cfg.dtype == "auto" and device.startswith("cuda")) else nullcontext()
    meta, train_split, val_split = load_meta(cfg.data), load_split(cfg.data, "train"), load_split(cfg.data, "val")
    gpt = GPT.from_pretrained(cfg.init)
    if cfg.block_size > gpt.config.block_size:
        raise ValueError(f"--block-size {cfg.block_size} exceeds {cfg.init}'s {gpt.config.block_size} positions")
    torch.manual_seed(cfg.seed)  # Θ's initialisation (A_mean), then dropout
    model = BoRA(gpt, meta["tasks"], LoRAConfig(cfg.rank, cfg.alpha, cfg.dropout, cfg.targets), math.isinf(cfg.tau))
    model.to(device).train()
    if cfg.compile:
        model.compile()  # in place: checkpoints still save the module's own parameters
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)

    # the loop's state: fresh, or where last.pt left it
    shuffle = torch.Generator().manual_seed(cfg.seed)  # the document order, one permutation per epoch
    if cfg.resume:
        state = resume(cfg, model, meta, opt)
    else:
        state = dict(epoch=0, step=0, done_in_epoch=0, epoch_rng=shuffle.get_state(), best_ll=-math.inf,
                     best_epoch=0, bad_epochs=0)
        for old in ("ckpt.pt", "last.pt", "log.jsonl") if cfg.overwrite else ():
            (out / old).unlink(missing_ok=True)  # only now, once data and model are known to load
    (out / "args.json").write_text(json.dumps(jsonable(asdict(cfg)), indent=2) + "\n")
    S = math.ceil(len(train_split) / cfg.batch_size)  # steps per epoch
    log(out, f"{len(meta['tasks'])} tasks, {len(train_split)} train / {len(val_split)} val docs | tau={cfg.tau:g} "
        f"lr={cfg.lr:g} | " + "{:,} trainable, {:,} frozen params | ".format(*model.parameter_counts()) + device,
        kind="start", **asdict(cfg))

    try:
        t0, steps0, shown, saved_at = time.time(), state["step"], time.time(), time.time()
        while state["epoch"] <= cfg.max_epochs and state["bad_epochs"] < cfg.patience:
            epoch = state["epoch"]  # epoch 0 trains nothing: it measures the base model (every B_d = 0)
            shuffle.set_state(state["epoch_rng"])
            order = torch.randperm(len(train_split), generator=shuffle).tolist() if epoch > 0 else []
            batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]  # S, tasks mixed
            for i in range(state["done_in_epoch"], len(batches)):
                passes = forward_passes(train_split, batches[i], cfg.block_size, cfg.pass_tokens, device, cfg.micro_batch)
                nll, prior_term = train_step(model, opt, passes, S, cfg.tau, cfg.likelihood, autocast)
                state.update(step=state["step"] + 1, done_in_epoch=i + 1)
                per_step = (time.time() - t0) / (state["step"] - steps0)
                if state["step"] - steps0 == 3:  # enough steps to say how long this will take
                    epoch_time, run_time = (f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"
                                            for s in (per_step * S, per_step * S * cfg.max_epochs))
                    log(out, f"about {epoch_time} per epoch of {S} steps, {run_time} if all {cfg.max_epochs} "
                        f"epochs run (plus validation)", kind="estimate", seconds_per_step=per_step)
                if i == S - 1 or time.time() - shown > 30:
                    log(out, f"epoch {epoch} step {i + 1}/{S}: likelihood term {nll:.1f}  prior term {prior_term:.4f}"
                        f"  {per_step:.2f} s/step", kind="train", epoch=epoch, step=state["step"], nll_term=nll,
                        prior_term=prior_term)
                    shown = time.time()  # a train line every 30 s at most
                if time.time() - saved_at > 60 * cfg.save_every:
                    save_last(cfg, model, meta, opt, state)
                    saved_at = time.time()

            # validation: every task's perplexity; ckpt.pt keeps the best epoch, patience counts the others
            m = evaluate(model, val_split, cfg.block_size, cfg.pass_tokens, device, autocast, f"epoch {epoch} val")
            if improved := m["ll_task_avg"] > state["best_ll"]:
                checkpoint(cfg, model, meta, epoch, m).save(out / "ckpt.pt")
                state.update(best_ll=m["ll_task_avg"], best_epoch=epoch)
            state.update(bad_epochs=0 if improved else state["bad_epochs"] + 1)
            per_task = "  ".join(f"{name} {p:.2f}" for name, p in zip(meta["tasks"], m["ppl"]))
            log(out, f"epoch {epoch} val: ppl {m['ppl_task_avg']:.3f} task-averaged, {m['ppl_token_weighted']:.3f} "
                f"token-weighted | {per_task} | " + ("saved ckpt.pt" if improved else
                                                   f"no better for {state['bad_epochs']} epoch(s)"),
                kind="val", epoch=epoch, improved=improved, **m)
            state.update(epoch=epoch + 1, done_in_epoch=0, epoch_rng=shuffle.get_state())
            if epoch > 0:
                save_last(cfg, model, meta, opt, state)
    except FloatingPointError as e:  # train_step's, raised before the step: the weights are still sane
        raise ValueError(f"{e} at step {state['step'] + 1} (epoch {state['epoch']}): training diverged; try a smaller "
                         f"--lr than {cfg.lr:g}; {out / 'ckpt.pt'} keeps the best epoch so far") from None
    except KeyboardInterrupt:
        save_last(cfg, model, meta, opt, state)
        sys.exit(f"interrupted at epoch {state['epoch']}, step {state['done_in_epoch']}/{S}: saved {out / 'last.pt'}; "
                 f"continue with the same command and --resume")
    log(out, f"done: best epoch {state['best_epoch']}, validation ppl {math.exp(-state['best_ll']):.3f} "
        f"(task-averaged); evaluate with: python eval.py {out / 'ckpt.pt'}", kind="done", **state)


@contextmanager
def run_folder(cfg: TrainConfig) -> Iterator[None]:
    """--out for this run alone: an old run is never overwritten by accident, and a second process is refused."""
    out = Path(cfg.out)
    runs = [f for f in ("ckpt.pt", "last.pt", "log.jsonl") if (out / f).exists()]
    if cfg.resume and "last.pt" not in runs:
        raise FileNotFoundError(f"--resume: {out} has no last.pt to continue; run without --resume")
    if runs and not cfg.resume and not cfg.overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(runs)}); continue it with --resume, "
                         f"start afresh with --overwrite, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:  # the OS drops the lock when the file closes or the process ends
        try:
            if fcntl:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another train.py is running in {out}; wait for it to end or choose another --out") from None
        for stray in out.glob(".*.tmp"):  # left by a write that was killed midway
            stray.unlink()
        yield


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    keep_freed_memory()
    with one_line_errors(), run_folder(cfg):
        try:
            train(cfg)
        except torch.cuda.OutOfMemoryError:
            raise ValueError(f"out of GPU memory with --pass-tokens {cfg.pass_tokens}; a smaller one gives the same "
                             "result") from None


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`, a scheduler's stop: saved like Ctrl-C
    main()
