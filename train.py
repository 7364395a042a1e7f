"""Train BoRA: one LoRA adapter per task, all pulled towards a shared mean by a Gaussian prior.

    python prepare_data.py              # the default data: dair-ai/emotion -> data/emotion
    python train.py --tau 100           # -> out/emotion/ckpt.pt; then: python eval.py out/emotion/ckpt.pt
    torchrun --nproc_per_node 4 train.py --tau 100      # the same run, its batches shared by 4 GPUs

BoRA keeps every task's adapter θ_d near a global mean Θ, θ_d ~ N(Θ, τ⁻¹ I), and trains the MAP estimate of

    L(θ, Θ) = Σ_i nll_i  +  τ/2 · Σ_d ‖θ_d − Θ‖²            (train_step, prior)

with nll_i the mean NLL of training document i's tokens, as in the papers' code: τ acts per document
(`--likelihood token-sum` takes the exact −log P(D_d | θ_d), and τ acts per token). τ = 0: independent
adapters (Θ is then undefined; we keep its τ → 0⁺ limit, the tasks' mean); τ = ∞: one shared adapter.
The validation numbers come from eval.py's `evaluate`, the one that eval.py reports.
"""
from __future__ import annotations

import cli  # first: Ctrl-C while the imports below load is one line (cli.exit_on_interrupt)

cli.exit_on_interrupt(__name__)

import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from bora import BoRA, Checkpoint, LoRAConfig
from cli import (ArgumentParser, all_sum, interrupts, is_number, jsonable, keep_freed_memory, one_line_errors,
                 pick_device, uninterrupted)
from data import forward_passes, load_meta, load_split, pass_groups, rank_share, require_scored, scored_tokens
from eval import evaluate
from files import append_line, atomic_write
from gpt2 import GPT

try:
    import fcntl  # the run lock; Windows has none, and runs there go unlocked
except ImportError:
    fcntl = None

