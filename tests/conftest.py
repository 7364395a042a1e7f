"""What the tests share: tiny GPT-2 checkpoints written exactly as Hugging Face writes them, a small
multi-task corpus prepared by prepare_data.py itself, train.py runs, perturbed adapters, checkpoints.

The GPT-2 checkpoints are built here from raw tensors, not with our own GPT class, so that loading
them exercises the real conversion path (key names, Conv1D orientation, mask buffers, tying).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import prepare_data
import train
from data import EOT, Split, load_meta

# 2 layers, 2 heads, 32 dims, but GPT-2's real vocabulary so that tiktoken's ids fit.
TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=256, vocab_size=50257)


def hf_gpt2_state_dict(
    n_layer: int, n_head: int, n_embd: int, n_positions: int, vocab_size: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random GPT-2 weights under Hugging Face's names, in its Conv1D (in, out) orientation.

    Keys carry the `transformer.` prefix and include the `attn.bias` causal-mask buffer,
    as `GPT2LMHeadModel.state_dict()` has them; lm_head is left out because it is tied to wte.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.wte.weight": rand(vocab_size, n_embd), "transformer.wpe.weight": rand(n_positions, n_embd, std=0.01)}
    mask = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.bool)).view(1, 1, n_positions, n_positions)
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = 1.0 + rand(n_embd, std=0.1)
        sd[p + "ln_1.bias"] = rand(n_embd, std=0.1)
        sd[p + "attn.bias"] = mask.clone()  # a buffer, not a weight: the loader must skip it
        sd[p + "attn.c_attn.weight"] = rand(n_embd, 3 * n_embd)  # Conv1D: (in, out)
        sd[p + "attn.c_attn.bias"] = rand(3 * n_embd)
        sd[p + "attn.c_proj.weight"] = rand(n_embd, n_embd)
        sd[p + "attn.c_proj.bias"] = rand(n_embd)
        sd[p + "ln_2.weight"] = 1.0 + rand(n_embd, std=0.1)
        sd[p + "ln_2.bias"] = rand(n_embd, std=0.1)
        sd[p + "mlp.c_fc.weight"] = rand(n_embd, 4 * n_embd)
        sd[p + "mlp.c_fc.bias"] = rand(4 * n_embd)
        sd[p + "mlp.c_proj.weight"] = rand(4 * n_embd, n_embd)
        sd[p + "mlp.c_proj.bias"] = rand(n_embd)
    sd["transformer.ln_f.weight"] = 1.0 + rand(n_embd, std=0.1)
    sd["transformer.ln_f.bias"] = rand(n_embd, std=0.1)
    return sd


def hf_gpt2_config(n_layer: int, n_head: int, n_embd: int, n_positions: int, vocab_size: int) -> dict:
    """A config.json as transformers writes it for GPT-2 (the fields a loader may read)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "n_ctx": n_positions,
        "n_positions": n_positions,
        "n_embd": n_embd,
        "n_head": n_head,
        "n_layer": n_layer,
        "vocab_size": vocab_size,
        "attn_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "resid_pdrop": 0.1,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }


def write_hf_checkpoint(
    folder: Path, prefix: bool = True, with_config: bool = True, seed: int = 0, **shape: int
) -> Path:
    """Write model.safetensors (+ config.json) into folder, Hugging Face style; return folder.

    prefix=False writes the keys as the openai-community/gpt2 hub file has them: `h.0.attn...`,
    `wte.weight`, without `transformer.`.
    """
    dims = {**TINY, **shape}
    sd = hf_gpt2_state_dict(**dims, seed=seed)
    if not prefix:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if with_config:
        (folder / "config.json").write_text(json.dumps(hf_gpt2_config(**dims), indent=2))
    return folder


@pytest.fixture
def tiny_hf_dir(tmp_path: Path) -> Path:
    """A folder holding a tiny GPT-2 in Hugging Face layout (config.json + model.safetensors)."""
    return write_hf_checkpoint(tmp_path / "tiny-gpt2")


# ---- a small corpus of three related tasks, prepared by prepare_data.py ----

