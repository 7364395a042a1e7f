"""eval.py: loading checkpoints (and refusing what is not one), reports, comparisons, JSON, plot.

The checkpoints here are written by train.py's own checkpoint() (conftest.write_checkpoint) from BoRAs with
random adapters: no training needed to test the reporting. (The end-to-end test evaluates trained ones.)
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb, prepare, random_split, write_checkpoint, write_hf_checkpoint

import eval as evaluate_cli
import prepare_data
from bora import BoRA, LoRAConfig, load_checkpoint
from data import Split, load_split, make_batch, require_scored
from gpt2 import GPT


def perturbed_bora(hf: Path, shared: bool = False, seed: int = 0) -> BoRA:
    model = BoRA(GPT.from_pretrained(str(hf)), ["alpha", "beta", "gamma"], LoRAConfig(rank=4), shared=shared)
    return perturb(model, seed=seed)


def write_ckpt(model, data: Path, hf: Path, path: Path, tau: float) -> Path:
    return write_checkpoint(model, path, hf, tau=tau, data=data)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    data, hf = prepare(root, {"alpha": 4, "beta": 6, "gamma": 8}), write_hf_checkpoint(root / "tiny-gpt2")
    ckpts = {tau: write_ckpt(perturbed_bora(hf, shared=tau == math.inf, seed=i), data, hf, root / f"t{tau}" / "ckpt.pt", tau)
             for i, tau in enumerate((10.0, 0.0, math.inf))}
    return {"root": root, "data": data, "hf": hf, "ckpts": ckpts}


def run_eval(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluate_cli.main([str(a) for a in args])
    return out.getvalue()


def eval_error(*args: str) -> str:
    with pytest.raises(SystemExit) as e:
        run_eval(*args)
    message = str(e.value.code)  # sys.exit("error: ...") -> exit status 1, the message on stderr
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_load_checkpoint_rebuilds_the_model(setup):
    model, ckpt = load_checkpoint(setup["ckpts"][10.0])
    saved = torch.load(setup["ckpts"][10.0], weights_only=True)["adapters"]
    assert model.adapter_state_dict().keys() == saved.keys()
    assert all(torch.equal(model.adapter_state_dict()[k], v) for k, v in saved.items())
    assert model.task_names == ["alpha", "beta", "gamma"] and model.lora.rank == 4 and not model.training
    assert ckpt.tau == 10.0 and ckpt.train_sizes == [4, 6, 8]


def test_load_checkpoint_refuses_what_is_not_one(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "random.pt")
    torch.save({"state_dict": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this train.py"):
        load_checkpoint(tmp_path / "foreign.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(setup["ckpts"][10.0].read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(truncated)
    # a checkpoint whose base model has gone
    hf = write_hf_checkpoint(tmp_path / "gone-gpt2")
    path = write_ckpt(perturbed_bora(hf), setup["data"], hf, tmp_path / "run" / "ckpt.pt", 10.0)
    shutil.rmtree(hf)
    assert "base model" in eval_error(path) and "gone-gpt2" in eval_error(path)


def test_a_task_with_nothing_to_score_is_an_error_not_a_perplexity(setup):
    """A split without one task's documents (an old dataset, a hand-made one): never exp(0 / 0) = "ppl 1.000"."""
    test = load_split(setup["data"], "test")
    keep = [i for i in range(len(test)) if test.task_ids[i] != 1]  # no document of "beta"
    docs = [test.document(i) for i in keep]
    without_beta = Split(np.concatenate(docs), np.concatenate([[0], np.cumsum([len(d) for d in docs])]),
                         test.task_ids[keep], test.prompt_lens[keep])
    model, _ = load_checkpoint(setup["ckpts"][10.0])
    with pytest.raises(ValueError, match="task 'beta' has no scored token"):
        evaluate_cli.evaluate(model, without_beta, 32, 8, "cpu")
    with pytest.raises(ValueError, match="task 'beta' has no documents in the test split.*prepare_data.py"):
        require_scored(without_beta, model.task_names, 32, "test")
    require_scored(test, model.task_names, 32, "test")  # the whole split has something of every task


