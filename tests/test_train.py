"""train.py: the objective, batching, micro-batches, checkpoints, resume, divergence and refusals.

Everything runs on CPU with the tiny GPT-2 of conftest.py and a small synthetic multi-task corpus
prepared by prepare_data.py itself. `write_corpus` and `train_run` are reused by the other test files.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_hf_checkpoint

import prepare_data
import train
from bora import BoRA, LoRAConfig
from gpt2 import GPT

# Three tasks that share most of their words and differ in a task-specific word list.
SHARED_WORDS = "the a of and to in is was we they it on at with from by".split()
TASK_WORDS = {"alpha": "red green blue yellow purple orange".split(), "beta": "dog cat horse mouse bird fish".split(),
              "gamma": "one two three four five six".split()}


def write_corpus(path: Path, train_docs: dict[str, int], seed: int = 0) -> Path:
    """A CSV (text, task): half of each document's words from its task's list, half shared.

    prepare_data's default split is 50/25/25 per task, so 2·n rows give n training documents.
    """
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "task"])
        for task, n in train_docs.items():
            for _ in range(2 * n):
                words = [rng.choice(TASK_WORDS[task] if rng.random() < 0.5 else SHARED_WORDS) for _ in range(8)]
                w.writerow([" ".join(words), task])
    return path


def prepare(folder: Path, train_docs: dict[str, int], seed: int = 0) -> Path:
    """CSV + prepare_data.py -> a dataset folder; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = write_corpus(folder / f"corpus{seed}.csv", train_docs, seed)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare_data.main(["--csv", str(csv_path), "--out", str(folder / f"data{seed}")])
    return folder / f"data{seed}"


