"""Export one task's model from a BoRA checkpoint as a plain Hugging Face GPT-2 folder.

    python export.py out/emotion/ckpt.pt --task joy --out export/joy

The task's adapter is folded into the weights (W + (alpha/r) · B_t A_t, BoRA.merge), so the result is
an ordinary GPT-2 that needs neither this project's LoRA code nor task ids; `--task global` exports Θ.
"""
from __future__ import annotations

import cli  # first: Ctrl-C while the imports below load is one line (cli.exit_on_interrupt)

cli.exit_on_interrupt(__name__)

from pathlib import Path

from bora import load_checkpoint
from cli import ArgumentParser, one_line_errors
from data import PROMPT


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description="Export one task's merged model as a Hugging Face GPT-2 folder.")
    p.add_argument("ckpt", help="checkpoint written by train.py, e.g. out/emotion/ckpt.pt")
    p.add_argument("--task", required=True, help="task name from training, or 'global' for the mean adapter Θ")
    p.add_argument("--out", required=True, type=Path, help="folder to write (config.json + model.safetensors)")
    p.add_argument("--force", action="store_true", help="write into an existing, non-empty folder")
    a = p.parse_args(argv)
    with one_line_errors(f"interrupted: {a.out} may hold part of the export"):
        if a.out.exists() and (not a.out.is_dir() or any(a.out.iterdir()) and not a.force):
            raise ValueError(f"--out {a.out} exists and is not an empty folder; choose another, or pass --force to "
                             "replace its config.json and model.safetensors")
        bora, ckpt = load_checkpoint(a.ckpt)
        task = bora.task_index(a.task)  # an unknown name lists the known ones; "global" is Θ (-1)
        bora.merge(task).save_pretrained(a.out)
    print(f"wrote task '{a.task}' to {a.out}/: " + ", ".join(f"{f} ({(a.out / f).stat().st_size:,} bytes)"
                                                      for f in ("config.json", "model.safetensors")))
    print(f"load it here with GPT.from_pretrained({str(a.out)!r}), or with transformers' "
          f"GPT2LMHeadModel.from_pretrained({str(a.out)!r}); its tokenizer is GPT-2's own")
    if task >= 0 and ckpt.task_prompt:
        print(f"it was trained with a task prompt: begin inputs with {PROMPT.format(task=a.task) + ' '!r}")


if __name__ == "__main__":
    main()
