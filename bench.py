"""Speed and memory of task-indexed LoRA, printed as ratios measured in one run.

GPT-2 124M shapes with random weights (nothing is downloaded), a batch whose rows mix tasks:
  - one adapted c_attn layer, forward + backward: BoRA's gather + batched matmul over mixed tasks,
    the same code with a single task (D = 1, every id 0), and a textbook LoRA layer (x Aᵀ Bᵀ, one
    adapter, no gather) — the baseline, plain LoRA's cost;
  - a whole training step (forward + backward of the mean CE + the prior penalty): BoRA over the
    mixed batch, textbook LoRA, and the reference code's way, a loop over the tasks in the batch
    with one forward/backward per task's sub-batch;
  - inference: mixed-task logits vs one task merged into a plain GPT; adapter memory per task.
Timings are medians over repetitions taken round-robin, so that a slow spell of the machine hits
every variant alike; only ratios are meant to be compared, and only within one run.

    python bench.py                          # CPU, batch 8 x 256 tokens, 6 tasks, rank 16 on c_attn
    python bench.py --block-size 64 --steps 2     # a quicker look
"""
from __future__ import annotations

import cli  # first: Ctrl-C while the imports below load is one line (cli.exit_on_interrupt)

cli.exit_on_interrupt(__name__)

import argparse
import copy
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bora import BoRA, LoRAConfig
from cli import one_line_errors, pick_device
from gpt2 import GPT, GPTConfig
from lora import LoRALinear


class TextbookLoRA(nn.Module):
    """One LoRA adapter for every row, h = W x + (alpha/r) · B A x: the baseline cost of plain LoRA."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scaling = base, alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)  # (r, in)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.A), self.B)  # (N, T, out)


def textbook_lora_gpt(base: GPT, rank: int, alpha: float) -> GPT:
    gpt = copy.deepcopy(base).requires_grad_(False)
    for block in gpt.transformer.h:
        block.attn.c_attn = TextbookLoRA(block.attn.c_attn, rank, alpha)
    return gpt


def median_times(variants: dict[str, Callable[[], float]], warmup: int, repeats: int, device: str
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Run every variant warmup + repeats times, round-robin; median seconds and last loss of each."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, float] = {}
    for rep in range(warmup + repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            losses[name] = run()
            if device == "cuda":
                torch.cuda.synchronize()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}, losses


def training_step(module: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], float]:
    """One step as train.py takes it, minus the optimiser: loss, backward, clear the gradients."""
    def run() -> float:
        loss = loss_fn()
        loss.backward()
        module.zero_grad(set_to_none=True)
        return loss.item()
    return run


def per_task_loop_step(bora: BoRA, idx: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> float:
    """The reference code's way, which lora.py avoids: one forward/backward per task in the batch."""
    total = 0.0
    for d in ids.unique().tolist():
        rows = ids == d
        ce_d = bora(idx[rows], ids[rows], targets[rows]).mean()  # the sub-batch's mean token NLL
        part = ce_d * rows.sum() / len(ids)  # weighted so that the parts add up to the batch mean
        part.backward()
        total += part.item()
    penalty = prior_sum(bora)
    penalty.backward()
    bora.zero_grad(set_to_none=True)
    return total + penalty.item()


def prior_sum(bora: BoRA) -> torch.Tensor:
    """Σ_layers Σ_d ‖θ_d − Θ‖², the prior term without τ/2, as train.prior computes it."""
    return sum((m.A - m.A_mean).pow(2).sum() + (m.B - m.B_mean).pow(2).sum() for m in bora.adapted.values())


