"""LoRA with one adapter per task plus their global mean, for batches that mix tasks.

LoRA (Hu et al., 2021) keeps a pretrained weight W frozen and learns a low-rank update:

    h = W x + (alpha / r) · B A x,        A (r, in), B (out, r), r ≪ min(in, out)

Here every task d has its own pair θ_d = (A_d, B_d), stacked as A (D, r, in) and B (D, out, r), and one
more pair Θ = (A_mean, B_mean) is the global mean that BoRA's prior pulls every θ_d towards. Task id -1
selects Θ: the adapter for a task never seen in training. This file knows nothing about GPT-2 or training.
Shapes: N rows (documents) of T tokens; D tasks; r the rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

GLOBAL = -1  # the task id that selects the global mean Θ = (A_mean, B_mean)


def check_task_ids(task_ids: torch.Tensor, batch_size: int, num_tasks: int) -> None:
    """A one-line ValueError unless task_ids is an integer tensor (batch_size,) with values in [-1, num_tasks)."""
    if not isinstance(task_ids, torch.Tensor) or task_ids.is_floating_point() or task_ids.dtype == torch.bool:
        raise ValueError(f"task ids must be an integer tensor, got {getattr(task_ids, 'dtype', type(task_ids))}; "
                         "build them with torch.tensor(ids, dtype=torch.long)")
    if task_ids.shape != (batch_size,):
        raise ValueError(f"task ids must have shape ({batch_size},), one per row of the batch, got {tuple(task_ids.shape)}")
    if ((task_ids < GLOBAL) | (task_ids >= num_tasks)).any():  # -2 would silently index a task adapter
        bad = task_ids[(task_ids < GLOBAL) | (task_ids >= num_tasks)][0].item()
        raise ValueError(f"task id {bad} is out of range: with {num_tasks} tasks the valid ids are -1 (the global "
                         f"mean)" + (f" or 0..{num_tasks - 1}" if num_tasks else ", as there are no task adapters"))


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus task-indexed low-rank adapters A (D, r, in), B (D, out, r) and Θ = (A_mean, B_mean).

    Each row's task comes from `forward(x, task_ids)` or, inside a model that knows nothing about
    tasks (GPT-2 just calls `self.c_attn(x)`), from the attribute `task_ids`, which the enclosing model
    sets for one forward and clears afterwards (BoRA.forward). Without task ids the layer refuses to run.
    """

    def __init__(self, base: nn.Linear, num_tasks: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)  # W (out, in) and its bias stay exactly as pretrained
        self.num_tasks, self.rank = num_tasks, rank
        self.scaling = alpha / rank  # LoRA's alpha/r: a change of r then needs no change of the lr
        self.dropout = nn.Dropout(dropout)  # on the adapter's input only; the frozen path sees x as is
        out_features, in_features = base.weight.shape
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        # Θ starts as LoRA starts: A_mean Kaiming-uniform (as nn.Linear initialises weights), B_mean zero.
        # So B·A = 0 and the layer begins as the pretrained one, yet the gradient w.r.t. B goes through
        # A ≠ 0, so learning can start; with both zero nothing would ever move.
        self.A_mean = nn.Parameter(torch.empty(rank, in_features, **like))  # (r, in)
        nn.init.kaiming_uniform_(self.A_mean, a=math.sqrt(5))
        self.B_mean = nn.Parameter(torch.zeros(out_features, rank, **like))  # (out, r)
        # Every task starts exactly at Θ: the prior term Σ_d ‖θ_d − Θ‖² is 0 at step 0, and as every
        # B_d = 0 the whole model computes exactly what the base model computes.
        self.A = nn.Parameter(self.A_mean.detach().expand(num_tasks, -1, -1).clone())  # (D, r, in)
        self.B = nn.Parameter(torch.zeros(num_tasks, out_features, rank, **like))  # (D, out, r)
        self.task_ids: torch.Tensor | None = None  # set only during a forward by the enclosing model
        self.keep_rows = False  # keep each row's gathered adapter and, after backward, its gradient
        self.rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (task ids, A_t, B_t)

    def adapters(self, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's own adapter, A_t (N, r, in) and B_t (N, out, r), in one gather; task id -1 picks Θ."""
        rows = task_ids.where(task_ids >= 0, self.num_tasks)  # Θ sits after the D task adapters, in row D
        A_all = torch.cat([self.A, self.A_mean[None]])  # (D+1, r, in)
        B_all = torch.cat([self.B, self.B_mean[None]])  # (D+1, out, r)
        # index_select, not A_all[rows]: its backward (index_add) is deterministic on a multi-threaded
        # CPU, while fancy indexing's (an accumulating index_put) is not, which would spoil exact resume.
        return A_all.index_select(0, rows), B_all.index_select(0, rows)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, ..., in) and task_ids (N,) (default: self.task_ids, checked by the caller) -> (N, ..., out)."""
        if task_ids is not None:
            check_task_ids(task_ids, x.shape[0], self.num_tasks)
        elif (task_ids := self.task_ids) is None:
            raise ValueError("LoRALinear got no task ids: call layer(x, task_ids), or run the model via BoRA.forward")
        A_t, B_t = self.adapters(task_ids)  # (N, r, in), (N, out, r)
        if self.keep_rows and A_t.requires_grad:  # one copy per row, i.e. per document: their gradients
            A_t.retain_grad(), B_t.retain_grad()  # are per-document gradients, at no extra cost
            self.rows = (task_ids, A_t, B_t)
        x_a = self.dropout(x).reshape(x.shape[0], -1, x.shape[-1])  # (N, T, in); T = all middle dims
        down = torch.bmm(x_a, A_t.transpose(1, 2))  # (N,T,in)·(N,r,in)ᵀ → (N,T,r)
        y = self.base(x).reshape(*down.shape[:2], -1)  # (N, T, out): the frozen W x + b
        # h = W x + b + (alpha/r) · B_t A_t x, every row with its own task's adapter: baddbmm adds the
        # scaled (N,T,r)·(N,out,r)ᵀ → (N,T,out) to y in one pass over the output, not three.
        return torch.baddbmm(y, down, B_t.transpose(1, 2), alpha=self.scaling).view(*x.shape[:-1], -1)

    def merged_weight(self, task: int) -> torch.Tensor:
        """W + (alpha/r) · B_t A_t (out, in): one weight that computes task `task`'s output (-1 = Θ)."""
        task_ids = torch.tensor([task], device=self.A_mean.device)
        check_task_ids(task_ids, 1, self.num_tasks)
        A_t, B_t = self.adapters(task_ids)  # (1, r, in), (1, out, r)
        return self.base.weight + self.scaling * (B_t[0] @ A_t[0])  # (out,r)·(r,in) → (out,in)

    @torch.no_grad()
    def merged_linear(self, task: int) -> nn.Linear:
        """A new plain, frozen nn.Linear with task `task`'s adapter folded into its weight; self is unchanged."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        merged.weight.copy_(self.merged_weight(task))
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, rank={self.rank}, scaling={self.scaling:g}"