# torchrun starts one process per GPU and tells each its rank; `python train.py` is rank 0 of 1
RANK, WORLD_SIZE = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# --tau auto: τ starts weak (1 on the doc-mean scale), then after every epoch moves halfway (in log τ) towards
# the evidence's estimate, by at most a factor √10 an epoch, within [1e-3, 1e5]
TAU_START, TAU_DAMP, TAU_CLIP, TAU_MIN, TAU_MAX = 1.0, 0.5, math.log(10), 1e-3, 1e5


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:  # every field is a flag: --block-size for block_size
    data: str = arg("data/emotion", "dataset folder written by prepare_data.py")
    out: str = arg("out/emotion", "run folder for ckpt.pt, last.pt, log.jsonl, args.json")
    init: str = arg("gpt2", "base model: gpt2 … gpt2-xl, or a Hugging Face folder / .safetensors file")
    tau: str = arg("auto", "prior precision τ: auto (the default) estimates it from the training data during the "
                   "run; a number >= 0 fixes it (0 = independent adapters, inf = one shared adapter); a list like "
                   "0,1,10,100,1000,inf trains the τ path and keeps the best on validation (README: 'Choosing τ')")
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
    taus = cfg.tau.split(",")
    valid = dict(tau=cfg.tau == "auto" or all(is_number(t) and float(t) >= 0 for t in taus) and
                 len({float(t) for t in taus}) == len(taus), lr=0 < cfg.lr < math.inf,
                 likelihood=cfg.likelihood in ("doc-mean", "token-sum"),
                 rank=cfg.rank >= 1, alpha=math.isfinite(cfg.alpha), dropout=0 <= cfg.dropout < 1,
                 block_size=cfg.block_size >= 1, batch_size=cfg.batch_size >= 1, pass_tokens=cfg.pass_tokens >= 0,
                 micro_batch=cfg.micro_batch >= 0, max_epochs=cfg.max_epochs >= 1, patience=cfg.patience >= 1,
                 save_every=cfg.save_every > 0, dtype=cfg.dtype in ("auto", "float32", "bfloat16"))
    if "," in cfg.tau and cfg.max_epochs < 2:
        p.error(f"--max-epochs {cfg.max_epochs}: the τ path trains a first epoch shared by every τ, then each τ; "
                "give at least 2")
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
               likelihood: str = "doc-mean", autocast=nullcontext(), curvature: dict | None = None
               ) -> tuple[float, float]:
    """One AdamW step on an unbiased estimate of L(θ, Θ); returns its likelihood and prior terms.

    `passes` are the forward passes (x, y, t) of one batch of documents. Each document lies in exactly one
    of the epoch's S batches, so weighting every document of a batch by S makes the mean of the epoch's S
    step losses exactly L, whatever tasks a batch happens to hold. (Weighting each task present by its size
    N_d instead under-weights small tasks, which a batch often misses: they would feel a stronger prior.)
    Any grouping of the batch into passes gives the same step, and so does sharing the passes out over
    torchrun's ranks: every term is one document's. With `curvature`, each document's gradient also goes
    into its task's empirical Fisher (for --tau auto)."""
    params = [p for p in model.parameters() if p.requires_grad]
    exact = torch.float32 if params[0].device.type == "mps" else torch.float64  # why: sum_over_ranks (MPS: none)
    grad_sum, nll_term = params[0].new_zeros(sum(p.numel() for p in params), dtype=exact), 0.0
    fisher = {path: tuple(h.new_zeros(h.shape, dtype=exact) for h in pair)  # exact, as grad_sum: any order
              for path, pair in curvature.items()} if curvature else None
    for x, y, t in passes:
        with autocast:
            nll = model(x, t, y).sum(1)  # (n,) each document's NLL, summed over its scored tokens
        scored = (y != -1).sum(1).clamp(min=1)  # (n,)
        if likelihood == "doc-mean":
            nll = nll / scored  # nll_i, the document's mean token NLL
        loss = steps_per_epoch * nll.sum()  # S · Σ_{i in batch} nll_i
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_sum += torch.cat([p.grad.flatten() for p in params])  # (all adapter numbers,)
        nll_term += loss.item()
        if fisher is not None:  # per-document gradients of −log P(doc), the exact likelihood's scale
            add_fisher(model, fisher, (scored if likelihood == "doc-mean" else 1) / steps_per_epoch)
    also = [h for pair in fisher.values() for h in pair] if fisher else []
    nll_term = sum_over_ranks(params, grad_sum, nll_term, also)  # torchrun: now every rank has the whole batch's
    prior_term = prior(model, tau)
    if prior_term.requires_grad:
        prior_term.backward()  # after the sum and the same on every rank: counted once, not once per rank
    if not math.isfinite(nll_term + prior_term.item()):
        raise FloatingPointError(f"loss is {nll_term + prior_term.item()}")  # before the step: weights stay sane
    if 0 < tau < math.inf:
        step_offsets(model, opt)
    else:
        opt.step()
    if tau == 0:
        theta_as_task_mean(model)  # Θ is free at τ = 0: keep it at its τ → 0⁺ limit
    for h, step_h in zip([h for pair in curvature.values() for h in pair] if fisher else [], also):
        h += step_h  # with the step, not before it: an interrupted step is redone, and counted once
    return nll_term, prior_term.item()


def sum_over_ranks(params: list[torch.Tensor], grad_sum: torch.Tensor, nll_term: float,
                   also: list[torch.Tensor] = ()) -> float:
    """The likelihood's gradient, summed over this rank's passes, into the parameters' .grad; under torchrun
    first summed over the ranks too, in one message (with the tensors `also`, summed in place). Summed, not
    averaged as DDP would: the objective is a sum over documents, so this is the one-process step; and summed
    in float64, where a sum of a few float32 numbers is exact, so that its order does not matter and the step
    is the one-process step to the bit. A rank without passes adds zeros."""
    if dist.is_initialized():
        message = all_sum(torch.cat([grad_sum, grad_sum.new_tensor([nll_term]), *(t.flatten().to(grad_sum.dtype)
                                                                                 for t in also)]))
        grad_sum, nll_term = message[:len(grad_sum)], message[len(grad_sum)].item()
        for t, summed in zip(also, message[len(grad_sum) + 1:].split([t.numel() for t in also])):
            t.copy_(summed.view_as(t))
    for p, g in zip(params, grad_sum.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype)
    return nll_term


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


# ---- τ from the data: empirical Bayes ----

def add_fisher(model: BoRA, curvature: dict, row_scale: torch.Tensor) -> None:
    """h_d += g_i² for every document i of task d in the last forward pass: the diagonal empirical Fisher.

    LoRALinear gathered one adapter copy per row, and a row is one document, so the gradient of that copy
    is exactly document i's gradient (times the step's weight, which row_scale undoes)."""
    for path, m in model.adapted.items():
        ids, A_rows, B_rows = m.rows  # (n,), (n, r, in), (n, out, r)
        for h, rows in zip(curvature[path], (A_rows, B_rows)):
            h.index_add_(0, ids, (rows.grad * row_scale.view(-1, 1, 1)).square().to(h.dtype))  # into each row's task


