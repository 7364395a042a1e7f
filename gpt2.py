"""GPT-2 in one file: the model, and loading OpenAI's weights from Hugging Face safetensors.

Nothing here knows about LoRA or tasks. Module names follow Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn`, ...)
so that weights map one to one, and so that bora.py can find the linears it adapts by name."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from files import atomic_write, hub_file


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_epsilon: float = 1e-5


class KVCache:
    """One layer's keys and values (N, n_head, T, head_dim) of the T tokens read so far in generation. A
    token's key and value never change once computed (attention is causal), so generation keeps them, and
    each new token costs one position instead of a pass over the whole prefix."""

    def __init__(self):
        self.k = self.v = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys and values; return those of every token so far."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # queries, keys, values of all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        N, T, C = x.shape  # (N, T, n_embd): N documents of T tokens
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × (N, T, n_embd)
        # (N, T, C) -> (N, n_head, T, head_dim): every head attends on its own slice of the embedding
        q, k, v = (t.view(N, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # generation: the earlier tokens' keys and values come first
            k, v = cache.extend(k, v)  # (N, n_head, T_before + T, head_dim)
        # softmax(q kᵀ / √head_dim) v with the future masked out, in one fused kernel; a single new token
        # (after the prompt, GPT.forward allows no more) may see every key, so it needs no mask
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (N, n_head, T, head_dim)
        return self.c_proj(y.transpose(1, 2).contiguous().view(N, T, C))  # heads side by side again


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form differs by ~1e-3
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (N, T, n_embd)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # GPT-2 reads logits out with wte itself
        for name, p in self.named_parameters():  # GPT-2's init: N(0, 0.02) matrices, zero biases, unit norms
            if p.dim() == 2:  # the layers that write into the residual stream start 1/√(2·n_layer) smaller
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: list[KVCache] | None = None
                ) -> torch.Tensor:
        """idx (N, T) -> the logits (N, T, vocab) of every position; or, given targets (N, T), what training
        and evaluation need: each target's NLL −log p(target | the tokens before), (N, T), 0 where the
        target is -1 (not scored). Logits are then computed only where a target is scored.
        With a cache (one KVCache per layer, see generate), idx follows the tokens the cache holds."""
        before = len(cache[0]) if cache else 0  # tokens already in the cache
        if before + idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of {before + idx.shape[1]} tokens is longer than block_size {self.config.block_size}")
        if before and idx.shape[1] > 1:  # attention's causal mask would align the new tokens with the first keys
            raise ValueError("after the prompt, a cached forward takes one token at a time")
        pos = torch.arange(before, before + idx.shape[1], device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (N, T, n_embd)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache[i] if cache else None)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x)  # (N, T, vocab_size)
        scored = targets != -1  # (N, T): padding and prompts cost no (n_embd × vocab) matmul
        x, targets = x[scored], targets[scored]  # (M, n_embd), (M,)
        # F.cross_entropy(self.lm_head(x).float(), targets, reduction="none"), a chunk of positions at a time,
        # so that no (M, vocab) logits of hundreds of MB exist. On a CPU that is speed as well as memory:
        # glibc hands out blocks over 32 MB as fresh pages from the OS, which the kernel zero-fills one page
        # fault at a time (a third of a step). 128 positions of GPT-2's logits take 26 MB; a GPU wants more.
        # nll exists before the chunks: small results allocated between them would pin glibc's heap, and the
        # next chunk's logits could not reuse the memory of the last one's.
        chunk = 128 if x.device.type == "cpu" else 4096
        nll = torch.empty(len(targets), device=x.device)  # (M,) float32, filled a chunk at a time
        for i in range(0, len(targets), chunk):
            logits = self.lm_head(x[i:i + chunk]).float()  # (chunk, vocab)
            nll[i:i + chunk] = F.cross_entropy(logits, targets[i:i + chunk], reduction="none")
        return torch.zeros(scored.shape, device=x.device).masked_scatter(scored, nll)  # (N, T)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
                 ) -> torch.Tensor:
        """Extend idx (N, T) by sampling max_new_tokens tokens, one at a time. Each layer keeps the keys and
        values of the tokens so far (a KV cache), so a step computes only the newest position. Once the
        sequence outgrows block_size, the window of its last block_size tokens moves on by one token every
        step, their positions change, and every step computes the whole window again, as without a cache."""
        cache = None
        for _ in range(max_new_tokens):
            if cache is None or idx.shape[1] > self.config.block_size:  # the prompt, or a window that moved
                cache = [KVCache() for _ in self.transformer.h]
                logits = self(idx[:, -self.config.block_size:], cache=cache)  # (N, T, vocab)
            else:
                logits = self(idx[:, -1:], cache=cache)  # (N, 1, vocab): the earlier tokens are in the cache
            logits = logits[:, -1, :] / temperature  # (N, vocab): the next token
            if top_k is not None:
                kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth_best, float("-inf"))
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)], dim=1)
        return idx

    # ---- Hugging Face checkpoints: GPT2LMHeadModel's tensors under its names and orientation ----

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> GPT:
        """GPT-2 from a name (gpt2 … gpt2-xl: the Hugging Face cache, else downloaded), a folder or a .safetensors file."""
        file = locate_weights(name_or_path)
        try:
            raw = load_file(file)
        except Exception as e:  # safetensors' own errors: not a safetensors file, truncated, ...
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        # Keys with or without "transformer."; h.0.attn.bias is the causal mask, a buffer we recompute
        # (but h.0.attn.c_attn.bias is a weight), so it is skipped on purpose, as is the old masked_bias.
        state = {"transformer." + k.removeprefix("transformer."): t for k, t in raw.items()
                 if k.split(".")[-2:] not in (["attn", "bias"], ["attn", "masked_bias"])}
        state["lm_head.weight"] = state.pop("transformer.lm_head.weight", state.get("transformer.wte.weight"))
        if (wte := state.get("transformer.wte.weight")) is not None and not torch.equal(state["lm_head.weight"], wte):
            raise ValueError(f"{file}: lm_head.weight differs from wte.weight, but GPT-2 ties the two")
        config_file = file.with_name("config.json")
        config = config_from_hf(json.loads(config_file.read_text())) if config_file.is_file() else config_from_shapes(state, file)
        with torch.device("meta"):  # shapes only: every value comes from the file
            model = cls(config).to_empty(device="cpu")
        model.lm_head.weight = model.transformer.wte.weight  # to_empty untied the two
        try:
            model.load_state_dict(transpose_conv1d(state), strict=True)  # every name and shape, or nothing
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{file} does not fit a GPT-2 of {config.n_layer} layers, {config.n_head} heads, "
                             f"{config.n_embd} dims: " + " ".join(str(e).split())) from None
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors as transformers writes GPT-2, each file atomically."""
        config = {**{hf: getattr(self.config, ours) for ours, hf in HF_CONFIG.items()}, "n_ctx": self.config.block_size,
                  "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new"}
        tensors = {k: v.detach().cpu().contiguous() for k, v in transpose_conv1d(self.state_dict()).items()
                   if k != "lm_head.weight"}  # the head is wte; safetensors wants contiguous CPU tensors
        atomic_write(Path(folder) / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write(Path(folder) / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))


