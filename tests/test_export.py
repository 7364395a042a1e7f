"""export.py: a task's merged model, written as a Hugging Face GPT-2 folder, computes what BoRA computes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import perturb, write_checkpoint, write_hf_checkpoint

import export
from bora import BoRA, LoRAConfig
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
    transformers = pytest.importorskip("transformers")
    bora, ckpt, _ = setup
    out = tmp_path / "export"
    export.main([str(ckpt), "--task", "sadness", "--out", str(out)])
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        hf_logits = hf(IDX).logits  # (N, T, V)
    assert (hf_logits - bora_logits(bora, bora.task_index("sadness"))).abs().max().item() <= 1e-5
