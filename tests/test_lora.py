"""LoRALinear on its own: exact per-row routing, LoRA's equation, init, gradients, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import perturb

from lora import LoRALinear

IN, OUT, RANK, ALPHA, TASKS = 8, 12, 4, 8.0, 3


def randomised(layer: LoRALinear) -> LoRALinear:
    return perturb(layer, std=0.5)  # every task and Θ its own non-zero adapter (at init all equal, B = 0)


@pytest.fixture
def layer() -> LoRALinear:
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(IN, OUT), TASKS, RANK, ALPHA)


def test_base_is_frozen_and_adapters_train(layer):
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert all(p.requires_grad for p in (layer.A, layer.B, layer.A_mean, layer.B_mean))
    assert layer.A.shape == (TASKS, RANK, IN) and layer.B.shape == (TASKS, OUT, RANK)
    assert layer.A_mean.shape == (RANK, IN) and layer.B_mean.shape == (OUT, RANK)
    assert layer.scaling == ALPHA / RANK


def test_init_equals_base_layer_and_every_task_starts_at_theta(layer):
    x = torch.randn(4, 5, IN)
    ids = torch.tensor([0, 1, 2, -1])
    assert torch.equal(layer(x, ids), layer.base(x))
    assert torch.equal(layer.A, layer.A_mean.expand(TASKS, -1, -1)) and torch.count_nonzero(layer.B) == 0
    assert layer.A_mean.abs().max() > 0  # A_mean random (Kaiming-uniform), so B gets a gradient from the start
    assert torch.equal(layer.A - layer.A_mean, torch.zeros_like(layer.A)) and torch.equal(layer.B_mean, torch.zeros_like(layer.B_mean))


def test_mixed_batch_rows_equal_their_merged_weight(layer):
    randomised(layer)
    ids = torch.tensor([2, 0, -1, 1, 2, -1, 0])
    x = torch.randn(len(ids), 5, IN)
    y = layer(x, ids)  # (7, 5, OUT)
    for row, task in enumerate(ids.tolist()):
        expected = F.linear(x[row], layer.merged_weight(task), layer.base.bias)
        assert (y[row] - expected).abs().max() <= 1e-5, f"row {row} (task {task})"


def test_one_task_is_standard_lora():
    torch.manual_seed(1)
    layer = randomised(LoRALinear(nn.Linear(IN, OUT), 1, RANK, ALPHA))
    x = torch.randn(3, 5, IN)
    W, b, A, B = layer.base.weight, layer.base.bias, layer.A[0], layer.B[0]
    # the LoRA paper / PEFT, by hand: h = x Wᵀ + b + (alpha/r) · (x Aᵀ) Bᵀ, A (r, in), B (out, r)
    reference = x @ W.T + b + (ALPHA / RANK) * ((x @ A.T) @ B.T)
    assert (layer(x, torch.zeros(3, dtype=torch.long)) - reference).abs().max() <= 1e-5
    reference_theta = x @ W.T + b + (ALPHA / RANK) * ((x @ layer.A_mean.T) @ layer.B_mean.T)
    assert (layer(x, torch.full((3,), -1)) - reference_theta).abs().max() <= 1e-5


def test_accepts_any_middle_dims(layer):
    randomised(layer)
    ids = torch.tensor([1, -1])
    x = torch.randn(2, IN)  # (B, in): no time axis
    assert layer(x, ids).shape == (2, OUT)
    assert torch.allclose(layer(x, ids), layer(x[:, None], ids)[:, 0])


def test_absent_task_gets_no_likelihood_gradient_only_the_prior_couples(layer):
    randomised(layer)
    layer(torch.randn(4, 5, IN), torch.tensor([0, 2, 2, 0])).pow(2).sum().backward()
    assert torch.count_nonzero(layer.A.grad[1]) == 0 and torch.count_nonzero(layer.B.grad[1]) == 0
    assert torch.count_nonzero(layer.A_mean.grad) == 0 and torch.count_nonzero(layer.B_mean.grad) == 0  # no -1 row
    assert layer.A.grad[0].abs().max() > 0 and layer.B.grad[2].abs().max() > 0


def test_gather_backward_is_deterministic_on_a_multithreaded_cpu():
    """Exact resume needs bit-identical steps; an accumulating index_put (A_all[ids]) is not, on 2+ threads."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 2304), 6, 16, 16.0)
    randomised(layer)
    ids, x = torch.randint(-1, 6, (64,)), torch.randn(64, 3, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        grads = []
        for _ in range(8):
            layer.zero_grad()
            layer(x, ids).sum().backward()
            grads.append(layer.B.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_dropout_touches_only_the_adapter_branch():
    layer = LoRALinear(nn.Linear(IN, OUT), TASKS, RANK, ALPHA, dropout=0.5).train()
    x = torch.randn(4, 5, IN)
    # B = 0 at init: whatever dropout does to the adapter's input, the output must be the base's
    assert torch.equal(layer(x, torch.tensor([0, 1, 2, -1])), layer.base(x))
    randomised(layer)
    ids = torch.tensor([0, 1, 2, -1])
    assert not torch.equal(layer(x, ids), layer(x, ids))  # the adapter branch is dropped at random
    layer.eval()
    assert torch.equal(layer(x, ids), layer(x, ids))


def test_merged_linear_is_a_plain_copy(layer):
    randomised(layer)
    x = torch.randn(3, 5, IN)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    linear = layer.merged_linear(1)
    assert type(linear) is nn.Linear
    assert (linear(x) - layer(x, torch.ones(3, dtype=torch.long))).abs().max() <= 1e-5
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_task_ids_set_as_attribute(layer):
    randomised(layer)
    x, ids = torch.randn(2, 5, IN), torch.tensor([1, -1])
    layer.task_ids = ids
    assert torch.equal(layer(x), layer(x, ids))
    layer.task_ids = None
    with pytest.raises(ValueError, match="no task ids"):
        layer(x)


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([[0], [1]]), r"shape \(2,\)"),
        (torch.tensor([0, 1, 2]), r"shape \(2,\)"),
        (torch.tensor([0, 3]), "task id 3 is out of range"),
        (torch.tensor([-2, 0]), "task id -2 is out of range"),
        (torch.tensor([0.0, 1.0]), "integer tensor"),
        ([0, 1], "integer tensor"),
    ],
)
def test_bad_task_ids_are_refused(layer, ids, match):
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(2, 5, IN), ids)


def test_no_task_adapters_only_theta():
    layer = randomised(LoRALinear(nn.Linear(IN, OUT), 0, RANK, ALPHA))
    assert layer.A.shape == (0, RANK, IN) and layer.B.shape == (0, OUT, RANK)
    x = torch.randn(2, 5, IN)
    assert (layer(x, torch.tensor([-1, -1]))[0] - F.linear(x[0], layer.merged_weight(-1), layer.base.bias)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="no task adapters"):
        layer(x, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="out of range"):
        layer.merged_weight(0)
