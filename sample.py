"""Generate text for one task from a BoRA checkpoint.

    python sample.py out/emotion/ckpt.pt --task joy --prompt "I walked home" --num-samples 3

The task's adapter is folded into a plain GPT first (BoRA.merge), so sampling costs what the base model
costs: no gather, no task ids. `--task global` samples from the global mean Θ, the model's guess for a
task it has never seen. If the training documents began with "[task]", your prompt follows it here too,
so the model reads what it read in training; that task prompt is not printed back.
"""
from __future__ import annotations

import cli  # first: Ctrl-C while the imports below load is one line (cli.exit_on_interrupt)

cli.exit_on_interrupt(__name__)

import torch

from bora import load_checkpoint
from cli import ArgumentParser, one_line_errors, pick_device
from data import encode_document, gpt2_encoding
from gpt2 import GPT


def generate_samples(gpt: GPT, enc, task: str | None, prompt: str, num_samples: int, max_new_tokens: int,
                     temperature: float, top_k: int | None, seed: int) -> list[str]:
    """num_samples continuations of `prompt` after task's "[task]" (None: no task prompt), each ending
    where a training document would end, at <|endoftext|>. An empty prompt with no task starts after
    <|endoftext|>, GPT-2's marker for "a new document begins here"."""
    ids, hidden = encode_document(enc, prompt, task)  # prompt + text + <|endoftext|>, as in training
    context = ids[:-1] if prompt else ids[:hidden] if task is not None else [enc.eot_token]
    hidden = len(context) if not prompt else hidden  # the tokens not to show back
    idx = torch.tensor([context] * num_samples, device=next(gpt.parameters()).device)  # (N, T), N = num_samples
    torch.manual_seed(seed)  # same seed, same device: same text
    samples = []
    for row in gpt.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k).tolist():
        new = row[len(context):]
        text = enc.decode(row[hidden:len(context)] + new[:new.index(enc.eot_token) if enc.eot_token in new else None])
        samples.append(text.removeprefix(" ") if task is not None else text)  # the space after "[task]"
    return samples


def format_samples(samples: list[str], task: str, seed: int) -> str:
    """Each sample under a header line, so that samples with blank lines of their own stay apart."""
    return "\n".join(f"===== sample {i}/{len(samples)}  task={task}  seed={seed} =====\n{text}"
                     for i, text in enumerate(samples, start=1)) + "\n" + "=" * 40


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description="Generate text with one task's adapter from a BoRA checkpoint.")
    p.add_argument("ckpt", help="checkpoint written by train.py, e.g. out/emotion/ckpt.pt")
    p.add_argument("--task", required=True, help="task name from training, or 'global' for the mean adapter Θ")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--num-samples", type=int, default=3, help=">= 1")
    p.add_argument("--max-new-tokens", type=int, default=200, help=">= 0")
    p.add_argument("--temperature", type=float, default=0.8, help="> 0; small values are near-greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k >= 1 most likely tokens")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    a = p.parse_args(argv)
    for flag, value, ok, need in (("--num-samples", a.num_samples, a.num_samples >= 1, "at least 1"),
                                  ("--max-new-tokens", a.max_new_tokens, a.max_new_tokens >= 0, "0 or more"),
                                  ("--temperature", a.temperature, a.temperature > 0, "> 0 (0.1 is near-greedy)"),
                                  ("--top-k", a.top_k, a.top_k >= 1, "at least 1")):
        if not ok:
            p.error(f"{flag} must be {need}, got {value}")
    with one_line_errors():
        device = pick_device(a.device)
        bora, ckpt = load_checkpoint(a.ckpt, device)
        task = bora.task_index(a.task)  # an unknown name lists the known ones
        gpt, enc = bora.merge(task).to(device), gpt2_encoding()
        prompt_task = a.task if task >= 0 and ckpt.task_prompt else None  # Θ stands for an unseen task: no name
        samples = generate_samples(gpt, enc, prompt_task, a.prompt, a.num_samples, a.max_new_tokens, a.temperature,
                                   a.top_k, a.seed)
    print(format_samples(samples, a.task, a.seed))


if __name__ == "__main__":
    main()
