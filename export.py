"""Export one task's model from a BoRA checkpoint as a plain Hugging Face GPT-2 folder.

    python export.py out/NAME/ckpt.pt --task sadness --out export/sadness

The task's adapter is folded into the weights (W + scaling · B_t A_t, via BoRA.merge), so the result
is an ordinary GPT-2 that needs neither this project's LoRA code nor task ids. `--task global`
exports the global mean Θ.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval import load_checkpoint
from prepare_data import PROMPT_FORMAT
from sample import uses_task_prompt


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} exists and is not empty; choose another folder or pass --force to replace its config.json and model.safetensors")


def export(ckpt_path: str, task: str, out: Path, force: bool = False) -> str:
    """Write the merged model for task into out; return the task prompt it expects ("" if none)."""
    check_out_dir(out, force)
    bora, ckpt = load_checkpoint(ckpt_path, device="cpu")
    t = bora.task_index(task)  # unknown name -> ValueError listing the known tasks; "global" -> -1
    gpt = bora.merge(t)
    out.mkdir(parents=True, exist_ok=True)
    gpt.save_pretrained(str(out))
    return PROMPT_FORMAT.format(task=task) if t >= 0 and uses_task_prompt(ckpt) else ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export one task's merged model as a Hugging Face GPT-2 folder.")
    p.add_argument("ckpt", help="checkpoint written by train.py, e.g. out/NAME/ckpt.pt")
    p.add_argument("--task", required=True, help="task name from training, or 'global' for the mean adapter Θ")
    p.add_argument("--out", required=True, type=Path, help="folder to write (config.json + model.safetensors)")
    p.add_argument("--force", action="store_true", help="write into an existing, non-empty folder")
    args = p.parse_args(argv)
    try:
        prompt = export(args.ckpt, args.task, args.out, args.force)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote task '{args.task}' to {args.out}/:")
    for name in ("config.json", "model.safetensors"):  # what GPT.save_pretrained writes
        print(f"  {name:<20} {(args.out / name).stat().st_size:>12,} bytes")
    print(f"load it with this project:  GPT.from_pretrained({str(args.out)!r})  (from gpt2 import GPT)")
    print(f"or with transformers:       GPT2LMHeadModel.from_pretrained({str(args.out)!r})")
    print("its tokenizer is GPT-2's own: tiktoken.get_encoding('gpt2') or GPT2TokenizerFast.from_pretrained('gpt2')")
    if prompt:
        print(f"it was trained with a task prompt: begin inputs with {prompt!r}")


if __name__ == "__main__":
    main()