@torch.no_grad()
def evidence_tau(model: BoRA, curvature: dict, tau: float, tokens_per_doc: float) -> float:
    """The τ that maximises the evidence p(D | τ) (MacKay's fixed point), given the curvature of the likelihood:

        τ ← γ / Σ_d ‖θ_d − Θ‖²,    γ = Σ_j (Σ_d u_dj − Σ_d u_dj² / Σ_d u_dj),    u_dj = h_dj / (h_dj + τ)

    u_dj is how far task d's data, rather than the prior, decide parameter j; γ counts the well-determined
    task-specific parameters, less the degrees of freedom that Θ takes (Θ integrated out: D − 1 of D
    when all u are equal). h is the exact log-likelihood's curvature, where the evidence is defined; the
    doc-mean objective weights each document's −log P by 1/n_i, so its τ is the token-scale τ / n̄."""
    tau_tokens, gamma, spread = tau * tokens_per_doc, 0.0, 0.0
    for path, m in model.adapted.items():
        for theta, mean, h in zip((m.A, m.B), (m.A_mean, m.B_mean), curvature[path]):
            u = (h / (h + tau_tokens)).double()  # (D, ...)
            gamma += (u.sum(0) - u.square().sum(0) / u.sum(0).clamp(min=1e-300)).sum().item()
            spread += (theta - mean).double().square().sum().item()
    return gamma / max(spread, 1e-300) / tokens_per_doc


# ---- What a run writes ----

def checkpoint(cfg: TrainConfig, model: BoRA, meta: dict, epoch: int, val: dict, tau: float,
               resume: dict | None = None) -> Checkpoint:
    base = str(Path(cfg.init).resolve()) if Path(cfg.init).exists() else cfg.init
    return model.checkpoint(base, tau=tau, args=asdict(cfg), epoch=epoch, val=val, resume=resume,
                            train_sizes=[meta["counts"]["train"][task]["docs"] for task in meta["tasks"]],
                            data_path=str(Path(cfg.data).resolve()), data_id=meta["fingerprint"],
                            task_prompt=meta["task_prompt"])


def save_last(cfg: TrainConfig, model: BoRA, meta: dict, opt: torch.optim.Optimizer, state: dict,
              curvature: dict | None, rng: torch.Tensor) -> None:
    """last.pt: ckpt.pt's contents, plus what --resume needs to go on exactly (optimiser, RNG, loop state)."""
    if RANK > 0:  # every rank holds the same adapters, optimiser state and curvature: rank 0 writes them
        return
    resume_state = dict(state=state, optimizer=opt.state_dict(), rng=rng, curvature=curvature)
    checkpoint(cfg, model, meta, state["epoch"] - 1, {}, state["tau"], resume_state).save(Path(cfg.out) / "last.pt")


def log(out: Path, text: str, /, **record) -> None:
    """A line on stdout, and the same record in log.jsonl; under torchrun, rank 0 speaks for every rank."""
    if RANK > 0:
        return
    print(text, flush=True)
    append_line(out / "log.jsonl", json.dumps(jsonable(record)))


def resume(cfg: TrainConfig, model: BoRA, meta: dict, opt: torch.optim.Optimizer) -> tuple[dict, dict | None]:
    """Adapters, optimiser, RNG and loop state from last.pt, after checking that it is this run's."""
    try:
        last = Checkpoint.load(Path(cfg.out) / "last.pt")
    except ValueError as e:  # a truncated or foreign file
        raise ValueError(f"--resume: {e}; or start a new --out") from None
    then, now = {**vars(last), **last.args}, {**vars(checkpoint(cfg, model, meta, 0, {}, 0.0)), **asdict(cfg)}
    for key in ("data_id", "base_model", "gpt_config", "lora_config", "tau", "lr", "likelihood", "batch_size",
                "block_size", "seed"):
        if then[key] != now[key]:
            raise ValueError(f"--resume: {cfg.out}/last.pt was trained with different {key} ({then[key]} vs now "
                             f"{now[key]}); use the same arguments or a new --out")
    model.load_adapter_state_dict(last.adapters)
    opt.load_state_dict(last.resume["optimizer"])
    torch.set_rng_state(last.resume["rng"])  # adapter dropout continues where it was
    return last.resume["state"], last.resume["curvature"]


