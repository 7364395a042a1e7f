"""sample.py: seeded, task-conditioned generation from a checkpoint, on a tiny GPT-2."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import tiktoken
import torch
from conftest import perturb, write_checkpoint, write_hf_checkpoint

import sample
from bora import BoRA, LoRAConfig
from data import encode_document
from gpt2 import GPT

TASKS = ["joy", "sadness", "anger"]
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("c_attn", "mlp.c_proj"))

ENC = tiktoken.get_encoding("gpt2")
PROMPT = "I walked home"
ARGS = ["--prompt", PROMPT, "--num-samples", "2", "--max-new-tokens", "8", "--temperature", "0.8",
        "--top-k", "50", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    """Checkpoints of one perturbed BoRA (with and without task prompts) and of an untrained one."""
    root = tmp_path_factory.mktemp("sample")
    hf_dir = write_hf_checkpoint(root / "tiny-gpt2")
    bora = perturb(BoRA(GPT.from_pretrained(str(hf_dir)), TASKS, LORA), std=0.2).eval()
    untrained = BoRA(GPT.from_pretrained(str(hf_dir)), TASKS, LORA)  # B = 0: every task equals the base
    return SimpleNamespace(
        hf_dir=hf_dir, bora=bora,
        ckpt=write_checkpoint(bora, root / "run" / "ckpt.pt", hf_dir),
        no_prompt=write_checkpoint(bora, root / "run-no-prompt" / "ckpt.pt", hf_dir, task_prompt=False),
        untrained=write_checkpoint(untrained, root / "run-untrained" / "ckpt.pt", hf_dir),
    )


def run_sample(capsys, ckpt: Path, task: str, seed: int, *extra: str) -> str:
    sample.main([str(ckpt), "--task", task, "--seed", str(seed), *ARGS, *extra])
    return capsys.readouterr().out


def expected(gpt: GPT, prompt_task: str | None, task: str, seed: int) -> str:
    """What sample.py should print for the ARGS above, computed on a model and task prompt we choose."""
    texts = sample.generate_samples(gpt, ENC, prompt_task, PROMPT, 2, 8, 0.8, 50, seed)
    return sample.format_samples(texts, task, seed)


def test_same_seed_same_text_other_seed_other_text(runs, capsys) -> None:
    first = run_sample(capsys, runs.ckpt, "sadness", 1)
    assert run_sample(capsys, runs.ckpt, "sadness", 1) == first
    assert run_sample(capsys, runs.ckpt, "sadness", 2) != first
    assert first.count("===== sample ") == 2 and PROMPT in first


def test_samples_come_from_the_task_adapter_with_its_task_prompt(runs, capsys) -> None:
    out = run_sample(capsys, runs.ckpt, "sadness", 1)
    assert expected(runs.bora.merge(1), "sadness", "sadness", 1) in out
    # the base model, given the very same input and seed, writes something else
    assert expected(GPT.from_pretrained(str(runs.hf_dir)), "sadness", "sadness", 1) not in out
    # ... and so does another task's adapter
    assert expected(runs.bora.merge(0), "sadness", "sadness", 1) not in out


def test_untrained_adapters_sample_exactly_like_the_base_model(runs, capsys) -> None:
    out = run_sample(capsys, runs.untrained, "sadness", 1)
    assert expected(GPT.from_pretrained(str(runs.hf_dir)), "sadness", "sadness", 1) in out


def test_no_task_prompt_when_the_data_had_none(runs, capsys) -> None:
    out = run_sample(capsys, runs.no_prompt, "sadness", 1)
    assert expected(runs.bora.merge(1), None, "sadness", 1) in out
    assert expected(runs.bora.merge(1), "sadness", "sadness", 1) not in out


def test_global_samples_from_theta_without_task_prompt(runs, capsys) -> None:
    out = run_sample(capsys, runs.ckpt, "global", 1)
    assert expected(runs.bora.merge(-1), None, "global", 1) in out


def test_the_model_reads_the_task_prompt_then_the_prompt(runs) -> None:
    ids, hidden = encode_document(ENC, PROMPT, "sadness")  # the start of a training document
    assert ENC.decode(ids[:-1]) == "[sadness] " + PROMPT and ENC.decode(ids[hidden:-1]) == " " + PROMPT
    assert ids[:hidden] == ENC.encode("[sadness]") and ids[-1] == ENC.eot_token
    assert encode_document(ENC, PROMPT, None) == (ENC.encode(PROMPT) + [ENC.eot_token], 0)
    # with nothing generated, what comes back is the prompt exactly: the task prompt is not shown
    for prompt_task in ("sadness", None):
        assert sample.generate_samples(runs.bora.merge(1), ENC, prompt_task, PROMPT, 1, 0, 1.0, None, 0) == [PROMPT]


def test_empty_prompt_starts_from_endoftext(runs) -> None:
    gpt = runs.bora.merge(-1)
    texts = sample.generate_samples(gpt, ENC, None, "", 2, 8, 1.0, None, seed=5)
    torch.manual_seed(5)
    rows = gpt.generate(torch.full((2, 1), ENC.eot_token), 8).tolist()  # (2, 9)
    manual = [ENC.decode(row[1:][: row[1:].index(ENC.eot_token)] if ENC.eot_token in row[1:] else row[1:])
              for row in rows]
    assert texts == manual and all(texts)


def test_a_sample_ends_at_endoftext(runs) -> None:
    """A model rigged to always say <|endoftext|> next returns the prompt alone."""
    gpt = GPT.from_pretrained(str(runs.hf_dir))
    with torch.no_grad():  # logits = wte · ln_f(x); with ln_f's gain 0 and bias ∝ wte[eot], eot wins everywhere
        gpt.transformer.ln_f.weight.zero_()
        gpt.transformer.ln_f.bias.copy_(100 * gpt.transformer.wte.weight[ENC.eot_token])
    assert sample.generate_samples(gpt, ENC, "joy", PROMPT, 2, 5, 1.0, 1, seed=0) == [PROMPT, PROMPT]


def test_unknown_task_is_a_one_line_error_listing_tasks(runs, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        run_sample(capsys, runs.ckpt, "boredom", 1)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "boredom" in msg and "\n" not in msg
    assert all(name in msg for name in TASKS)


@pytest.mark.parametrize("bad", [["--temperature", "0"], ["--top-k", "0"], ["--num-samples", "0"]])
def test_bad_arguments_are_one_line_errors(runs, capsys, bad: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        run_sample(capsys, runs.ckpt, "joy", 1, *bad)
    msg = str(e.value.code)
    assert msg.startswith("error: " + bad[0]) and "\n" not in msg
