"""export.py: a task's merged model, written as a Hugging Face GPT-2 folder, and every adapter written in
PEFT's LoRA format compute what BoRA computes, in transformers and in PEFT themselves."""
from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import perturb, write_checkpoint, write_hf_checkpoint
from safetensors.torch import load_file

import export
from bora import TARGETS, BoRA, LoRAConfig
from gpt2 import GPT

TASKS = ["joy", "sadness", "anger"]
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("c_attn", "mlp.c_proj"))


def perturbed_bora(hf_dir: Path) -> BoRA:
    """A BoRA whose task adapters and Θ are all non-zero and all different (as after training)."""
    torch.manual_seed(0)
    return perturb(BoRA(GPT.from_pretrained(str(hf_dir)), TASKS, LORA), std=0.2).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[BoRA, Path, Path]:
    """(the BoRA, its checkpoint, the base model folder), built once for this file."""
    root = tmp_path_factory.mktemp("export")
    hf_dir = write_hf_checkpoint(root / "tiny-gpt2")
    bora = perturbed_bora(hf_dir)
    return bora, write_checkpoint(bora, root / "run" / "ckpt.pt", hf_dir), hf_dir


IDX = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(3))  # (N, T)


def bora_logits(bora: BoRA, task: int) -> torch.Tensor:
    with torch.no_grad():
        return bora(IDX, torch.full((IDX.shape[0],), task))  # (N, T, V)


def gpt_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDX)


@pytest.mark.parametrize("task", ["sadness", "anger", "global"])
def test_export_round_trip_gives_the_task_logits(setup, tmp_path: Path, capsys, task: str) -> None:
    bora, ckpt, hf_dir = setup
    out = tmp_path / "export"
    export.main([str(ckpt), "--task", task, "--out", str(out)])
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors"]
    printed = capsys.readouterr().out
    assert "GPT.from_pretrained" in printed and "GPT2LMHeadModel.from_pretrained" in printed

    exported = gpt_logits(GPT.from_pretrained(str(out)))
    expected = bora_logits(bora, bora.task_index(task))
    assert (exported - expected).abs().max().item() <= 1e-5
    # the adapter really matters, so the equality above could have failed
    base = gpt_logits(GPT.from_pretrained(str(hf_dir)))
    assert (exported - base).abs().max().item() > 1e-3


def test_tasks_export_different_models(setup, tmp_path: Path) -> None:
    _, ckpt, _ = setup
    export.main([str(ckpt), "--task", "joy", "--out", str(tmp_path / "joy")])
    export.main([str(ckpt), "--task", "anger", "--out", str(tmp_path / "anger")])
    joy, anger = GPT.from_pretrained(str(tmp_path / "joy")), GPT.from_pretrained(str(tmp_path / "anger"))
    assert (gpt_logits(joy) - gpt_logits(anger)).abs().max().item() > 1e-3


def test_refuses_non_empty_folder_unless_forced(setup, tmp_path: Path) -> None:
    bora, ckpt, _ = setup
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        export.main([str(ckpt), "--task", "joy", "--out", str(out)])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "--force" in msg and "\n" not in msg
    assert sorted(f.name for f in out.iterdir()) == ["notes.txt"]  # nothing written

    export.main([str(ckpt), "--task", "joy", "--out", str(out), "--force"])
    assert (gpt_logits(GPT.from_pretrained(str(out))) - bora_logits(bora, 0)).abs().max().item() <= 1e-5


def test_unknown_task_is_a_one_line_error_listing_tasks(setup, tmp_path: Path) -> None:
    _, ckpt, _ = setup
    with pytest.raises(SystemExit) as e:
        export.main([str(ckpt), "--task", "boredom", "--out", str(tmp_path / "x")])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "boredom" in msg and "\n" not in msg
    assert all(name in msg for name in TASKS)
    assert not (tmp_path / "x").exists()


def test_missing_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        export.main([str(tmp_path / "nope.pt"), "--task", "joy", "--out", str(tmp_path / "x")])
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)


def test_exported_folder_loads_in_transformers_with_equal_logits(setup, tmp_path: Path) -> None:
    bora, ckpt, _ = setup
    out = tmp_path / "export"
    export.main([str(ckpt), "--task", "sadness", "--out", str(out)])
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        hf_logits = hf(IDX).logits  # (N, T, V)
    assert (hf_logits - bora_logits(bora, bora.task_index("sadness"))).abs().max().item() <= 1e-5


# ---- --peft: every adapter in PEFT's LoRA format, loaded by PEFT itself -----------------------------------

ALL_TARGETS = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=TARGETS)  # all four GPT-2 linears


@pytest.fixture(scope="module")
def peft_export(tmp_path_factory) -> tuple[BoRA, Path, Path]:
    """(a BoRA adapting all four linears, its --peft export folder, the base model folder)."""
    root = tmp_path_factory.mktemp("peft")
    hf_dir = write_hf_checkpoint(root / "tiny-gpt2")
    torch.manual_seed(1)
    bora = perturb(BoRA(GPT.from_pretrained(str(hf_dir)), TASKS, ALL_TARGETS), std=0.2).eval()
    export.main([str(write_checkpoint(bora, root / "run" / "ckpt.pt", hf_dir)), "--peft", "--out", str(root / "out")])
    return bora, root / "out", hf_dir


