"""Speed and memory of task-indexed LoRA, printed as ratios measured in one run.

GPT-2 124M shapes with random weights (nothing is downloaded), a batch whose rows mix tasks:
  - one adapted c_attn layer, forward + backward: BoRA's gather + batched matmul over mixed tasks,
    the same code with a single task (D = 1, every id 0), and a textbook LoRA layer (x Aᵀ Bᵀ, one
    adapter, no gather) — the baseline, plain LoRA's cost;
  - a whole training step (forward + backward of the mean CE + the prior penalty): BoRA over the
    mixed batch, the same with the whole batch's logits at once (as GPT.forward once did: on a CPU every
    step then gets hundreds of MB of fresh pages from the OS), textbook LoRA, and the reference code's
    way, a loop over the tasks in the batch with one forward/backward per task's sub-batch;
  - a corpus of varied length (the issue's: median 31, mean ~50, 95th percentile ~160 tokens, or
    --lengths-from a prepared dataset): train.py's step of 64 documents, grouped into forward passes
    as train.py once did (padded to the batch's longest) and now (sorted, each pass trimmed): positions
    computed per scored token over an epoch, seconds per step and per epoch;
  - inference: mixed-task logits vs one task merged into a plain GPT; adapter memory per task;
  - generation, tokens/s: the KV cache vs the loop that reruns the whole sequence, and vs Hugging
    Face's generate when transformers is installed (greedy, so all must give the same tokens).
Timings are medians over repetitions taken round-robin, so that a slow spell of the machine hits
every variant alike; only ratios are meant to be compared, and only within one run. On a CPU the
tables also show page faults per run (fresh pages, each zero-filled by the kernel), on a GPU the
peak memory allocated.

    python bench.py                          # CPU, batch 8 x 256 tokens, 6 tasks, rank 16 on c_attn
    python bench.py --block-size 64 --steps 2     # a quicker look
"""
from __future__ import annotations

import cli  # first: Ctrl-C while the imports below load is one line (cli.exit_on_interrupt)

cli.exit_on_interrupt(__name__)

import argparse
import copy
import itertools
import math
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bora import BoRA, LoRAConfig
from cli import keep_freed_memory, one_line_errors, pick_device
from data import EOT, Split, forward_passes, load_split, make_batch, pass_groups
from gpt2 import GPT, GPTConfig
from lora import LoRALinear
from train import TrainConfig, train_step


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


@dataclass
class Measured:
    seconds: float  # median over the repetitions
    loss: float  # of the last run
    page_faults: int  # median per run: pages the OS had to hand out afresh (CPU)
    peak_mb: float  # the most memory allocated during a run (CUDA)


