"""Generate text for one task from a BoRA checkpoint.

    python sample.py out/NAME/ckpt.pt --task sadness --prompt "I walked home" --num-samples 3

The task's adapter is folded into a plain GPT first (BoRA.merge), so sampling costs what the base
model costs: no adapter gather, no task ids. `--task global` samples from the global mean Θ, the
model's guess for a task it has never seen.

If the training data carried task prompts ("[sadness] " before each text), your prompt is encoded
the way prepare_data.py encoded a document's start, task prompt included, so the model sees what
it saw in training; the task prompt is not printed back.
"""
from __future__ import annotations

import argparse
import sys

import torch

from eval import load_checkpoint
from gpt2 import GPT
from prepare_data import encode_document, encode_prompt, gpt2_encoding
from train import pick_device


def uses_task_prompt(ckpt: dict) -> bool:
    """Whether training documents began with "[task] ", as train.py records it from the data's meta.json.

    A checkpoint without that record gets the project's default, True.
    """
    return bool(ckpt.get("data_meta", {}).get("task_prompt", True))


def encode_context(enc, task: str | None, prompt: str) -> tuple[list[int], int]:
    """(token ids the model is given, how many leading ones are not to be shown back).

    task=None: no task prompt. The ids are the start of a training document as prepare_data.py
    builds it; an empty prompt stops after the task prompt, or, without one, is <|endoftext|> alone,
    GPT-2's marker for "a new document begins here".
    """
    if prompt:
        ids, prompt_len = encode_document(enc, prompt, task)
        return ids[:-1], prompt_len  # without the <|endoftext|> that closes a finished document
    if task is not None:
        ids = encode_prompt(enc, task)
        return ids, len(ids)
    return [enc.eot_token], 1


def generate_samples(
    gpt: GPT,
    enc,
    task: str | None,
    prompt: str,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> list[str]:
    """num_samples continuations of prompt (after task's prompt, unless None): prompt + new text each.

    A sample ends at the first <|endoftext|>, where a training document would end.
    """
    eot = enc.eot_token
    context, hidden = encode_context(enc, task, prompt)
    device = next(gpt.parameters()).device
    idx = torch.tensor([context] * num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    torch.manual_seed(seed)  # same seed, same device -> same text
    out = gpt.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)  # (num_samples, T + new)
    samples = []
    for row in out.tolist():
        new = row[len(context):]
        if eot in new:
            new = new[: new.index(eot)]
        text = enc.decode(row[hidden: len(context)] + new)
        # with a task prompt the text was encoded as " " + text (the space of "[task] "): drop that space
        samples.append(text.removeprefix(" ") if task is not None else text)
    return samples


def format_samples(samples: list[str], task: str, seed: int) -> str:
    """Each sample under a header line, so that samples with blank lines of their own stay apart."""
    parts = [f"===== sample {i}/{len(samples)}  task={task}  seed={seed} =====\n{text}"
             for i, text in enumerate(samples, start=1)]
    return "\n".join(parts) + "\n" + "=" * 40


def check_args(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be 0 or more, got {args.max_new_tokens}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature} (a small value such as 0.1 is near-greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k} (leave it out to sample from all tokens)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate text with one task's adapter from a BoRA checkpoint.")
    p.add_argument("ckpt", help="checkpoint written by train.py, e.g. out/NAME/ckpt.pt")
    p.add_argument("--task", required=True, help="task name from training, or 'global' for the mean adapter Θ")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--num-samples", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    args = p.parse_args(argv)
    try:
        check_args(args)
        device = pick_device(args.device)
        bora, ckpt = load_checkpoint(args.ckpt, device=device)
        task = bora.task_index(args.task)  # unknown name -> ValueError listing the known tasks
        gpt = bora.merge(task).to(device).eval()
        enc = gpt2_encoding()  # one-line error if tiktoken's files are unavailable
        prompt_task = args.task if task >= 0 and uses_task_prompt(ckpt) else None  # Θ stands for an unseen task: no name to prompt with
        samples = generate_samples(gpt, enc, prompt_task, args.prompt, args.num_samples, args.max_new_tokens,
                                   args.temperature, args.top_k, args.seed)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(format_samples(samples, args.task, args.seed))


if __name__ == "__main__":
    main()
