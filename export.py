"""Export a BoRA checkpoint: one task's model as a plain Hugging Face GPT-2, or every adapter in PEFT's format.

    python export.py out/emotion/ckpt.pt --task joy --out export/joy       # config.json + model.safetensors
    python export.py out/emotion/ckpt.pt --peft --out export/adapters     # export/adapters/<task>/, .../global/

--task folds the task's adapter into the weights (W + (alpha/r) · B_t A_t, BoRA.merge), so the result is
an ordinary GPT-2 that needs neither this project's LoRA code nor task ids; `--task global` exports Θ.

--peft writes every task's θ_d, and Θ as `global`, the way PEFT saves a LoRA adapter: adapter_config.json and
adapter_model.safetensors, a few MB each. PEFT loads them onto transformers' GPT-2, several into one model,
and runs batches that mix them (adapter_names=); LoRAX serves them. Written with safetensors and json alone.
"""
from __future__ import annotations

import cli  # first: Ctrl-C while the imports below load is one line (cli.exit_on_interrupt)

cli.exit_on_interrupt(__name__)

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from bora import GLOBAL_NAME, BoRA, Checkpoint, load_checkpoint
from cli import ArgumentParser, one_line_errors
from data import PROMPT
from files import atomic_write
from gpt2 import GPT2_NAMES

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def peft_config(ckpt: Checkpoint) -> dict:
    """adapter_config.json: PEFT's LoraConfig fields for our adapters (PEFT fills in the rest as defaults)."""
    lora, base = ckpt.lora_config, ckpt.base_model
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"], "lora_alpha": lora["alpha"],
            "lora_dropout": lora["dropout"], "target_modules": list(lora["targets"]),  # PEFT matches name endings
            "fan_in_fan_out": True,  # Conv1D's weight is (in, out): PEFT merges it as W += (alpha/r) · (B A)ᵀ
            "bias": "none", "inference_mode": True,
            "base_model_name_or_path": f"openai-community/{base}" if base in GPT2_NAMES else base}


def peft_tensors(model: BoRA, task: int) -> dict:
    """One adapter (task id, -1 = Θ) under PEFT's names. PEFT keeps lora_A (r, in) and lora_B (out, r) as
    nn.Linear weights even for Conv1D, which are exactly our A_t and B_t: nothing is transposed."""
    tensors = {}
    for path, layer in model.adapted.items():
        A_t, B_t = layer.adapters(torch.tensor([task]))  # (1, r, in), (1, out, r): copies, as safetensors wants
        tensors[f"base_model.model.{path}.lora_A.weight"] = A_t[0].detach()
        tensors[f"base_model.model.{path}.lora_B.weight"] = B_t[0].detach()
    return tensors


def write_peft(model: BoRA, ckpt: Checkpoint, out: Path) -> list[str]:
    """OUT/<task>/ for every task and OUT/global/ for Θ (at τ = ∞, Θ alone: it is every task's adapter)."""
    names = ([] if model.shared else model.task_names) + [GLOBAL_NAME]
    if bad := [name for name in names if Path(name).name != name or name in (".", "..")]:
        raise ValueError(f"task name {bad[0]!r} cannot be a folder name; export that task with --task")
    for name in names:
        tensors, config = peft_tensors(model, model.task_index(name)), json.dumps(peft_config(ckpt), indent=2)
        atomic_write(out / name / PEFT_FILES[1], lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write(out / name / PEFT_FILES[0], lambda tmp: tmp.write_text(config + "\n"))
    return names


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description="Export one task's merged model as a Hugging Face GPT-2 folder, or every "
                                   "task's adapter in PEFT's LoRA format.")
    p.add_argument("ckpt", help="checkpoint written by train.py, e.g. out/emotion/ckpt.pt")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="task name from training, or 'global' for the mean adapter Θ")
    what.add_argument("--peft", action="store_true", help="every task's adapter, and Θ as 'global', in PEFT's format")
    p.add_argument("--out", required=True, type=Path, help="folder to write (--task: config.json + model.safetensors; "
                                                           "--peft: one folder per adapter)")
    p.add_argument("--force", action="store_true", help="write into an existing, non-empty folder")
    a = p.parse_args(argv)
    with one_line_errors(f"interrupted: {a.out} may hold part of the export"):
        if a.out.exists() and (not a.out.is_dir() or any(a.out.iterdir()) and not a.force):
            raise ValueError(f"--out {a.out} exists and is not an empty folder; choose another, or pass --force to "
                             "replace the files this export writes")
        bora, ckpt = load_checkpoint(a.ckpt)
        if a.peft:
            names = write_peft(bora, ckpt, a.out)
        else:
            task = bora.task_index(a.task)  # an unknown name lists the known ones; "global" is Θ (-1)
            bora.merge(task).save_pretrained(a.out)
    if a.peft:
        report_peft(a.out, names, ckpt)
        return
    print(f"wrote task '{a.task}' to {a.out}/: " + ", ".join(f"{f} ({(a.out / f).stat().st_size:,} bytes)"
                                                      for f in ("config.json", "model.safetensors")))
    print(f"load it here with GPT.from_pretrained({str(a.out)!r}), or with transformers' "
          f"GPT2LMHeadModel.from_pretrained({str(a.out)!r}); its tokenizer is GPT-2's own")
    if task >= 0 and ckpt.task_prompt:
        print(f"it was trained with a task prompt: begin inputs with {PROMPT.format(task=a.task) + ' '!r}")


def report_peft(out: Path, names: list[str], ckpt: Checkpoint) -> None:
    size = (out / names[0] / PEFT_FILES[1]).stat().st_size
    print(f"wrote {len(names)} PEFT LoRA adapters to {out}/: {', '.join(n + '/' for n in names)} "
          f"({' + '.join(PEFT_FILES)}; {size:,} bytes of tensors each)")
    if ckpt.shared:
        print(f"tau = inf: every task uses the one shared adapter, so {GLOBAL_NAME}/ is the only one")
    base = peft_config(ckpt)["base_model_name_or_path"]
    print(f"load with peft: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained({base!r}), "
          f"{str(out / names[0])!r}, adapter_name={names[0]!r}), more with .load_adapter(folder, adapter_name=...); "
          "mix them in one batch with model(input_ids, adapter_names=[one name per row])")
    if ckpt.task_prompt:
        print(f"they were trained with a task prompt: begin each input with its task's, e.g. "
              f"{PROMPT.format(task=ckpt.task_names[0]) + ' '!r}")


if __name__ == "__main__":
    main()