# ---- The run ----

def train(cfg: TrainConfig, branch: Checkpoint | None = None) -> None:
    """One run; `branch` (the τ path): go on from that last.pt's epoch, at this run's τ, with its own best."""
    # the device, the data, the model, the optimiser
    device, out = pick_device(cfg.device), Path(cfg.out)
    cfg.pass_tokens = cfg.pass_tokens or (8192 if device.startswith("cuda") else 512)  # README: Memory
    # under torchrun at most batch / N documents a pass, so that every rank has passes to make (data.rank_share)
    cfg.micro_batch = cfg.micro_batch or (math.ceil(cfg.batch_size / WORLD_SIZE) if WORLD_SIZE > 1 else 0)
    autocast = torch.autocast("cuda", torch.bfloat16) if cfg.dtype == "bfloat16" or (
        cfg.dtype == "auto" and device.startswith("cuda")) else nullcontext()
    meta, train_split, val_split = load_meta(cfg.data), load_split(cfg.data, "train"), load_split(cfg.data, "val")
    for name, split in (("train", train_split), ("val", val_split)):
        require_scored(split, meta["tasks"], cfg.block_size, name)  # a perplexity over no tokens is not one
    gpt = GPT.from_pretrained(cfg.init)
    if cfg.block_size > gpt.config.block_size:
        raise ValueError(f"--block-size {cfg.block_size} exceeds {cfg.init}'s {gpt.config.block_size} positions")
    torch.manual_seed(cfg.seed)  # Θ's initialisation (A_mean), then dropout
    auto = cfg.tau == "auto"
    lora = LoRAConfig(cfg.rank, cfg.alpha, cfg.dropout, cfg.targets)
    model = BoRA(gpt, meta["tasks"], lora, shared=not auto and math.isinf(float(cfg.tau))).to(device).train()
    if branch is not None and not cfg.resume:
        start_from(model, branch)
    if cfg.compile:
        model.compile()  # in place: checkpoints still save the module's own parameters
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    opt.register_step_pre_hook(lambda *_: interrupts.hold())  # an update once begun ends before Ctrl-C stops us

    # the loop's state: fresh, or where last.pt left it
    shuffle = torch.Generator().manual_seed(cfg.seed)  # the document order, one permutation per epoch
    n_bar = float(scored_tokens(train_split, cfg.block_size).mean())  # scored tokens per training document
    tokens_per_doc = n_bar if cfg.likelihood == "doc-mean" else 1.0  # per term of the likelihood: τ's scale
    if cfg.resume:
        state, curvature = resume(cfg, model, meta, opt)
    else:
        state = dict(epoch=0, step=0, done_in_epoch=0, epoch_rng=shuffle.get_state(), best_ll=-math.inf,
                     best_epoch=0, bad_epochs=0, tau=TAU_START * n_bar / tokens_per_doc if auto else float(cfg.tau))
        curvature = {path: (torch.zeros_like(m.A), torch.zeros_like(m.B)) for path, m in model.adapted.items()
                     } if auto else None  # each task's empirical Fisher over the current epoch
        for old in ("ckpt.pt", "last.pt", "log.jsonl") if cfg.overwrite and RANK == 0 else ():
            (out / old).unlink(missing_ok=True)  # only now, once data and model are known to load
        if branch is not None:  # on from the branch point: its epoch, document order, optimiser and RNG
            state.update(branch.resume["state"], best_ll=-math.inf, best_epoch=0, bad_epochs=0, tau=state["tau"])
            if model.shared == branch.shared:  # else the adapters' shapes differ: a fresh AdamW
                opt.load_state_dict(branch.resume["optimizer"])
            torch.set_rng_state(branch.resume["rng"])
    if RANK == 0:
        atomic_write(out / "args.json", lambda tmp: tmp.write_text(json.dumps(jsonable(asdict(cfg)), indent=2) + "\n"))
    for m in model.adapted.values():
        m.keep_rows = auto  # per-document gradients for the curvature
    rng = torch.get_rng_state()  # dropout's stream where `state` stands: an interrupted step is redone from it
    S = math.ceil(len(train_split) / cfg.batch_size)  # steps per epoch
    log(out, f"{len(meta['tasks'])} tasks, {len(train_split)} train / {len(val_split)} val docs | tau={cfg.tau} "
        f"lr={cfg.lr:g} | " + "{:,} trainable, {:,} frozen params | ".format(*model.parameter_counts()) + device +
        (f", rank 0 of {WORLD_SIZE} (torchrun)" if dist.is_initialized() else ""), kind="start", world_size=WORLD_SIZE,
        branch=branch and branch.args["out"], **asdict(cfg))

    try:
        t0, steps0, shown, saved_at = time.time(), state["step"], time.time(), time.time()
        while state["epoch"] <= cfg.max_epochs and state["bad_epochs"] < cfg.patience:
            epoch = state["epoch"]  # epoch 0 trains nothing: it measures the base model (every B_d = 0)
            shuffle.set_state(state["epoch_rng"])
            order = torch.randperm(len(train_split), generator=shuffle).tolist() if epoch > 0 else []
            batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]  # S, tasks mixed
            for i in range(state["done_in_epoch"], len(batches)):
                groups = pass_groups(train_split, batches[i], cfg.block_size, cfg.pass_tokens, cfg.micro_batch)
                passes = forward_passes(train_split, rank_share(groups, RANK, WORLD_SIZE), cfg.block_size, device)
                nll, prior_term = train_step(model, opt, passes, S, state["tau"], cfg.likelihood, autocast, curvature)
                state.update(step=state["step"] + 1, done_in_epoch=i + 1)
                rng = torch.get_rng_state()
                interrupts.release()  # a Ctrl-C that came during the update stops us here, the step counted
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
                    save_last(cfg, model, meta, opt, state, curvature, rng)
                    saved_at = time.time()

            # validation: every task's perplexity; ckpt.pt keeps the best epoch, patience counts the others
            m = evaluate(model, val_split, cfg.block_size, cfg.pass_tokens, device, autocast, f"epoch {epoch} val")
            if improved := m["ll_task_avg"] > state["best_ll"]:
                if RANK == 0:
                    checkpoint(cfg, model, meta, epoch, m, state["tau"]).save(out / "ckpt.pt")
            bad_epochs = 0 if improved else state["bad_epochs"] + 1
            per_task = "  ".join(f"{name} {p:.2f}" for name, p in zip(meta["tasks"], m["ppl"]))
            log(out, f"epoch {epoch} val: ppl {m['ppl_task_avg']:.3f} task-averaged, {m['ppl_token_weighted']:.3f} "
                f"token-weighted | {per_task} | " + ("saved ckpt.pt" if improved else
                                                   f"no better for {bad_epochs} epoch(s)"),
                kind="val", epoch=epoch, improved=improved, tau=state["tau"], **m)
            best = dict(best_ll=m["ll_task_avg"], best_epoch=epoch) if improved else {}
            tau = state["tau"]
            if auto and epoch > 0:  # τ from this epoch's curvature and the adapters' spread, damped
                estimate = evidence_tau(model, curvature, tau, tokens_per_doc)
                tau = min(max(tau * math.exp(TAU_DAMP * min(max(math.log(estimate / tau), -TAU_CLIP), TAU_CLIP)),
                              TAU_MIN), TAU_MAX)
                log(out, f"epoch {epoch}: the evidence asks for tau {estimate:.4g}; tau is now {tau:.4g}",
                    kind="tau", epoch=epoch, estimate=estimate, tau=tau)
            with uninterrupted():  # in one update: an interrupt before it has the validation redone, whole
                state.update(epoch=epoch + 1, done_in_epoch=0, epoch_rng=shuffle.get_state(), bad_epochs=bad_epochs,
                             tau=tau, **best)
                for h in (h for pair in curvature.values() for h in pair) if auto and epoch > 0 else ():
                    h.zero_()  # the next epoch's Fisher starts afresh
            if epoch > 0:
                save_last(cfg, model, meta, opt, state, curvature, rng)
        log(out, f"done: best epoch {state['best_epoch']}, validation ppl {math.exp(-state['best_ll']):.3f} "
            f"(task-averaged); evaluate with: python eval.py {out / 'ckpt.pt'}", kind="done", **state)
    except FloatingPointError as e:  # train_step's, raised before the step: the weights are still sane
        raise ValueError(f"{e} at step {state['step'] + 1} (epoch {state['epoch']}): training diverged; try a smaller "
                         f"--lr than {cfg.lr:g}; {out / 'ckpt.pt'} keeps the best epoch so far") from None
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM; under torchrun also another rank's end (cli.all_sum)
        interrupts.hold()  # a second one (torchrun passes the signal on once more) waits for last.pt to be whole
        save_last(cfg, model, meta, opt, state, curvature, rng)
        sys.exit(1 if RANK > 0 else f"interrupted at epoch {state['epoch']}, step {state['done_in_epoch']}/{S}: saved "
                 f"{out / 'last.pt'}; continue with the same command and --resume")


