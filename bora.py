"""BoRA: a frozen GPT-2 whose chosen linears carry one LoRA adapter per task, tied by a prior.

The hierarchical prior of BoRA puts every task's adapter θ_d near a shared global mean Θ:

    θ_d ~ N(Θ, τ⁻¹ I)   ⇒   -log p(θ | Θ) = τ/2 · Σ_d ‖θ_d − Θ‖² + const

`penalty()` returns Σ_d ‖θ_d − Θ‖² (over all adapted layers, A and B); train.py weighs it by τ/2.
τ = 0 gives independent adapters, τ = ∞ one adapter shared by all tasks (`shared=True`: only Θ
exists). This file joins gpt2.py and lora.py: it routes task ids to the layers, saves and loads
adapters only, and folds one task's adapter into a plain GPT.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from gpt2 import GPT
from lora import GLOBAL, LoRALinear, check_task_ids

# Suffixes of module paths in GPT-2; a bare "c_proj" would be ambiguous (attention's or the MLP's).
ALLOWED_TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


def check_targets(targets: Sequence[str]) -> None:
    for target in targets:
        if target not in ALLOWED_TARGETS:
            raise ValueError(f"unknown LoRA target {target!r}: choose from {', '.join(ALLOWED_TARGETS)}")


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("c_attn",)

    def __post_init__(self) -> None:
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        check_targets(self.targets)
        if len(set(self.targets)) != len(self.targets) or not self.targets:
            raise ValueError(f"LoRA targets must be distinct and not empty, got {self.targets}")
        if self.rank < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA needs rank >= 1 and 0 <= dropout < 1, got rank={self.rank}, dropout={self.dropout}")


def _listed(keys: Sequence[str], shown: int = 3) -> str:
    return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")


class BoRA(nn.Module):
    """A GPT adapted in place: its target linears become LoRALinear, every base weight frozen."""

    def __init__(self, gpt: GPT, task_names: Sequence[str], lora: LoRAConfig, shared: bool = False):
        super().__init__()
        task_names = list(task_names)
        if not task_names or len(set(task_names)) != len(task_names) or "global" in task_names:
            raise ValueError(f"task names must be distinct, at least one, and not 'global' (reserved for Θ): {task_names}")
        check_targets(lora.targets)
        self.task_names, self.lora, self.shared = task_names, lora, shared
        self.gpt = gpt.requires_grad_(False)  # freeze the whole base first: only adapters added below train
        num_adapters = 0 if shared else len(task_names)  # τ = ∞: no task adapters at all, only Θ
        self.adapted: dict[str, LoRALinear] = {}  # module path -> layer; a plain dict, registered in gpt
        for target in lora.targets:
            paths = [p for p, m in gpt.named_modules() if isinstance(m, nn.Linear) and p.endswith("." + target)]
            if not paths:
                raise ValueError(f"LoRA target {target!r} matches no nn.Linear of this GPT; "
                                 f"allowed targets: {', '.join(ALLOWED_TARGETS)}")
            for path in paths:
                layer = LoRALinear(gpt.get_submodule(path), num_adapters, lora.rank, lora.alpha, lora.dropout)
                parent, _, name = path.rpartition(".")
                setattr(gpt.get_submodule(parent), name, layer)
                self.adapted[path] = layer

    @contextmanager
    def _routed(self, task_ids: torch.Tensor) -> Iterator[None]:
        """Give every adapted layer the batch's task ids for one forward; always clear them after,
        so a later call can never run with stale ids. (Backward needs no ids: autograd kept the gather.)"""
        for layer in self.adapted.values():
            layer.task_ids = task_ids
        try:
            yield
        finally:
            for layer in self.adapted.values():
                layer.task_ids = None

    def forward(self, idx: torch.Tensor, task_ids: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T), task_ids (B,) with -1 = Θ -> logits (B, T, V) and GPT's mean loss (or None)."""
        task_ids = torch.as_tensor(task_ids, device=idx.device)
        check_task_ids(task_ids, idx.shape[0], len(self.task_names))
        if self.shared:
            task_ids = torch.full_like(task_ids, GLOBAL)  # τ = ∞: every task's adapter is Θ
        with self._routed(task_ids):
            return self.gpt(idx, targets)  # gpt2.py's own code path, untouched

    def penalty(self) -> torch.Tensor:
        """Σ_layers Σ_d ‖θ_d − Θ‖² (A and B): the prior term without τ/2; exactly 0 when shared."""
        return torch.stack([layer.sq_distances().sum() for layer in self.adapted.values()]).sum()

    @torch.no_grad()
    def distances(self) -> torch.Tensor:
        """‖θ_d − Θ‖ per task over all adapted layers, (D,), for reports; zeros when shared."""
        if self.shared:
            return torch.zeros(len(self.task_names), device=next(iter(self.adapted.values())).A0.device)
        return torch.stack([layer.sq_distances() for layer in self.adapted.values()]).sum(dim=0).sqrt()

    def _adapter_params(self) -> dict[str, nn.Parameter]:
        # recurse=False: A, B, A0, B0 of each layer, never its frozen base linear
        return {f"{path}.{name}": p for path, layer in self.adapted.items()
                for name, p in layer.named_parameters(recurse=False)}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the adapter tensors only (keys like 'transformer.h.0.attn.c_attn.A'), never GPT-2."""
        return {key: p.detach().clone() for key, p in self._adapter_params().items()}

    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load adapters strictly: every key present, no extra key, every shape equal — or nothing loads."""
        params = self._adapter_params()
        missing, unexpected = sorted(params.keys() - sd.keys()), sorted(sd.keys() - params.keys())
        if missing or unexpected:
            raise ValueError(f"adapter state dict does not fit this BoRA: missing [{_listed(missing)}], "
                             f"unexpected [{_listed(unexpected)}] (different targets or layers?)")
        for key, p in params.items():
            if sd[key].shape != p.shape:
                raise ValueError(f"adapter {key} has shape {tuple(sd[key].shape)} but this BoRA expects "
                                 f"{tuple(p.shape)} (different number of tasks, rank, or shared mode?)")
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(sd[key])

    @torch.no_grad()
    def merge(self, task: int) -> GPT:
        """A new plain GPT (frozen, like the base) with task `task`'s adapter folded in (-1 = Θ).

        An explicit copy: this BoRA is left exactly as it was."""
        check_task_ids(torch.tensor([task]), 1, len(self.task_names))
        merged = copy.deepcopy(self.gpt)
        for path, layer in self.adapted.items():
            parent, _, name = path.rpartition(".")
            setattr(merged.get_submodule(parent), name, layer.merged_linear(GLOBAL if self.shared else task))
        return merged

    def task_index(self, name: str) -> int:
        """The task id of a task name; 'global' is the global mean Θ (-1)."""
        if name == "global":
            return GLOBAL
        if name not in self.task_names:
            raise ValueError(f"unknown task {name!r}: known tasks are {', '.join(self.task_names)} "
                             f"(or 'global' for the shared mean)")
        return self.task_names.index(name)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, frozen) numbers of parameters; the tied embedding / lm_head counts once."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters()) - trainable