def peft_model(adapters: Path, hf_dir: Path, names: list[str]) -> peft.PeftModel:
    """transformers' GPT-2 with the exported adapters loaded by PEFT, each under its folder's name."""
    base = transformers.GPT2LMHeadModel.from_pretrained(str(hf_dir))
    model = peft.PeftModel.from_pretrained(base, str(adapters / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters / name), adapter_name=name)
    return model.eval()


def test_peft_export_writes_one_adapter_folder_per_task_and_global(peft_export, capsys) -> None:
    bora, out, hf_dir = peft_export
    assert sorted(f.name for f in out.iterdir()) == sorted(TASKS + ["global"])
    config = json.loads((out / "joy" / "adapter_config.json").read_text())
    assert config == {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1,
                      "target_modules": list(TARGETS), "fan_in_fan_out": True, "bias": "none", "inference_mode": True,
                      "base_model_name_or_path": str(hf_dir.resolve())}
    tensors = load_file(out / "joy" / "adapter_model.safetensors")
    n_layer, n_embd = 2, 32
    assert len(tensors) == 2 * 4 * n_layer
    assert tensors["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"].shape == (4, n_embd)  # (r, in)
    assert tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"].shape == (3 * n_embd, 4)  # (out, r)
    assert tensors["base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight"].shape == (4, 4 * n_embd)
    joy_B = bora.adapted["transformer.h.1.attn.c_attn"].B[0]
    assert torch.equal(tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"], joy_B)


@pytest.mark.parametrize("name", TASKS + ["global"])
def test_each_peft_adapter_gives_our_logits_in_peft(peft_export, name: str) -> None:
    bora, out, hf_dir = peft_export
    model = peft_model(out, hf_dir, [name])
    with torch.no_grad():
        theirs = model(IDX).logits  # (N, T, V)
        base = transformers.GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()(IDX).logits
    ours = bora_logits(bora, bora.task_index(name))
    assert (theirs - ours).abs().max().item() <= 1e-5
    assert (theirs - base).abs().max().item() > 1e-3  # the adapter matters, so the equality could fail


def test_peft_mixed_batch_equals_our_mixed_task_forward(peft_export) -> None:
    """PEFT's adapter_names= serves a batch that mixes adapters, as our task ids do (it cannot train one)."""
    bora, out, hf_dir = peft_export
    names = ["anger", "global", "joy", "sadness", "joy", "anger"]
    idx = torch.randint(0, 50257, (len(names), 9), generator=torch.Generator().manual_seed(4))  # (N, T)
    model = peft_model(out, hf_dir, TASKS + ["global"])
    with torch.no_grad():
        theirs = model(idx, adapter_names=names).logits
        ours = bora(idx, torch.tensor([bora.task_index(n) for n in names]))
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_peft_export_of_a_shared_adapter_writes_global_alone(tmp_path: Path, capsys) -> None:
    """τ = ∞ trains no task adapters: Θ is every task's, so global/ is the one folder, and export.py says so."""
    hf_dir = write_hf_checkpoint(tmp_path / "tiny-gpt2")
    torch.manual_seed(2)
    bora = perturb(BoRA(GPT.from_pretrained(str(hf_dir)), TASKS, LORA, shared=True), std=0.2).eval()
    ckpt = write_checkpoint(bora, tmp_path / "run" / "ckpt.pt", hf_dir, tau=float("inf"))
    export.main([str(ckpt), "--peft", "--out", str(tmp_path / "out")])
    assert [f.name for f in (tmp_path / "out").iterdir()] == ["global"]
    assert "only one" in capsys.readouterr().out
    with torch.no_grad():
        theirs = peft_model(tmp_path / "out", hf_dir, ["global"])(IDX).logits
    assert (theirs - bora_logits(bora, 1)).abs().max().item() <= 1e-5


def test_peft_export_refuses_a_task_name_that_is_no_folder_name(tmp_path: Path) -> None:
    hf_dir = write_hf_checkpoint(tmp_path / "tiny-gpt2")
    bora = BoRA(GPT.from_pretrained(str(hf_dir)), ["joy", "../up"], LORA)
    ckpt = write_checkpoint(bora, tmp_path / "run" / "ckpt.pt", hf_dir)
    with pytest.raises(SystemExit) as e:
        export.main([str(ckpt), "--peft", "--out", str(tmp_path / "out")])
    assert str(e.value.code).startswith("error: ") and "'../up'" in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "out").exists() and not (tmp_path / "up").exists()


def test_peft_config_names_a_released_gpt2_by_its_hub_id(setup) -> None:
    ckpt = export.Checkpoint.load(setup[1])
    ckpt.base_model = "gpt2-medium"  # as a run started with --init gpt2-medium records it
    assert export.peft_config(ckpt)["base_model_name_or_path"] == "openai-community/gpt2-medium"


def test_export_needs_task_or_peft(setup, tmp_path: Path) -> None:
    for argv in ([], ["--task", "joy", "--peft"]):
        with pytest.raises(SystemExit) as e:
            export.main([str(setup[1]), *argv, "--out", str(tmp_path / "x")])
        assert str(e.value.code).startswith("error: ") and "--peft" in str(e.value.code)