def page_faults() -> int:
    """Minor page faults so far: pages the OS handed this process afresh, each zero-filled by the kernel."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median_times(variants: dict[str, Callable[[], float]], warmup: int, repeats: int, device: str
                 ) -> dict[str, Measured]:
    """Run every variant warmup + repeats times, round-robin, and measure each run."""
    runs: dict[str, list[tuple[float, int, float]]] = {name: [] for name in variants}
    losses: dict[str, float] = {}
    for rep in range(warmup + repeats):
        for name, run in variants.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            faults, start = page_faults(), time.perf_counter()
            losses[name] = run()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds, faults = time.perf_counter() - start, page_faults() - faults
            if rep >= warmup:
                runs[name].append((seconds, faults, torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                                   else math.nan))
    return {name: Measured(statistics.median(r[0] for r in rs), losses[name], int(statistics.median(r[1] for r in rs)),
                           max(r[2] for r in rs)) for name, rs in runs.items()}


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


def print_table(title: str, results: dict[str, Measured], baseline: str, loss: bool = False) -> None:
    cuda = not math.isnan(next(iter(results.values())).peak_mb)
    print(f"\n{title:<52} seconds" + ("      loss" if loss else "") + f"   vs {baseline}"
          + ("   peak MB" if cuda else "   page faults"))
    for name, r in results.items():
        print(f"  {name:<50} {r.seconds:7.3f}" + (f"  {r.loss:8.3f}" if loss else "")
              + f"  {r.seconds / results[baseline].seconds:6.3f}x"
              + (f"  {r.peak_mb:8.0f}" if cuda else f"  {r.page_faults:12,}"))


# ---- A corpus of varied length: how a batch's documents are grouped into forward passes ----

def corpus(lengths_from: str | None, tasks: int) -> Split:
    """A prepared dataset's training split, or one like 14,372 fortunes as "[task] " + text + <|endoftext|>
    (fortunes-like): 7,186 training documents of lognormal length, median 31, mean ~50, 95th percentile ~160
    tokens, of random tokens after a 3-token task prompt."""
    if lengths_from:
        split = load_split(lengths_from, "train")
        return Split(split.tokens, split.offsets, split.task_ids % tasks, split.prompt_lens)
    rng = np.random.default_rng(0)
    lengths = np.maximum(np.exp(rng.normal(math.log(31), 1.0, 7186)), 4).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Split(rng.integers(0, EOT, offsets[-1]).astype(np.uint16), offsets, np.arange(len(lengths)) % tasks,
                 np.full(len(lengths), 3))


def padded_passes(split: Split, doc_ids: list[int], block_size: int, rows: int, device: str) -> list:
    """How train.py once grouped a batch: all its documents padded to the longest of them, then
    cut into micro-batches of `rows` documents, each as wide as that longest one."""
    x, y, t = make_batch(split, doc_ids, block_size, device)
    return [(x[i:i + rows], y[i:i + rows], t[i:i + rows]) for i in range(0, len(x), rows)]


def grouping_table(bora: BoRA, args: argparse.Namespace, device: str) -> None:
    split, docs_per_step = corpus(args.lengths_from, args.tasks), TrainConfig.batch_size
    old_rows = 32 if device == "cuda" else 8  # --micro-batch's default when passes were cut by documents
    pass_tokens = args.pass_tokens or (8192 if device == "cuda" else 512)  # train.py's default now
    groupings = {
        "padded to the batch's longest (before)": lambda ids, dev: padded_passes(split, ids, args.block_size, old_rows, dev),
        "sorted, each pass trimmed (now)": lambda ids, dev: list(forward_passes(split, pass_groups(split, ids, args.block_size, pass_tokens), args.block_size, dev))}
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i:i + docs_per_step] for i in range(0, len(order), docs_per_step)]  # one epoch, as train.py
    lengths = np.diff(split.offsets)
    print(f"\n{len(split):,} documents of varied length ({args.lengths_from or 'built in'}; tokens per document: "
          f"median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, 95th percentile {np.percentile(lengths, 95):.0f}), "
          f"{docs_per_step} a step, cut at {args.block_size + 1}; before: micro-batches of {old_rows}, now: passes of "
          f"at most {pass_tokens} positions")
    for name, group in groupings.items():  # every batch of the epoch, counted on the CPU
        passes = [p for batch in batches for p in group(batch, "cpu")]
        positions, scored = sum(y.numel() for _, y, _ in passes), sum((y != -1).sum().item() for _, y, _ in passes)
        print(f"  {name:<50} {positions / scored:5.2f} positions computed per scored token, "
              f"{len(passes) / len(batches):.1f} passes a step")
    opt = torch.optim.SGD([p for p in bora.parameters() if p.requires_grad], lr=0.0)  # the step's work, no move

    def step(group: Callable, timed: itertools.cycle) -> Callable[[], float]:
        return lambda: train_step(bora, opt, group(next(timed), device), len(batches), 100.0)[0]
    timed = {name: step(group, itertools.cycle(batches[:args.steps])) for name, group in groupings.items()}
    results = median_times(timed, args.warmup, args.steps, device)
    print_table(f"train.py's step (loss: its likelihood term, {args.steps} batches)", results,
                "sorted, each pass trimmed (now)", loss=True)
    for name, r in results.items():
        print(f"  {name:<50} {r.seconds * len(batches) / 60:7.1f} min per epoch of {len(batches)} steps")


# ---- Generation ----

def uncached_generate(gpt: GPT, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding as GPT.generate once did: every step runs the whole sequence again."""
    for _ in range(new_tokens):
        idx = torch.cat([idx, gpt(idx[:, -gpt.config.block_size:])[:, -1:].argmax(-1)], dim=1)
    return idx


