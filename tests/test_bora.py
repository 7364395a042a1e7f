"""BoRA on a tiny GPT: the limits of tau, exact routing, merging, the prior, adapter save/load, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturb, prior_by_hand

from bora import BoRA, LoRAConfig
from gpt2 import GPT, GPTConfig, KVCache
from lora import LoRALinear
from train import prior

TASKS = ["joy", "sadness", "anger"]
VOCAB = 101


@pytest.fixture
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=VOCAB))


def tokens(batch: int, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_init_equals_plain_gpt_and_prior_is_zero(gpt):
    plain = copy.deepcopy(gpt)
    bora = BoRA(gpt, TASKS, LoRAConfig(targets=("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")))
    idx, targets = tokens(4), tokens(4, seed=2)
    ids = torch.tensor([0, 1, 2, -1])
    assert torch.equal(bora(idx, ids), plain(idx)) and torch.equal(bora(idx, ids, targets), plain(idx, targets))
    assert prior(bora, 2.0).item() == 0.0
    assert torch.equal(bora.distances(), torch.zeros(len(TASKS)))


def test_base_frozen_by_construction_and_counts(gpt):
    n_base = sum(p.numel() for p in gpt.parameters())
    bora = BoRA(gpt, TASKS, LoRAConfig(rank=4))
    layers = [m for m in bora.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 and all(isinstance(m.base, torch.nn.Linear) for m in layers)
    trainable = {id(p) for m in layers for p in (m.A, m.B, m.A_mean, m.B_mean)}
    assert all(p.requires_grad == (id(p) in trainable) for p in bora.parameters())
    # c_attn is (96, 32): per layer (D + 1) adapters of r·(in + out) numbers
    assert bora.parameter_counts() == (2 * (len(TASKS) + 1) * 4 * (32 + 96), n_base)


def test_targets_pick_exactly_the_named_linears(gpt):
    bora = BoRA(gpt, TASKS, LoRAConfig(targets=("attn.c_proj", "c_fc")))
    adapted = sorted(p for p, m in bora.gpt.named_modules() if isinstance(m, LoRALinear))
    assert adapted == [f"transformer.h.{i}.{name}" for i in range(2) for name in ("attn.c_proj", "mlp.c_fc")]


def test_mixed_rows_equal_merged_models_and_merge_leaves_bora_alone(gpt):
    bora = perturb(BoRA(gpt, TASKS, LoRAConfig(rank=4, targets=("c_attn", "mlp.c_proj"))), std=0.1)
    ids = torch.tensor([2, 0, -1, 1, 0])
    idx = tokens(len(ids))
    logits = bora(idx, ids)
    saved = bora.adapter_state_dict()
    for task in (-1, 0, 1, 2):
        merged = bora.merge(task)
        assert type(merged) is GPT and not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied
        rows = ids == task
        assert (merged(idx[rows]) - logits[rows]).abs().max() <= 1e-5, f"task {task}"
    assert all(torch.equal(v, bora.adapter_state_dict()[k]) for k, v in saved.items())
    assert torch.equal(bora(idx, ids), logits)


def test_a_kv_cache_passes_through_the_task_adapters(gpt):
    """Generation's one-token-at-a-time forward, with mixed tasks: each row's adapter acts on every new
    position, so the cached steps compute what one forward over the whole sequence computes."""
    bora = perturb(BoRA(gpt, TASKS, LoRAConfig(rank=4, targets=("c_attn", "mlp.c_proj"))), std=0.1)
    ids, idx, cache = torch.tensor([2, 0, -1, 1]), tokens(4), [KVCache() for _ in range(2)]
    with torch.no_grad():
        steps = [bora(idx[:, :4], ids, cache=cache)] + [bora(idx[:, j:j + 1], ids, cache=cache) for j in range(4, 10)]
        assert torch.allclose(torch.cat(steps, dim=1), bora(idx, ids), atol=1e-5)


def test_shared_mode_every_task_is_theta(gpt):
    plain = copy.deepcopy(gpt)
    bora = BoRA(gpt, TASKS, LoRAConfig(rank=4), shared=True)
    layers = list(bora.adapted.values())
    assert all(m.A.shape[0] == 0 and m.B.shape[0] == 0 for m in layers)  # no task adapters exist
    idx, targets = tokens(1).expand(4, -1), tokens(4, seed=2)
    assert torch.equal(bora(idx, torch.tensor([0, 1, 2, -1])), plain(idx))  # Θ starts as the base
    perturb(bora, std=0.1)
    logits = bora(idx, torch.tensor([0, 1, 2, -1]))
    assert not torch.equal(logits[0], plain(idx)[0])
    assert all(torch.equal(logits[row], logits[3]) for row in range(3))
    assert torch.equal(bora.merge(1)(idx), bora.merge(-1)(idx))
    assert prior(bora, 2.0).item() == 0.0 and torch.equal(bora.distances(), torch.zeros(len(TASKS)))
    # Θ is what trains: a step moves it, and AdamW copes with the empty task tensors
    opt = torch.optim.AdamW([p for p in bora.parameters() if p.requires_grad], lr=1e-2)
    bora(idx, torch.tensor([0, 1, 2, 0]), targets).sum().backward()
    theta_before = layers[0].A_mean.detach().clone()
    opt.step()
    assert not torch.equal(layers[0].A_mean, theta_before)


def test_absent_task_gets_zero_likelihood_gradient(gpt):
    bora = perturb(BoRA(gpt, TASKS, LoRAConfig(rank=4, targets=("c_attn", "c_fc"))), std=0.1)
    idx, targets = tokens(3), tokens(3, seed=2)
    bora(idx, torch.tensor([0, 2, 0]), targets).sum().backward()
    for layer in bora.adapted.values():
        assert torch.count_nonzero(layer.A.grad[1]) == 0 and torch.count_nonzero(layer.B.grad[1]) == 0
        assert layer.A.grad[0].abs().max() > 0 and layer.B.grad[2].abs().max() > 0
    bora.zero_grad()
    prior(bora, 2.0).backward()  # only the prior couples the tasks
    assert all(layer.A.grad[1].abs().max() > 0 for layer in bora.adapted.values())


def test_prior_and_distances_match_a_hand_sum(gpt):
    bora = perturb(BoRA(gpt, TASKS, LoRAConfig(rank=4, targets=("c_attn", "c_fc"))), std=0.1)
    assert prior(bora, 2.0).item() == pytest.approx(prior_by_hand(bora, 2.0), rel=1e-6)  # τ/2 · Σ with τ = 2
    # the distance of task d alone: the prior with only d's adapters away from Θ
    for d in range(len(TASKS)):
        alone = copy.deepcopy(bora)
        with torch.no_grad():
            for m in alone.adapted.values():
                others = [e for e in range(len(TASKS)) if e != d]
                m.A[others], m.B[others] = m.A_mean, m.B_mean
        assert bora.distances()[d].item() == pytest.approx(prior_by_hand(alone, 2.0) ** 0.5, rel=1e-5)


def test_theta_map_is_the_mean_of_the_task_adapters(gpt):
    bora = perturb(BoRA(gpt, TASKS, LoRAConfig(rank=4)), std=0.1)
    layers = list(bora.adapted.values())
    thetas = [p for m in layers for p in (m.A_mean, m.B_mean)]
    opt = torch.optim.Adam(thetas, lr=0.02)  # the task adapters stay fixed: only Θ moves
    for _ in range(300):
        opt.zero_grad()
        prior(bora, 2.0).backward()
        opt.step()
    for m in layers:
        assert torch.allclose(m.A_mean, m.A.mean(dim=0), atol=1e-4)
        assert torch.allclose(m.B_mean, m.B.mean(dim=0), atol=1e-4)


def test_base_weights_unchanged_by_a_training_step(gpt):
    bora = perturb(BoRA(gpt, TASKS, LoRAConfig(rank=4)), std=0.1)
    base_before = {k: v.clone() for k, v in bora.gpt.state_dict().items() if k.endswith(("weight", "bias"))}
    adapters_before = bora.adapter_state_dict()
    opt = torch.optim.AdamW([p for p in bora.parameters() if p.requires_grad], lr=1e-2)
    nll = bora(tokens(3), torch.tensor([0, 1, -1]), tokens(3, seed=2))
    (nll.mean() + prior(bora, 1.0)).backward()
    opt.step()
    assert all(torch.equal(v, bora.gpt.state_dict()[k]) for k, v in base_before.items())
    assert not torch.equal(adapters_before["transformer.h.0.attn.c_attn.A"], bora.gpt.transformer.h[0].attn.c_attn.A)


def test_adapter_state_dict_round_trip(gpt, tmp_path):
    fresh_base = copy.deepcopy(gpt)
    bora = perturb(BoRA(gpt, TASKS, LoRAConfig(rank=4, targets=("c_attn", "mlp.c_proj"))), std=0.1)
    sd = bora.adapter_state_dict()
    assert not any(k.endswith(("weight", "bias")) for k in sd)  # adapters only, never the frozen GPT-2
    assert len(sd) == 2 * 2 * 4  # layers × targets × (A, B, A_mean, B_mean)
    torch.save(sd, tmp_path / "adapters.pt")
    again = BoRA(fresh_base, TASKS, LoRAConfig(rank=4, targets=("c_attn", "mlp.c_proj")))
    again.load_adapter_state_dict(torch.load(tmp_path / "adapters.pt", weights_only=True))
    idx, ids = tokens(4), torch.tensor([0, 1, 2, -1])
    assert torch.equal(again(idx, ids), bora(idx, ids))


def test_strict_load_errors(gpt):
    bora = BoRA(gpt, TASKS, LoRAConfig(rank=4))
    sd = bora.adapter_state_dict()
    key = "transformer.h.0.attn.c_attn.A"
    with pytest.raises(ValueError, match=f"missing \\['{key}'\\]"):
        bora.load_adapter_state_dict({k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        bora.load_adapter_state_dict({**sd, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=f"{key}.*\\[2, 4, 32\\].*\\[3, 4, 32\\]"):  # torch's own shape check
        bora.load_adapter_state_dict({**sd, key: sd[key][:2]})
    bad = {k: v + 1 for k, v in sd.items()}
    bad[key] = sd[key][:2]
    with pytest.raises(ValueError):
        bora.load_adapter_state_dict(bad)
    assert all(torch.equal(v, bora.adapter_state_dict()[k]) for k, v in sd.items())  # nothing half-loaded


def test_task_index(gpt):
    bora = BoRA(gpt, TASKS, LoRAConfig(rank=4))
    assert [bora.task_index(name) for name in ("joy", "anger", "global")] == [0, 2, -1]
    with pytest.raises(ValueError, match="unknown task 'fear': known tasks are joy, sadness, anger"):
        bora.task_index("fear")


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([[0], [1], [2]]), r"shape \(3,\)"),
        (torch.tensor([0, 1]), r"shape \(3,\)"),
        (torch.tensor([0, 1, 3]), "task id 3 is out of range: with 3 tasks"),
        (torch.tensor([0, -2, 1]), "task id -2 is out of range"),
        (torch.tensor([0.0, 1.0, 2.0]), "integer tensor"),
    ],
)
@pytest.mark.parametrize("shared", [False, True])
def test_bad_task_ids_are_refused(gpt, ids, match, shared):
    bora = BoRA(gpt, TASKS, LoRAConfig(rank=4), shared=shared)
    with pytest.raises(ValueError, match=match):
        bora(tokens(3), ids)


def test_task_ids_never_outlive_a_forward(gpt):
    bora = BoRA(gpt, TASKS, LoRAConfig(rank=4))
    bora(tokens(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="longer than block_size"):
        bora(tokens(2, length=65), torch.tensor([0, 1]))  # fails inside GPT, mid-forward
    assert all(layer.task_ids is None for layer in bora.adapted.values())
    with pytest.raises(ValueError, match="no task ids"):
        bora.gpt(tokens(2))  # the adapted GPT on its own refuses rather than guess a task


def test_merge_refuses_unknown_task(gpt):
    with pytest.raises(ValueError, match="task id 3 is out of range"):
        BoRA(gpt, TASKS, LoRAConfig(rank=4)).merge(3)


@pytest.mark.parametrize("target", ["c_proj", "lm_head", "attn"])
def test_bad_target_names(target):
    with pytest.raises(ValueError, match=f"unknown LoRA target '{target}': choose from c_attn, attn.c_proj, c_fc, mlp.c_proj"):
        LoRAConfig(targets=(target,))


@pytest.mark.parametrize("names", [[], ["a", "a"], ["a", "global"]])
def test_bad_task_names(gpt, names):
    with pytest.raises(ValueError, match="task names must be distinct"):
        BoRA(gpt, names, LoRAConfig())


def test_config_checks():
    assert LoRAConfig(targets=["c_fc", "c_attn"]).targets == ("c_fc", "c_attn")
    assert LoRAConfig(targets="c_fc").targets == ("c_fc",)
    with pytest.raises(ValueError, match="distinct"):
        LoRAConfig(targets=("c_attn", "c_attn"))
    with pytest.raises(ValueError, match="rank >= 1"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="dropout < 1"):
        LoRAConfig(dropout=1.0)