# ---- The τ path: every τ of a list, raced from one shared first epoch ----

def train_path(cfg: TrainConfig, taus: list[float]) -> None:
    """The τ path in one command. Every τ shares one first epoch, trained at the smallest τ > 0 of the list
    (where the tasks move most freely); then each τ goes on from it, adapters, optimiser and all, at its own
    τ, one epoch at a time, in rounds: after each round the better half of the τ values (by their best
    validation so far) goes on, until one is left, which trains to the end as a single run would (--patience,
    --max-epochs). So the path costs a run plus about 2 × (number of τ) epochs, not a run per τ, and every
    τ's model is trained at that τ. Racing rather than stopping each τ at its first epoch without progress:
    validation jitters from epoch to epoch, and a τ must not lose for one bad epoch. OUT/first/ and
    OUT/tau_<τ>/ hold the runs; OUT/ckpt.pt is the τ with the best task-averaged validation log-likelihood."""
    out = Path(cfg.out)
    for old in [out / "ckpt.pt", out / "log.jsonl", out / "first", *out.glob("tau_*")] if not cfg.resume and RANK == 0 else ():
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)  # --overwrite: an old path's runs too
    if dist.is_initialized():
        dist.barrier()  # no rank looks for a run to continue before rank 0 has removed the old ones
    first_tau = min([t for t in taus if 0 < t < math.inf] or [1.0])
    log(out, f"tau path {', '.join(f'{t:g}' for t in taus)}: a first epoch at tau={first_tau:g}, then every tau "
        "from it, the better half going on after each epoch", kind="path", taus=taus)

    def run(folder: str, branch: Checkpoint | None, epochs: int, patience: int, **changes) -> None:
        """The run in OUT/folder, trained up to `epochs` (resumed if it has begun), unless it is there or has stopped."""
        last = out / folder / "last.pt"
        state = Checkpoint.load(last).resume["state"] if last.exists() else None
        if state is None or (state["epoch"] <= epochs and state["bad_epochs"] < patience):
            (out / folder).mkdir(exist_ok=True)
            train(replace(cfg, out=str(out / folder), overwrite=True, max_epochs=epochs, patience=patience,
                          resume=state is not None, **changes), branch)
        if dist.is_initialized():
            dist.barrier()  # rank 0's files are on disk before any rank reads them

    def best_ll(tau: float) -> float:
        return Checkpoint.load(out / f"tau_{tau:g}" / "ckpt.pt").val["ll_task_avg"]

    run("first", None, 1, cfg.patience, tau=f"{first_tau:g}")
    first, alive, epoch = Checkpoint.load(out / "first" / "last.pt"), list(taus), 1
    while len(alive) > 1 and epoch < cfg.max_epochs:  # a round: one more epoch for every τ still racing
        epoch += 1
        for tau in alive:
            run(f"tau_{tau:g}", first, epoch, cfg.patience, tau=f"{tau:g}")
        alive = sorted(alive, key=best_ll, reverse=True)[:math.ceil(len(alive) / 2)]  # stable: ties keep list order
    run(f"tau_{alive[0]:g}", first, cfg.max_epochs, cfg.patience, tau=f"{alive[0]:g}")  # the winner, to its end
    rows = [(tau, Checkpoint.load(out / f"tau_{tau:g}" / "ckpt.pt"),
             Checkpoint.load(out / f"tau_{tau:g}" / "last.pt").resume["state"]["epoch"] - 1) for tau in taus]
    best_tau, best, _ = max(rows, key=lambda row: row[1].val["ll_task_avg"])
    if RANK == 0:
        best.save(out / "ckpt.pt")
    table = "\n".join(f"  tau={tau:<8g} trained to epoch {trained:<3} best epoch {c.epoch:<3} validation ppl "
                      f"{c.val['ppl_task_avg']:.3f}" + ("  <- selected" if tau == best_tau else "")
                      for tau, c, trained in sorted(rows, key=lambda row: row[0]))
    log(out, f"tau path, task-averaged validation perplexity:\n{table}\nselected tau={best_tau:g}: {out / 'ckpt.pt'}; "
        f"evaluate with: python eval.py {out / 'ckpt.pt'}", kind="path done", tau=best_tau,
        val={f"{tau:g}": c.val["ppl_task_avg"] for tau, c, _ in rows},
        epochs={f"{tau:g}": trained for tau, _, trained in rows})