# Hugging Face's GPT-2 computes these four with Conv1D, x @ W + b, W stored (in, out), where nn.Linear
# stores (out, in). Every other tensor has the same name and shape on both sides.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_CONFIG = {f.name: f.name for f in fields(GPTConfig)} | {"block_size": "n_positions"}  # our field -> config.json's
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's 124M … 1558M; their config.json has the sizes


def transpose_conv1d(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout <-> Hugging Face's; a transpose undoes itself, so loading and saving share it."""
    return {key: t.t() if key.endswith(CONV1D_WEIGHTS) else t for key, t in state.items()}


def config_from_hf(hf: dict) -> GPTConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):  # both: tanh GELU
        raise ValueError(f"config.json asks for activation {hf['activation_function']!r}; this GPT-2 computes gelu_new")
    hf = {"n_positions": hf.get("n_ctx"), **hf}  # n_ctx: the older name of n_positions
    return GPTConfig(**{ours: hf[theirs] for ours, theirs in HF_CONFIG.items() if hf.get(theirs) is not None})


def config_from_shapes(state: dict[str, torch.Tensor], file: Path) -> GPTConfig:
    """The config of a checkpoint without config.json; n_head from GPT-2's head size of 64."""
    if "transformer.wte.weight" not in state or "transformer.wpe.weight" not in state:
        raise ValueError(f"{file}: no wte.weight or wpe.weight, so this is not a GPT-2 checkpoint")
    (vocab_size, n_embd), block_size = state["transformer.wte.weight"].shape, len(state["transformer.wpe.weight"])
    n_layer = sum(key.endswith(".ln_1.weight") for key in state)
    if n_embd % 64:
        raise ValueError(f"{file}: n_head of a {n_layer}-layer, {n_embd}-wide GPT-2 cannot be read off its weights "
                         f"({n_embd} is no multiple of GPT-2's head size 64); put its config.json beside it")
    return GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_embd // 64, n_embd=n_embd)


def locate_weights(name_or_path: str) -> Path:
    """The model.safetensors of a folder, a .safetensors file, or a released GPT-2's name."""
    path = Path(name_or_path).expanduser()
    file = path / "model.safetensors" if path.is_dir() else path
    name = name_or_path.removeprefix("openai-community/")
    if file.is_file():
        return file
    if name in GPT2_NAMES and not path.exists():
        # transformers caches "gpt2" under models--gpt2, "openai-community/gpt2" under models--openai-community--gpt2
        if cached := hub_file(name, "model.safetensors", fetch=False):
            return cached
        hub_file(f"openai-community/{name}", "config.json")
        return hub_file(f"openai-community/{name}", "model.safetensors")
    if path.exists() or path.suffix == ".safetensors" or len(path.parts) > 1 or name_or_path.startswith("."):
        raise FileNotFoundError(f"{file} not found: pass a folder with model.safetensors or a .safetensors file")
    raise ValueError(f"unknown model {name_or_path!r}: known names are {', '.join(GPT2_NAMES)}; "
                     "a folder with model.safetensors or a .safetensors file also works")
