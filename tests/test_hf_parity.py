"""Parity with transformers' own GPT2LMHeadModel, both ways (transformers: requirements-test.txt, which CI
installs). BORA_PARITY_124M=1 adds the full 124M shapes (a few seconds, ~2 GB of memory)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from gpt2 import GPT

SIZES = [dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=1000)]
if os.environ.get("BORA_PARITY_124M") == "1":
    SIZES.append({})  # GPT2Config() defaults: the released 124M model's shapes


def random_hf_model(**shape) -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    with torch.no_grad():  # move LayerNorm and biases away from their 1 / 0 init, so that a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "tiny" if s else "124M")
def test_transformers_checkpoint_loads_with_equal_logits(tmp_path, shape):
    hf = random_hf_model(**shape)
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, hf.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf, idx)
    assert (our_logits(GPT.from_pretrained(str(tmp_path / "hf")), idx) - expected).abs().max() <= 1e-4

    # The hub's own files have keys without `transformer.`; a released size needs no config.json either
    bare = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}
    (tmp_path / "bare").mkdir()
    save_file(bare, tmp_path / "bare" / "model.safetensors")
    if shape:  # a made-up size: its n_head is only in config.json
        shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "bare")
    assert (our_logits(GPT.from_pretrained(str(tmp_path / "bare")), idx) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "tiny" if s else "124M")
def test_our_save_pretrained_loads_in_transformers(tmp_path, shape):
    random_hf_model(**shape).save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(str(tmp_path / "hf"))
    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    assert (hf_logits(theirs, idx) - our_logits(ours, idx)).abs().max() <= 1e-4