def start_from(model: BoRA, ckpt: Checkpoint) -> None:
    """Begin at another τ's solution: its adapters; from the shared model every θ_d at its Θ; for the shared
    model, the other's Θ."""
    saved = ckpt.adapters

    def value(key: str, now: torch.Tensor) -> torch.Tensor:
        if key.endswith((".A", ".B")) and (model.shared or ckpt.shared):
            return now if model.shared else saved[key + "_mean"].expand_as(now)
        return saved[key]

    model.load_adapter_state_dict({key: value(key, now) for key, now in model.adapter_state_dict().items()})


@contextmanager
def run_folder(cfg: TrainConfig) -> Iterator[None]:
    """--out for this run alone: an old run is never overwritten by accident, and a second process is refused."""
    out = Path(cfg.out)
    runs = [f for f in ("ckpt.pt", "last.pt", "log.jsonl") if (out / f).exists()]
    if cfg.resume and ("log.jsonl" if "," in cfg.tau else "last.pt") not in runs:
        raise FileNotFoundError(f"--resume: {out} has no {'τ path' if ',' in cfg.tau else 'last.pt'} to continue; "
                                "run without --resume")
    if runs and not cfg.resume and not cfg.overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(runs)}); continue it with --resume, "
                         f"start afresh with --overwrite, or choose another --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with open(out / ".lock", "w") as lock:  # the OS drops the lock when the file closes or the process ends
            try:
                if fcntl and RANK == 0:  # torchrun: rank 0 holds it for the run
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"another train.py is running in {out}; wait for it to end or choose another --out") from None
            for stray in out.glob(".*.tmp"):  # left by a write that was killed midway
                stray.unlink()
            try:
                yield
            except BaseException:  # a run that failed before saving anything leaves nothing behind
                if RANK == 0 and not any(out.rglob("ckpt.pt")) and not any(out.rglob("last.pt")):
                    for f in ("args.json", "log.jsonl", ".lock"):
                        with suppress(OSError):  # Windows keeps an open .lock: the error that ends the run says more
                            (out / f).unlink(missing_ok=True)
                raise
    finally:
        if created and RANK == 0 and not any(out.iterdir()):
            out.rmdir()


