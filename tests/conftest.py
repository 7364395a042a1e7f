"""Shared fixtures: tiny GPT-2 checkpoints written exactly as Hugging Face writes them.

The checkpoints are built here from raw tensors, not with our own GPT class, so that loading
them exercises the real conversion path (key names, Conv1D orientation, mask buffers, tying).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

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
