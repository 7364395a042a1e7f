"""GPT-2 in one file: the model, and loading OpenAI's weights from Hugging Face safetensors.

This file knows nothing about LoRA or tasks. Module names follow Hugging Face's GPT-2
(`transformer.h.0.attn.c_attn`, ...) so that weights map one to one and so that other files
can find the linears they adapt by name.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5


# The four sizes OpenAI released; everything else in their configs is shared.
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.dropout = config.dropout
        # one linear makes queries, keys and values for all heads at once
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × (B, T, n_embd)
        # split the embedding into heads: (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # softmax(q kᵀ / sqrt(head_dim)) v with the future masked out; fused kernel where available
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, n_embd)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form differs by ~1e-3
        h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4 * n_embd)
        return self.dropout(self.c_proj(h))  # (B, T, n_embd)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # GPT-2 reads out logits with the token embedding itself: one (vocab, n_embd) matrix, two uses
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the init of layers that write into the residual stream by 1/sqrt(2 · n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy over targets that are not -1."""
        B, T = idx.shape  # (B, T) token ids
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, n_embd)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """Extend idx (B, T) by sampling max_new_tokens tokens, one at a time."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]  # the model sees at most block_size tokens
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature  # (B, vocab_size): only the next token matters
            if top_k is not None:
                kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth_best, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
        return idx

    # ---- Hugging Face checkpoints: transformers' GPT2LMHeadModel tensors, in its layout ----

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face's names and orientation; no lm_head, since it is wte."""
        return transpose_conv1d({k: v for k, v in self.state_dict().items() if k != "lm_head.weight"})

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> GPT:
        """GPT-2 from a name (gpt2 … gpt2-xl, downloaded once), a Hugging Face folder or a .safetensors file."""
        weights_file, config_file = _locate(name_or_path)
        state = _canonical_hf_keys(_read_safetensors(weights_file))
        if config_file.is_file():
            config = _config_from_hf(json.loads(config_file.read_text()))
        else:
            config = _config_from_shapes(state, weights_file)
        with torch.device("meta"):  # shapes only: every value comes from the file, so skip the random init
            model = cls(config)
        _check_keys_and_shapes(state, model.hf_state_dict(), weights_file)
        model.to_empty(device="cpu")  # uninitialised memory, all of it filled by the strict load below
        model.lm_head.weight = model.transformer.wte.weight  # to_empty untied the two: tie them again
        state = transpose_conv1d(state)
        state["lm_head.weight"] = state["transformer.wte.weight"]
        model.load_state_dict(state, strict=True)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors as transformers writes GPT-2, each file atomically."""
        if not self.config.bias:
            raise ValueError("Hugging Face's GPT-2 always has biases; a bias=False model cannot be saved as one")
        c = self.config
        config = {hf: getattr(c, ours) for ours, hf in HF_CONFIG_FIELDS.items()}
        config.update(n_ctx=c.block_size, attn_pdrop=c.dropout, embd_pdrop=c.dropout, resid_pdrop=c.dropout)
        config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], activation_function="gelu_new")
        # safetensors takes contiguous CPU tensors; the transposed Conv1D weights are views until copied
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.hf_state_dict().items()}
        folder = Path(folder)
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))


# Hugging Face's GPT-2 computes these four with its Conv1D, x @ W + b with W stored (in, out), where
# nn.Linear stores (out, in). Every other tensor has the same name and shape on both sides.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# GPTConfig field -> config.json field. A field absent from config.json keeps our default, as in transformers.
HF_CONFIG_FIELDS = dict(block_size="n_positions", vocab_size="vocab_size", n_layer="n_layer", n_head="n_head",
                        n_embd="n_embd", layer_norm_epsilon="layer_norm_epsilon")


def transpose_conv1d(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout <-> Hugging Face's: names agree, so only the Conv1D weights change, and a transpose
    undoes itself. This one mapping serves loading and saving alike."""
    return {key: t.t() if key.endswith(CONV1D_WEIGHTS) else t for key, t in state.items()}


