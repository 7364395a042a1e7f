"""BoRA: a frozen GPT-2 whose chosen linears carry one LoRA adapter θ_d per task, tied by θ_d ~ N(Θ, τ⁻¹ I).

This file joins gpt2.py and lora.py (train.py makes the prior part of the objective): it routes task ids to the
adapted layers, measures ‖θ_d − Θ‖, folds one task's adapter into a plain GPT, and defines what a checkpoint
holds. τ = ∞ is `shared=True`: no task adapters exist, every task uses the global mean Θ."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from files import atomic_write
from gpt2 import GPT, KVCache
from lora import GLOBAL, LoRALinear, check_task_ids

TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")  # path suffixes; a bare c_proj would be ambiguous
CKPT_FORMAT = "bora-gpt2-ckpt/3"  # /3: Θ's tensors are A_mean, B_mean (were A0, B0)
GLOBAL_NAME = "global"  # how users name Θ: `sample.py --task global`


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("c_attn",)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets.split(",") if isinstance(self.targets, str) else self.targets)
        if unknown := [t for t in self.targets if t not in TARGETS]:
            raise ValueError(f"unknown LoRA target {unknown[0]!r}: choose from {', '.join(TARGETS)}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets must be distinct and not empty, got {self.targets}")
        if self.rank < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs rank >= 1 and 0 <= dropout < 1, got rank={self.rank}, dropout={self.dropout}")


class BoRA(nn.Module):
    """A GPT adapted in place: its target linears become LoRALinear, every base weight frozen."""

    def __init__(self, gpt: GPT, task_names: Sequence[str], lora: LoRAConfig, shared: bool = False):
        super().__init__()
        self.task_names, self.lora, self.shared = list(task_names), lora, shared
        if not self.task_names or len(set(self.task_names)) != len(self.task_names) or GLOBAL_NAME in self.task_names:
            raise ValueError(f"task names must be distinct, at least one, and not {GLOBAL_NAME!r}: {self.task_names}")
        self.gpt = gpt.requires_grad_(False)  # freeze the whole base first: only the adapters below train
        self.adapted: dict[str, LoRALinear] = {}  # module path -> layer (registered inside gpt, not here)
        for path, module in list(gpt.named_modules()):
            if isinstance(module, nn.Linear) and path.endswith(tuple("." + t for t in lora.targets)):
                layer = LoRALinear(module, 0 if shared else len(task_names), lora.rank, lora.alpha, lora.dropout)
                parent, _, name = path.rpartition(".")
                setattr(gpt.get_submodule(parent), name, layer)
                self.adapted[path] = layer

    @contextmanager
    def _routed(self, task_ids: torch.Tensor) -> Iterator[None]:
        """Give every adapted layer the batch's task ids for one forward and always clear them after, so
        no later call runs with stale ids. (Backward needs no ids: autograd kept the gathered adapters.)"""
        for layer in self.adapted.values():
            layer.task_ids = task_ids
        try:
            yield
        finally:
            for layer in self.adapted.values():
                layer.task_ids = None

    def forward(self, idx: torch.Tensor, task_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: list[KVCache] | None = None) -> torch.Tensor:
        """idx (N, T), task_ids (N,) with -1 = Θ -> GPT's output: logits (N, T, V), or with targets each one's NLL (N, T).
        A generation's KV cache passes through: the adapters act on each new position like any other."""
        task_ids = torch.as_tensor(task_ids, device=idx.device)
        check_task_ids(task_ids, idx.shape[0], len(self.task_names))  # once here, not in every layer
        with self._routed(torch.full_like(task_ids, GLOBAL) if self.shared else task_ids):  # τ = ∞: every task is Θ
            return self.gpt(idx, targets, cache)  # gpt2.py's own code path, untouched

    @torch.no_grad()
    def distances(self) -> torch.Tensor:
        """‖θ_d − Θ‖ per task (D,) over all adapted layers, A and B together; zeros when shared."""
        sq = sum((m.A - m.A_mean).pow(2).sum((1, 2)) + (m.B - m.B_mean).pow(2).sum((1, 2)) for m in self.adapted.values())
        return torch.zeros(len(self.task_names)) if self.shared else sq.sqrt()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the adapter tensors only (keys like 'transformer.h.0.attn.c_attn.A'), never GPT-2's."""
        return {f"{path}.{name}": p.detach().clone() for path, layer in self.adapted.items()
                for name, p in layer.named_parameters(recurse=False)}  # A, B, A_mean, B_mean; not the frozen base

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Every adapter tensor and nothing else, or nothing at all; torch's own load checks the shapes."""
        before = self.adapter_state_dict()
        try:
            missing, unexpected = self.gpt.load_state_dict(state, strict=False)
            if (missing := sorted(set(missing) & before.keys())) or unexpected:
                raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        except (RuntimeError, ValueError) as e:
            self.gpt.load_state_dict(before, strict=False)  # undo what did load
            raise ValueError("adapters do not fit this BoRA (other tasks, targets, rank or layers?): "
                             + " ".join(str(e).split())) from None

    @torch.no_grad()
    def merge(self, task: int) -> GPT:
        """A new plain, frozen GPT with task `task`'s adapter folded in (-1 = Θ); this BoRA stays as it is."""
        check_task_ids(torch.tensor([task]), 1, len(self.task_names))
        merged = copy.deepcopy(self.gpt)
        for path, layer in self.adapted.items():
            parent, _, name = path.rpartition(".")
            setattr(merged.get_submodule(parent), name, layer.merged_linear(GLOBAL if self.shared else task))
        return merged

    def task_index(self, name: str) -> int:
        if name != GLOBAL_NAME and name not in self.task_names:
            raise ValueError(f"unknown task {name!r}: known tasks are {', '.join(self.task_names)} "
                             f"(or {GLOBAL_NAME!r} for the shared mean Θ)")
        return GLOBAL if name == GLOBAL_NAME else self.task_names.index(name)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, frozen) numbers of parameters; the tied embedding / lm_head counts once."""
        return tuple(sum(p.numel() for p in self.parameters() if p.requires_grad == train) for train in (True, False))

    def checkpoint(self, base_model: str, **run) -> Checkpoint:
        """This model's part of a checkpoint (configs and adapters, never GPT-2 itself), plus the run's part."""
        return Checkpoint(base_model=base_model, gpt_config=asdict(self.gpt.config), task_names=self.task_names,
                          lora_config={**asdict(self.lora), "targets": list(self.lora.targets)},
                          shared=self.shared, adapters=self.adapter_state_dict(), **run)


@dataclass
class Checkpoint:
    """What ckpt.pt and last.pt hold, written and read through this one definition: the adapters and all it
    takes to rebuild the model around them, in plain tensors and Python values, so that torch.load reads
    it with weights_only=True (a checkpoint is data, not code)."""
    base_model: str  # GPT-2's name, or the folder it was loaded from
    gpt_config: dict
    lora_config: dict
    task_names: list[str]
    shared: bool  # τ = ∞: no task adapters
    adapters: dict[str, torch.Tensor]  # BoRA.adapter_state_dict()
    tau: float
    train_sizes: list[int]  # training documents per task
    data_path: str
    data_id: str  # the dataset's fingerprint (meta.json)
    task_prompt: bool  # did every document begin with "[task]"?
    args: dict  # train.py's TrainConfig
    epoch: int
    val: dict  # that epoch's validation numbers
    resume: dict | None = None  # last.pt only: optimiser, RNG and loop state for --resume
    format: str = CKPT_FORMAT

    def save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: torch.save(vars(self), tmp))  # a temp file, then renamed

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}: train one with train.py (it writes out/NAME/ckpt.pt)")
        try:  # a checkpoint is data, not code: weights_only refuses pickled objects
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); use a ckpt.pt written by train.py")
        found = saved.get("format") if isinstance(saved, dict) else None
        if isinstance(found, str) and found.startswith("bora-gpt2-ckpt/") and found != CKPT_FORMAT:
            raise ValueError(f"{path} was written by another version of train.py (format {found!r}, this one reads "
                             f"{CKPT_FORMAT!r}); train it again, or use the version that wrote it")
        if found != CKPT_FORMAT or saved.keys() != {f.name for f in fields(cls)}:
            raise ValueError(f"{path} is not a checkpoint of this train.py (format {CKPT_FORMAT!r}); use out/NAME/ckpt.pt")
        return cls(**saved)


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[BoRA, Checkpoint]:
    """The trained BoRA of a train.py checkpoint (its base GPT-2 + adapters) and the checkpoint itself."""
    ckpt = Checkpoint.load(path)
    try:
        gpt = GPT.from_pretrained(ckpt.base_model)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the base model of {path} is missing: {e}") from None
    if asdict(gpt.config) != ckpt.gpt_config:
        raise ValueError(f"{path} was trained on a GPT-2 of {ckpt.gpt_config}, but {ckpt.base_model} now has "
                         f"{asdict(gpt.config)}: the base model changed")
    model = BoRA(gpt, ckpt.task_names, LoRAConfig(**ckpt.lora_config), shared=ckpt.shared)
    model.load_adapter_state_dict(ckpt.adapters)
    return model.to(device).eval(), ckpt