@contextmanager
def torchrun_ranks(cfg: TrainConfig) -> Iterator[None]:
    """Under torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE): join the run's other processes, over NCCL
    between GPUs (rank r on GPU LOCAL_RANK) or gloo between CPUs. `python train.py` has none to join."""
    if "RANK" not in os.environ:
        yield
        return
    gpu = cfg.device == "cuda" or cfg.device == "auto" and torch.cuda.is_available()
    if not gpu and cfg.device not in ("auto", "cpu"):
        raise ValueError(f"--device {cfg.device} under torchrun: use cuda (rank r takes GPU LOCAL_RANK) or cpu")
    cfg.device = pick_device(f"cuda:{os.environ['LOCAL_RANK']}" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(cfg.device)
    dist.init_process_group("nccl" if gpu else "gloo")  # waits for every rank: all have checked --out by now
    try:
        yield
    except KeyboardInterrupt:  # before the training loop, which saves last.pt itself: another rank ended the run
        sys.exit(1)
    dist.barrier()  # every rank at the end before any tears the group down (one that went first aborted another)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    keep_freed_memory()
    with one_line_errors(f"interrupted before training began: nothing was saved in {cfg.out}"), run_folder(cfg), \
            torchrun_ranks(cfg):
        try:
            if "," in cfg.tau:
                train_path(cfg, [float(t) for t in cfg.tau.split(",")])
            else:
                train(cfg)
        except torch.cuda.OutOfMemoryError:
            raise ValueError(f"out of GPU memory with --pass-tokens {cfg.pass_tokens}; a smaller one gives the same "
                             "result") from None


if __name__ == "__main__":
    main()