def hugging_face_generate(gpt: GPT, device: str) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """transformers' GPT2LMHeadModel.generate on the same weights (greedy, its own KV cache), if installed."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return None
    from transformers.utils import logging
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        gpt.save_pretrained(folder)
        hf = GPT2LMHeadModel.from_pretrained(folder).to(device).eval()
    return lambda idx, n: hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=EOT)


def generation_table(gpt: GPT, prompt: torch.Tensor, new_tokens: int, args: argparse.Namespace, device: str) -> None:
    outputs: dict[str, torch.Tensor] = {}
    variants = {"KV cache (GPT.generate)": lambda idx, n: gpt.generate(idx, n, top_k=1),
                "no cache: the whole sequence every step (before)": lambda idx, n: uncached_generate(gpt, idx, n)}
    if hf := hugging_face_generate(gpt, device):
        variants["Hugging Face transformers' generate"] = hf

    def run(name: str) -> Callable[[], float]:
        def generate() -> float:
            outputs[name] = variants[name](prompt, new_tokens)
            return 0.0
        return generate
    with torch.no_grad():
        results = median_times({name: run(name) for name in variants}, 1, args.steps, device)
    print_table(f"generation of {new_tokens} tokens after {prompt.shape[1]}, greedy", results, "KV cache (GPT.generate)")
    for name, r in results.items():
        print(f"  {name:<50} {new_tokens / r.seconds:7.1f} tokens/s")
    same = all(torch.equal(out, outputs["KV cache (GPT.generate)"]) for out in outputs.values())
    print("  the same tokens from all" if same else "  NOT the same tokens: " + ", ".join(outputs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="auto = cuda > mps > cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256, help="tokens per row")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of training steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds of whole-model steps; medians shown")
    parser.add_argument("--lengths-from", metavar="DATASET", help="a prepared dataset whose training split is the "
                        "corpus of varied length (default: one like the issue's)")
    parser.add_argument("--pass-tokens", type=int, default=0, help="as train.py's: 0 = 512 on a CPU, 8192 on a GPU")
    parser.add_argument("--new-tokens", type=int, help="tokens to generate (default: --block-size, at most 64)")
    args = parser.parse_args(argv)
    args.new_tokens = args.new_tokens or min(args.block_size, 64)
    if not (1 <= args.block_size <= 1024 and min(args.batch_size, args.tasks, args.steps, args.new_tokens) >= 1
            and min(args.warmup, args.pass_tokens) >= 0):
        sys.exit("error: need 1 <= --block-size <= 1024, --batch-size, --tasks, --steps, --new-tokens >= 1, "
                 "--warmup, --pass-tokens >= 0")
    device = pick_device(args.device)
    keep_freed_memory()  # as train.py and eval.py do
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
    layer_times = median_times({
        "BoRA, mixed tasks": training_step(layers[0], lambda: layers[0](x, ids).square().mean()),
        "BoRA, one task (D=1)": training_step(layers[1], lambda: layers[1](x, zeros).square().mean()),
        "textbook LoRA": training_step(layers[2], lambda: layers[2](x).square().mean()),
    }, 2, 5 * args.steps, device)
    print_table("one c_attn layer (forward + backward)", layer_times, "textbook LoRA")

    whole_logits = lambda: F.cross_entropy(bora(idx, ids).flatten(0, 1), targets.flatten())  # noqa: E731
    train_times = median_times({
        "BoRA, mixed tasks": training_step(bora, lambda: bora(idx, ids, targets).mean() + prior_sum(bora)),
        "BoRA, the batch's logits at once (as before)": training_step(bora, lambda: whole_logits() + prior_sum(bora)),
        "textbook LoRA": training_step(textbook, lambda: textbook(idx, targets).mean()),
        "loop over tasks, one pass per task": lambda: per_task_loop_step(bora, idx, ids, targets),
    }, args.warmup, args.steps, device)
    print_table("training step (forward + backward + prior)", train_times, "textbook LoRA", loss=True)
    loop_ratio = train_times["loop over tasks, one pass per task"].seconds / train_times["BoRA, mixed tasks"].seconds
    print(f"  loop over tasks / one mixed-task pass: {loop_ratio:.2f}x")

    merged = bora.merge(0).eval()
    bora.eval()
    with torch.no_grad():  # the training rounds above already warmed these shapes up
        infer_times = median_times({"BoRA, mixed tasks": lambda: bora(idx, ids).mean().item(),
                                       "merged GPT, one task": lambda: merged(idx).mean().item()},
                                      0, args.steps, device)
    print_table("inference (logits, no grad)", infer_times, "merged GPT, one task")

    per_task = sum((layer.A[0].numel() + layer.B[0].numel()) * layer.A.element_size()  # one (A_d, B_d)
                   for layer in bora.adapted.values())
    base_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
    print(f"\nadapter memory per task: {per_task:,} bytes = {per_task / base_bytes:.3%} of the base model "
          f"({base_bytes:,} bytes); the global mean Θ costs one more adapter")

    bora.train()
    grouping_table(bora, args, device)
    generation_table(merged, idx[:1, :8], args.new_tokens, args, device)


if __name__ == "__main__":
    with one_line_errors():
        main()