def print_table(title: str, times: dict[str, float], baseline: str, losses: dict[str, float] | None = None) -> None:
    print(f"\n{title:<44} seconds" + ("    loss" if losses else "") + f"   vs {baseline}")
    for name, seconds in times.items():
        loss = f"  {losses[name]:6.3f}" if losses else ""
        print(f"  {name:<42} {seconds:7.3f}{loss}  {seconds / times[baseline]:6.3f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="auto = cuda > mps > cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256, help="tokens per row")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of training steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds of whole-model steps; medians shown")
    args = parser.parse_args(argv)
    if not (1 <= args.block_size <= 1024 and min(args.batch_size, args.tasks, args.steps) >= 1 and args.warmup >= 0):
        sys.exit("error: need 1 <= --block-size <= 1024, --batch-size, --tasks, --steps >= 1, --warmup >= 0")
    device = pick_device(args.device)
    torch.manual_seed(0)
    lora = LoRAConfig(rank=args.rank, alpha=float(args.rank))
    base = GPT(GPTConfig())  # GPT-2 124M shapes, random weights
    bora = BoRA(copy.deepcopy(base), [f"task{d}" for d in range(args.tasks)], lora).to(device)
    textbook = textbook_lora_gpt(base, lora.rank, lora.alpha).to(device)
    del base
    tokens = torch.randint(0, bora.gpt.config.vocab_size, (args.batch_size, args.block_size + 1), device=device)
    idx, targets = tokens[:, :-1], tokens[:, 1:]  # (N, T) each: predict the next token
    ids = torch.arange(args.batch_size, device=device) % args.tasks  # (N,) every task present, mixed
    zeros = torch.zeros_like(ids)
    print(f"device {device}, batch {args.batch_size} x {args.block_size} tokens, {args.tasks} tasks, "
          f"rank {lora.rank} on {', '.join(lora.targets)}; medians, round-robin, after warm-up")

    # One adapted layer alone (the first c_attn), where the adapters' own cost is not diluted by the
    # rest of the model; cheap, so more repetitions. Its input needs a gradient, as inside the model.
    # The single-task layer (D = 1, every id 0) is timed here only: in the whole model it would add a
    # minute to the run and tell nothing the layer does not.
    x = torch.randn(args.batch_size, args.block_size, bora.gpt.config.n_embd, device=device, requires_grad=True)
    mixed_layer, textbook_layer = bora.gpt.transformer.h[0].attn.c_attn, textbook.transformer.h[0].attn.c_attn
    single_layer = LoRALinear(copy.deepcopy(mixed_layer.base), 1, lora.rank, lora.alpha).to(device)
    layers = [mixed_layer, single_layer, textbook_layer]
    layer_times, _ = median_times({
        "BoRA, mixed tasks": training_step(layers[0], lambda: layers[0](x, ids).square().mean()),
        "BoRA, one task (D=1)": training_step(layers[1], lambda: layers[1](x, zeros).square().mean()),
        "textbook LoRA": training_step(layers[2], lambda: layers[2](x).square().mean()),
    }, 2, 5 * args.steps, device)
    print_table("one c_attn layer (forward + backward)", layer_times, "textbook LoRA")

    train_times, train_losses = median_times({
        "BoRA, mixed tasks": training_step(bora, lambda: bora(idx, ids, targets).mean() + prior_sum(bora)),
        "textbook LoRA": training_step(textbook, lambda: textbook(idx, targets).mean()),
        "loop over tasks, one pass per task": lambda: per_task_loop_step(bora, idx, ids, targets),
    }, args.warmup, args.steps, device)
    print_table("training step (forward + backward + prior)", train_times, "textbook LoRA", train_losses)
    loop_ratio = train_times["loop over tasks, one pass per task"] / train_times["BoRA, mixed tasks"]
    print(f"  loop over tasks / one mixed-task pass: {loop_ratio:.2f}x")

    merged = bora.merge(0).eval()
    bora.eval()
    with torch.no_grad():  # the training rounds above already warmed these shapes up
        infer_times, _ = median_times({"BoRA, mixed tasks": lambda: bora(idx, ids).mean().item(),
                                       "merged GPT, one task": lambda: merged(idx).mean().item()},
                                      0, args.steps, device)
    print_table("inference (logits, no grad)", infer_times, "merged GPT, one task")

    per_task = sum((layer.A[0].numel() + layer.B[0].numel()) * layer.A.element_size()  # one (A_d, B_d)
                   for layer in bora.adapted.values())
    base_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
    print(f"\nadapter memory per task: {per_task:,} bytes = {per_task / base_bytes:.3%} of the base model "
          f"({base_bytes:,} bytes); the global mean Θ costs one more adapter")


if __name__ == "__main__":
    with one_line_errors():
        main()