# Three tasks that share most of their words and differ in a task-specific word list.
SHARED_WORDS = "the a of and to in is was we they it on at with from by".split()
TASK_WORDS = {"alpha": "red green blue yellow purple orange".split(), "beta": "dog cat horse mouse bird fish".split(),
              "gamma": "one two three four five six".split()}


def write_corpus(path: Path, train_docs: dict[str, int], seed: int = 0) -> Path:
    """A CSV (text, task): half of each document's words from its task's list, half shared.

    prepare_data's default split is 50/25/25 per task, so 2·n rows give n training documents.
    """
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "task"])
        for task, n in train_docs.items():
            for _ in range(2 * n):
                words = [rng.choice(TASK_WORDS[task] if rng.random() < 0.5 else SHARED_WORDS) for _ in range(8)]
                w.writerow([" ".join(words), task])
    return path


def prepare(folder: Path, train_docs: dict[str, int], seed: int = 0) -> Path:
    """CSV + prepare_data.py -> a dataset folder; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = write_corpus(folder / f"corpus{seed}.csv", train_docs, seed)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare_data.main(["--csv", str(csv_path), "--out", str(folder / f"data{seed}")])
    return folder / f"data{seed}"


def random_split(lengths: list[int], num_tasks: int = 3, prompt_len: int = 3, seed: int = 0) -> Split:
    """A split held in memory: documents of the given lengths (prompt included), tasks in turn, of random
    tokens other than <|endoftext|> (so that in a batch it marks padding)."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Split(rng.integers(0, EOT, offsets[-1]).astype(np.uint16), offsets,
                 np.arange(len(lengths)) % num_tasks, np.full(len(lengths), prompt_len))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset with 3 tasks of 4/6/8 training documents, tiny GPT-2 folder), shared by a test module."""
    root = tmp_path_factory.mktemp("small")
    return prepare(root, {"alpha": 4, "beta": 6, "gamma": 8}), write_hf_checkpoint(root / "tiny-gpt2")


# ---- runs and checkpoints ----

def train_run(data: Path, hf: Path, out: Path, *extra: str) -> Path:
    """train.main in-process with small settings, τ = 100 unless extra says otherwise (extra arguments win).
    Return the run folder."""
    args = ["--data", str(data), "--init", str(hf), "--out", str(out), "--tau", "100", "--rank", "4",
            "--block-size", "32", "--batch-size", "16", "--max-epochs", "2", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(args)
    return out


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def adapters(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["adapters"]


def perturb(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every trainable tensor, so that all task adapters and Θ differ and every B ≠ 0 (at init
    they coincide and B = 0): every gradient, merge and comparison below is then non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))
    return module


def write_checkpoint(model, path: Path, hf: Path, tau: float = 10.0, data: Path | None = None,
                     task_prompt: bool = True) -> Path:
    """Save `model` as train.py saves its best epoch, through train.py's own checkpoint(); without a
    dataset, a stand-in meta.json (training sizes 10, 20, 30, ...)."""
    meta = load_meta(data) if data else {
        "tasks": model.task_names, "task_prompt": task_prompt, "fingerprint": "0",
        "counts": {"train": {t: {"docs": 10 * (i + 1)} for i, t in enumerate(model.task_names)}}}
    cfg = train.TrainConfig(data=str(data or path.parent / "data"), out=str(path.parent), init=str(hf), tau=str(tau),
                            rank=model.lora.rank, alpha=model.lora.alpha, targets=",".join(model.lora.targets),
                            block_size=32)
    path.parent.mkdir(parents=True, exist_ok=True)
    train.checkpoint(cfg, model, meta, epoch=3, val={}, tau=tau).save(path)
    return path


def prior_by_hand(model, tau: float) -> float:
    """τ/2 · Σ_d ‖θ_d − Θ‖², one task and one named adapter tensor at a time, in float64: the prior
    written independently of train.prior's vectorised sum."""
    state, total = model.adapter_state_dict(), 0.0
    for d in range(len(model.task_names)):
        for name, theta in state.items():
            if name.endswith((".A", ".B")):  # θ_d's tensors; Θ's are the same names + "_mean"
                total += ((theta[d].double() - state[name + "_mean"].double()) ** 2).sum().item()
    return tau / 2 * total