def _canonical_hf_keys(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every key under `transformer.`, the mask buffers dropped, a stored lm_head checked against wte."""
    state = {}
    for key, tensor in raw.items():
        if key.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"]):
            continue  # h.0.attn.bias is the causal mask, a buffer (but h.0.attn.c_attn.bias is a weight)
        state[key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key] = tensor
    # Most files leave lm_head out because it is wte. A file that stores one must store wte again:
    # we tie the two, so loading would otherwise quietly swap its head for the embedding.
    head = state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, state.get("transformer.wte.weight", head)):
        raise ValueError("lm_head.weight differs from wte.weight, but GPT-2 ties the two; this head cannot load")
    return state


def _config_from_hf(hf: dict) -> GPTConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):  # both are the tanh GELU that MLP computes
        raise ValueError(f"config.json asks for activation {activation!r}; this GPT-2 computes gelu_new only")
    if "n_positions" not in hf and "n_ctx" in hf:
        hf = {**hf, "n_positions": hf["n_ctx"]}  # n_ctx: the older name of the same number
    return GPTConfig(**{ours: hf[theirs] for ours, theirs in HF_CONFIG_FIELDS.items() if theirs in hf})


def _config_from_shapes(state: dict[str, torch.Tensor], source: Path) -> GPTConfig:
    """The config of a checkpoint without config.json, read off its tensor shapes."""
    if "transformer.wte.weight" not in state or "transformer.wpe.weight" not in state:
        raise ValueError(f"{source}: no wte.weight or wpe.weight, so this is not a GPT-2 checkpoint")
    vocab_size, n_embd = state["transformer.wte.weight"].shape
    n_layer = sum(key.endswith(".ln_1.weight") for key in state)
    # Heads are only a view of n_embd, so no shape records n_head: look the size up among the released four.
    n_head = [s["n_head"] for s in GPT2_SIZES.values() if (s["n_layer"], s["n_embd"]) == (n_layer, n_embd)]
    if not n_head:
        raise ValueError(f"{source}: n_head of a {n_layer}-layer, {n_embd}-wide GPT-2 cannot be read off "
                         "its weights; put its config.json beside it")
    block_size = state["transformer.wpe.weight"].shape[0]
    return GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head[0], n_embd=n_embd)


def _check_keys_and_shapes(found: dict, expected: dict, source: Path) -> None:
    """Compare the key sets, then every shape, so that nothing is skipped or broadcast silently."""
    have = {key: tuple(t.shape) for key, t in found.items()}
    need = {key: tuple(t.shape) for key, t in expected.items()}
    if missing := sorted(need.keys() - have.keys()):
        raise ValueError(f"{source}: missing key {missing[0]} of shape {need[missing[0]]} ({len(missing)} in all)")
    if extra := sorted(have.keys() - need.keys()):
        raise ValueError(f"{source}: unexpected key {extra[0]} of shape {have[extra[0]]} ({len(extra)} in all)")
    for key in need:
        if have[key] != need[key]:
            raise ValueError(f"{source}: {key} has shape {have[key]}, but the model needs {need[key]}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _locate(name_or_path: str) -> tuple[Path, Path]:
    """(weights file, its config.json, which may be absent) for a folder, a .safetensors file or a name."""
    path = Path(name_or_path).expanduser()
    weights = path / "model.safetensors" if path.is_dir() else path
    if weights.is_file():
        return weights, weights.with_name("config.json")
    name = name_or_path.removeprefix("openai-community/")  # the models' owner on the hub
    if name in GPT2_SIZES and not path.exists():
        return _download(name)
    if path.exists() or path.suffix == ".safetensors" or len(path.parts) > 1:  # it was meant as a path
        raise FileNotFoundError(f"{weights} not found: pass a folder with model.safetensors or a .safetensors file")
    raise ValueError(f"unknown model {name_or_path!r}: known names are {', '.join(GPT2_SIZES)}; "
                     "a folder with model.safetensors or a .safetensors file also works")


def _download(name: str) -> tuple[Path, Path]:
    """Fetch openai-community/<name> from the Hugging Face hub into the cache, once; return its files."""
    # huggingface_hub's cache rule: $HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    folder = Path(hf_home).expanduser() / "bora-gpt2" / name
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    for file in ("config.json", "model.safetensors"):
        if not (folder / file).is_file():  # a file appears only when complete (atomic_write): present = done
            url = f"{endpoint}/openai-community/{name}/resolve/main/{file}"
            atomic_write(folder / file, lambda tmp: _fetch(url, tmp, folder))
    return folder / "model.safetensors", folder / "config.json"


def _fetch(url: str, into: Path, folder: Path) -> None:
    """Stream url into the file `into`, with a progress line on stderr; a failed or short transfer raises."""
    hint = f"download it by hand into {folder}/ or pass a local path"
    done = total = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(into, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(1 << 20):
                done += f.write(chunk)
                print(f"\r{url}: {done / 1e6:.1f} of {total / 1e6:.1f} MB", end="", file=sys.stderr)
    except (OSError, http.client.HTTPException) as e:  # no network, an HTTP error status, a timeout, a reset
        raise FileNotFoundError(f"could not fetch {url} ({e}); {hint}") from None
    finally:
        if done:
            print(file=sys.stderr)  # end the progress line
    if done < total:  # the server closed early: urllib hands back a short body without complaint
        raise FileNotFoundError(f"download of {url} stopped after {done} of {total} bytes; run again, or {hint}")


def atomic_write(dest: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) into a temp file beside dest, then rename it over dest: dest is never half-written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