@pytest.mark.parametrize("pass_tokens", [1, 150, 10_000])  # a document a pass, a few, all in one
def test_evaluate_gives_the_numbers_of_one_document_at_a_time(setup, pass_tokens):
    """Sorted by length and trimmed, in passes of any size: each task's log-likelihood per token is the one
    computed document by document over the whole softmax, in float64."""
    model = perturbed_bora(setup["hf"]).eval()
    split = random_split([2, 70, 5, 33, 12, 90, 8, 41, 3, 64, 17, 25, 4, 66, 9, 50, 21, 7])  # some cut at 64
    m = evaluate_cli.evaluate(model, split, 64, pass_tokens, "cpu")
    nll, tokens = [0.0] * 3, [0] * 3
    with torch.no_grad():
        for i in range(len(split)):
            x, y, t = make_batch(split, [i], 64, "cpu")
            log_p = torch.log_softmax(model(x, t).double(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
            nll[t.item()] -= log_p[y != -1].sum().item()
            tokens[t.item()] += (y != -1).sum().item()
    assert m["tokens"] == tokens
    assert m["ll"] == pytest.approx([-n / k for n, k in zip(nll, tokens)], rel=1e-6)


def test_single_report(setup):
    text = run_eval(setup["ckpts"][10.0], "--split", "val", "--device", "cpu")  # the report below runs on the CPU
    assert "tau=10" in text and "token-weighted" in text and "task-averaged" in text
    model, _ = load_checkpoint(setup["ckpts"][10.0])
    report = evaluate_cli.evaluate_checkpoint(setup["ckpts"][10.0], split="val")
    val = load_split(setup["data"], "val")
    assert [t["docs"] for t in report["tasks"]] == [int((val.task_ids == d).sum()) for d in range(3)]
    assert [t["train_docs"] for t in report["tasks"]] == [4, 6, 8]
    assert [t["distance"] for t in report["tasks"]] == pytest.approx(model.distances().tolist())
    for t in report["tasks"]:  # the table shows the same numbers
        assert f"{t['ppl']:.3f}" in text and f"{t['distance']:.4f}" in text
    lls = [t["ll"] for t in report["tasks"]]
    assert report["overall"]["ll_task_avg"] == pytest.approx(sum(lls) / 3)
    assert report["overall"]["ppl_task_avg"] == pytest.approx(math.exp(-sum(lls) / 3))
    nll_sum = sum(-t["ll"] * t["tokens"] for t in report["tasks"])
    assert report["overall"]["ppl_token_weighted"] == pytest.approx(math.exp(nll_sum / report["overall"]["tokens"]))


def test_several_checkpoints_side_by_side(setup):
    paths = [setup["ckpts"][tau] for tau in (10.0, 0.0, math.inf)]
    report = json.loads(run_eval(*paths, "--json"))
    first, *others = report["checkpoints"]
    assert [c["tau"] for c in report["checkpoints"]] == [10.0, 0.0, "inf"]  # JSON has no ∞: written as a string
    for other, gain in zip(others, report["relative_improvement_of_first"]):
        for a, b in zip(first["tasks"], other["tasks"]):
            assert gain["tasks"][a["task"]] == pytest.approx((b["ppl"] - a["ppl"]) / b["ppl"])
        assert gain["ppl_task_avg"] == pytest.approx(
            (other["overall"]["ppl_task_avg"] - first["overall"]["ppl_task_avg"]) / other["overall"]["ppl_task_avg"])
    assert others[1]["tasks"][0]["distance"] == 0.0  # τ = ∞: every task is Θ
    table = run_eval(*paths)
    header = next(line for line in table.splitlines() if line.startswith("task "))
    assert header.split()[3:] == ["tau=10", "tau=0", "tau=inf", "vs", "tau=0", "vs", "tau=inf"]
    gain = report["relative_improvement_of_first"][0]["tasks"]["alpha"]
    assert f"{gain:+.1%}" in next(line for line in table.splitlines() if line.startswith("alpha"))


def test_batch_size_below_one_is_a_one_line_error(setup):
    assert "--batch-size" in eval_error(setup["ckpts"][10.0], "--batch-size", "0")


def test_eval_refuses_another_dataset(setup, tmp_path):
    other = prepare(tmp_path, {"alpha": 4, "beta": 6, "gamma": 8}, seed=1)  # same tasks, other texts
    assert "--data" in eval_error(setup["ckpts"][10.0], "--data", other)
    # the same source split with another seed: test documents that were training documents
    source = next(setup["data"].parent.glob("corpus*.csv"))
    with contextlib.redirect_stdout(io.StringIO()):
        prepare_data.main(["--csv", str(source), "--seed", "7", "--out", str(tmp_path / "resplit")])
    assert "not the dataset" in eval_error(setup["ckpts"][10.0], "--data", tmp_path / "resplit")
    assert "--split" not in run_eval(setup["ckpts"][10.0], "--data", setup["data"])  # the right one is fine


def test_plot_needs_matplotlib(setup, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    message = eval_error(setup["ckpts"][10.0], "--plot", tmp_path / "p.png")
    assert "pip install matplotlib" in message and not (tmp_path / "p.png").exists()


def test_plot_draws_perplexity_against_tau(setup, tmp_path):  # matplotlib: requirements-test.txt
    paths = [setup["ckpts"][tau] for tau in (10.0, 0.0, math.inf)]
    run_eval(*paths, "--plot", tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- intervals: a bootstrap over documents, checked on data whose answer is known ----

SIZES = (20, 40, 80, 160)  # documents per task in each simulated test split
MU = np.array([2.0, 2.5, 3.0, 3.5])  # every task's true NLL per token


def simulated_split(rng: np.random.Generator, worse_by: float = 0.0) -> tuple[np.ndarray, ...]:
    """Per-document NLL sums and token counts of two models on one simulated split. Documents differ in
    length and difficulty (shared by both models, as real documents are); model B is worse by `worse_by`
    nats per token, plus a little noise of its own. True perplexities: exp(mean μ) and exp(mean μ + worse_by)."""
    task_ids = np.repeat(np.arange(len(SIZES)), SIZES)
    tokens = rng.integers(5, 40, size=len(task_ids))
    difficulty = rng.normal(0, 0.5, size=len(task_ids))  # per token, shared by both models
    nll_a = tokens * (MU[task_ids] + difficulty) + rng.normal(0, 1, size=len(task_ids)) * np.sqrt(tokens)
    nll_b = nll_a + tokens * (worse_by + rng.normal(0, 0.05, size=len(task_ids)))
    return task_ids, tokens, nll_a, nll_b


def as_result(m: dict, task_ids: np.ndarray) -> dict:
    """What evaluate_checkpoint returns, from report()'s numbers: enough for improvements()."""
    tasks = [{"task": str(d), "ppl": p, "ppl_interval": i} for d, (p, i) in enumerate(zip(m["ppl"], m["ppl_interval"]))]
    return {"checkpoint": "", "tau": 0.0, "data_id": "same", "tasks": tasks, "bootstrap": m["bootstrap"],
            "overall": {k: m[k] for k in ("ppl_task_avg", "ppl_token_weighted")}}


def test_intervals_cover_the_true_perplexity_and_pairing_narrows_the_comparison():
    """Over 200 simulated test splits, the 95 % intervals hold the true task-averaged perplexity and the true
    relative improvement about 95 % of the time. Resampling the two models' documents independently (not
    paired) makes the comparison's interval far too wide: it then covers nearly always, and the test fails."""
    rng, worse_by = np.random.default_rng(0), 0.02
    true_ppl, true_gain = math.exp(MU.mean()), 1 - math.exp(-worse_by)  # (ppl_B − ppl_A) / ppl_B
    hits = {"ppl": 0, "paired gain": 0, "unpaired gain": 0}
    widths = {"paired gain": [], "unpaired gain": []}
    for _ in range(200):
        task_ids, tokens, nll_a, nll_b = simulated_split(rng, worse_by)
        a = evaluate_cli.report(nll_a, tokens, task_ids, len(SIZES), samples=400, seed=1)
        b, b_other_rows = (evaluate_cli.report(nll_b, tokens, task_ids, len(SIZES), samples=400, seed=s) for s in (1, 2))
        lo, hi = a["ppl_task_avg_interval"]
        hits["ppl"] += lo <= true_ppl <= hi
        for name, other in (("paired gain", b), ("unpaired gain", b_other_rows)):
            lo, hi = evaluate_cli.improvements([as_result(a, task_ids), as_result(other, task_ids)])[0]["ppl_task_avg_interval"]
            hits[name] += lo <= true_gain <= hi
            widths[name].append(hi - lo)
    assert 0.88 <= hits["ppl"] / 200 <= 0.985, hits  # the percentile bootstrap covers a little less than 95 %
    assert 0.88 <= hits["paired gain"] / 200 <= 0.985, hits
    assert hits["unpaired gain"] / 200 > 0.99 and np.mean(widths["unpaired gain"]) > 5 * np.mean(widths["paired gain"])


def test_the_resampling_keeps_every_task_and_its_size():
    task_ids = np.array([2, 0, 1, 0, 2, 2, 1, 0, 0])
    rows = evaluate_cli.resampled_documents(task_ids, samples=50, seed=3)
    assert rows.shape == (50, len(task_ids))
    assert all(np.array_equal(np.sort(task_ids[row]), np.sort(task_ids)) for row in rows)  # same tasks, same sizes
    assert (task_ids[rows] == task_ids[rows[0]]).all()  # a column keeps its task in every row
    assert np.array_equal(rows, evaluate_cli.resampled_documents(task_ids, samples=50, seed=3))  # the same draw
    assert len(np.unique(rows[:, 0])) > 1  # ... that does resample