def train_run(data: Path, hf: Path, out: Path, *extra: str) -> Path:
    """train.main in-process with small settings; extra arguments win. Return the run folder."""
    args = ["--data", str(data), "--init", str(hf), "--out", str(out), "--rank", "4", "--block-size", "32",
            "--batch-size", "16", "--max-epochs", "2", "--log-every", "100", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(args)
    return out


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def adapters(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["adapters"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset with 3 tasks of 4/6/8 training documents, tiny GPT-2 folder), shared by this module."""
    root = tmp_path_factory.mktemp("small")
    return prepare(root, {"alpha": 4, "beta": 6, "gamma": 8}), write_hf_checkpoint(root / "tiny-gpt2")


def perturbed_bora(hf: Path, shared: bool = False, seed: int = 0) -> BoRA:
    """A BoRA whose adapters all differ (B ≠ 0), so that every gradient below is non-trivial."""
    torch.manual_seed(seed)
    model = BoRA(GPT.from_pretrained(str(hf)), ["alpha", "beta", "gamma"], LoRAConfig(rank=4), shared=shared)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.train()


# ---- the objective and batching ----------------------------------------------------------------


def test_lr_auto_rule():
    assert train.auto_lr(0) == 1e-4 and train.auto_lr(5) == 1e-4  # clamped from below
    assert train.auto_lr(100) == pytest.approx(1e-3)  # 1e-5 · τ
    assert train.auto_lr(1e4) == 1e-2 and train.auto_lr(float("inf")) == 1e-2  # clamped from above
    assert train.parse_args([]).lr is None and train.parse_args(["--lr", "auto"]).lr is None
    assert train.parse_args(["--lr", "0.05", "--tau", "100"]).lr == 0.05  # an explicit value wins


def test_parse_args_into_dataclass():
    cfg = train.parse_args(["--tau", "inf", "--targets", "c_attn,mlp.c_proj", "--micro-batch", "8"])
    assert isinstance(cfg, train.TrainConfig)
    assert cfg.tau == float("inf") and cfg.targets == ("c_attn", "mlp.c_proj") and cfg.micro_batch == 8
    assert (cfg.rank, cfg.alpha, cfg.block_size, cfg.batch_size, cfg.max_epochs, cfg.patience) == (16, 16.0, 256, 64, 20, 5)


def test_make_batch_scores_text_not_prompt_or_padding(small):
    data, _ = small
    split = prepare_data.load_split(data, "train")
    ids = [0, 5, 9]
    x, y, t = train.make_batch(split, ids, block_size=8, device="cpu")
    assert x.shape == y.shape and t.tolist() == split.task_ids[ids].tolist()
    for row, i in enumerate(ids):
        doc = torch.as_tensor(split.document(i).astype("int64"))
        p, n = int(split.prompt_lens[i]), min(len(doc) - 1, 8)
        assert torch.equal(x[row, :n], doc[:n])  # inputs: the document, cut to the block size
        assert torch.equal(y[row, p - 1 : n], doc[p:n + 1])  # targets: the next token, from the text on
        assert (y[row, : p - 1] == -1).all() and (y[row, n:] == -1).all()  # prompt and padding not scored


def test_objective_is_n_weighted_nll_plus_prior():
    nll_sum, tokens = torch.tensor([6.0, 0.0, 10.0]), torch.tensor([3.0, 0.0, 5.0])  # task 1 not in the batch
    N = torch.tensor([4.0, 12.0, 36.0])
    nll_term, prior_term = train.objective(nll_sum, tokens, N, torch.tensor(0.5), tau=10.0)
    assert nll_term.item() == pytest.approx(4 * 2.0 + 36 * 2.0)  # Σ_d N_d · nll_d
    assert prior_term.item() == pytest.approx(10.0 / 2 * 0.5)  # τ/2 · Σ_d ‖θ_d − Θ‖²


def test_theta_map_is_the_mean_of_the_task_adapters(small):
    """The prior's gradient w.r.t. Θ vanishes exactly when Θ is the mean of the θ_d."""
    model = perturbed_bora(small[1])
    layers = list(model.adapted.values())

    def theta_grads() -> list[torch.Tensor]:
        model.zero_grad()
        _, prior = train.objective(torch.zeros(3), torch.ones(3), torch.ones(3), model.penalty(), tau=10.0)
        prior.backward()
        return [g for layer in layers for g in (layer.A0.grad, layer.B0.grad)]

    assert max(g.abs().max() for g in theta_grads()) > 1e-3  # Θ away from the mean: pulled
    with torch.no_grad():
        for layer in layers:
            layer.A0.copy_(layer.A.mean(0))
            layer.B0.copy_(layer.B.mean(0))
    assert max(g.abs().max() for g in theta_grads()) < 1e-6


def test_micro_batches_give_the_same_step(small):
    data, hf = small
    split = prepare_data.load_split(data, "train")
    x, y, t = train.make_batch(split, list(range(10)), 32, "cpu")  # all three tasks
    N = torch.tensor([4.0, 6.0, 8.0])
    whole, parts = perturbed_bora(hf), None
    parts = copy.deepcopy(whole)
    results = []
    for model, micro in ((whole, 10), (parts, 3)):  # 3 does not divide 10: a short last micro-batch
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        results.append(train.train_step(model, model, opt, x, y, t, N, 10.0, micro, contextlib.nullcontext()))
    assert results[0] == pytest.approx(results[1], rel=1e-5)  # NLL term and prior term
    for (name, a), b in zip(whole.named_parameters(), parts.parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
            assert torch.allclose(a, b, atol=1e-6), name


def test_tau_zero_one_task_leaves_the_others_untouched(small):
    data, hf = small
    split = prepare_data.load_split(data, "train")
    model = perturbed_bora(hf)
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    alpha_docs = [i for i in range(len(split)) if split.task_ids[i] == 0]
    for _ in range(3):
        x, y, t = train.make_batch(split, alpha_docs, 32, "cpu")
        train.train_step(model, model, opt, x, y, t, torch.tensor([4.0, 6.0, 8.0]), 0.0, 16, contextlib.nullcontext())
    after = model.adapter_state_dict()
    for key in before:
        if key.endswith((".A", ".B")):
            assert not torch.equal(after[key][0], before[key][0])  # task 0 learned
            assert torch.equal(after[key][1:], before[key][1:])  # tasks 1, 2: bit for bit the same
        else:
            assert torch.equal(after[key], before[key])  # Θ: no data uses it and τ = 0 cuts the prior


# ---- checkpoints, resume, divergence ------------------------------------------------------------


def test_save_atomic_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    train.save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def save_then_crash(obj, f):
        real_save(obj, f)  # a complete temp file ...
        with open(f, "r+b") as fh:
            fh.truncate(10)  # ... cut short, as by a kill mid-write
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        train.save_atomic({"epoch": 2, "w": torch.zeros(3)}, path)
    old = torch.load(path, weights_only=True)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_checkpoint_contents_and_plain_types(small, tmp_path):
    data, hf = small
    out = train_run(data, hf, tmp_path / "run", "--tau", "10", "--max-epochs", "1")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # only tensors and plain Python values
    assert ckpt["format"] == train.CKPT_FORMAT and ckpt["base_model"] == str(hf.resolve())
    assert ckpt["task_names"] == ["alpha", "beta", "gamma"] and ckpt["train_sizes"] == [4, 6, 8]
    assert ckpt["tau"] == 10.0 and ckpt["shared"] is False and ckpt["lora_config"]["rank"] == 4
    assert ckpt["gpt_config"]["n_embd"] == 32 and ckpt["args"]["block_size"] == 32
    assert ckpt["data_meta"]["source"]["sha256"] == prepare_data.load_meta(data)["source"]["sha256"]
    assert all(".transformer.wte" not in k and "c_attn.base" not in k for k in ckpt["adapters"])  # adapters only
    last = torch.load(out / "last.pt", weights_only=True)
    assert {"optimizer", "rng", "state"} <= last.keys() and last["state"]["epoch"] == 1
    assert json.loads((out / "args.json").read_text())["lr_used"] == pytest.approx(1e-4)  # auto: 1e-5 · 10, clamped
    records = read_log(out)
    assert [r["kind"] for r in records][-1] == "done" and sum(r["kind"] == "val" for r in records) == 2


def test_resume_ends_with_the_same_adapters(small, tmp_path, monkeypatch):
    data, hf = small
    common = ("--tau", "10", "--lr", "1e-2", "--max-epochs", "2", "--dropout", "0.1", "--batch-size", "8")
    straight = train_run(data, hf, tmp_path / "straight", *common)

    real_save = train.save_atomic

    def killed_after_epoch_1(obj, path):
        real_save(obj, path)
        if path.name == "last.pt" and obj["state"]["epoch"] == 1:
            raise KeyboardInterrupt  # the run dies right after epoch 1 is on disk

    monkeypatch.setattr(train, "save_atomic", killed_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train_run(data, hf, tmp_path / "resumed", *common)
    monkeypatch.setattr(train, "save_atomic", real_save)
    resumed = train_run(data, hf, tmp_path / "resumed", *common, "--resume")

    for name in ("last.pt", "ckpt.pt"):
        a, b = adapters(straight / name), adapters(resumed / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["epoch"] for r in read_log(resumed) if r["kind"] == "val"] == [0, 1, 2]


def test_nan_loss_stops_with_a_message_and_keeps_the_best(small, tmp_path, monkeypatch):
    data, hf = small
    real_penalty, calls = BoRA.penalty, []

    def penalty_nan_from_step_4(self):
        calls.append(1)
        return real_penalty(self) * (float("nan") if len(calls) >= 4 else 1.0)

    monkeypatch.setattr(BoRA, "penalty", penalty_nan_from_step_4)
    with pytest.raises(SystemExit) as e:  # 18 documents in batches of 8: 3 steps an epoch
        train_run(data, hf, tmp_path / "run", "--tau", "10", "--batch-size", "8", "--max-epochs", "3")
    message = str(e.value.code)
    assert message.startswith("error:") and "step 4" in message and "smaller --lr" in message
    assert "\n" not in message
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)  # intact, from the last good epoch
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["adapters"].values())


# ---- refusals: one line, exit code 1 ------------------------------------------------------------


def refusal(*args: str) -> str:
    with pytest.raises(SystemExit) as e:
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(list(args))
    message = str(e.value.code)  # sys.exit("error: ...") exits with status 1 and prints this on stderr
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_refusals(small, tmp_path):
    data, hf = small
    base = ["--data", str(data), "--init", str(hf), "--out", str(tmp_path / "o"), "--block-size", "32", "--rank", "4"]
    assert "does not exist" in refusal(*base, "--data", str(tmp_path / "nowhere"))
    assert "--tau" in refusal(*base, "--tau", "-1")
    assert "c_foo" in refusal(*base, "--targets", "c_attn,c_foo")
    assert "--block-size 300" in refusal(*base, "--block-size", "300")  # the tiny model has 256 positions
    assert "--micro-batch" in refusal(*base, "--batch-size", "4", "--micro-batch", "8")
    other_tokenizer = shutil.copytree(data, tmp_path / "cl100k")
    meta = json.loads((other_tokenizer / "meta.json").read_text())
    (other_tokenizer / "meta.json").write_text(json.dumps({**meta, "encoding": "cl100k_base"}))
    assert "encoding" in refusal(*base, "--data", str(other_tokenizer))
    assert "last.pt" in refusal(*base, "--resume")  # nothing to resume yet


def test_resume_refuses_other_data_or_model(small, tmp_path):
    data, hf = small
    out = train_run(data, hf, tmp_path / "run", "--tau", "10", "--max-epochs", "1")
    other_data = prepare(tmp_path, {"alpha": 4, "beta": 6, "gamma": 8}, seed=1)  # same tasks, other texts
    other_model = write_hf_checkpoint(tmp_path / "other-gpt2", seed=1)
    base = ["--init", str(hf), "--data", str(data), "--out", str(out), "--block-size", "32", "--rank", "4",
            "--tau", "10", "--resume"]
    assert "different data" in refusal(*base, "--data", str(other_data))
    assert "different base model" in refusal(*base, "--init", str(other_model))
    assert "different --tau" in refusal(*base, "--tau", "100")
