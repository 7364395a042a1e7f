"""A known-truth world: synthetic tasks whose best possible perplexity we can compute exactly.

    python examples/known_truth.py            # build the world, pretrain a base, sweep τ (~7 min, 2 CPU cores)
    python examples/known_truth.py --quick    # the test suite's much smaller world

Documents are first-order Markov chains over real English words (one GPT-2 token each) that stop
at an END state, written as <|endoftext|>. Task d draws each next word from

    P_d(· | w) = softmax(L0 + S + Δ_d)[w]       L0 base, S shared by all tasks, Δ_d task d's own

A small GPT-2 pretrained on P0 plays "GPT-2"; train.py adapts it to the tasks. Knowing P_d, we know
the best possible (Bayes) perplexity of the very test documents eval.py scores, and two references:
P0 (no adaptation) and P0 + S (perfect sharing, no task knowledge). Task sizes span two orders of
magnitude, so τ = 0 starves the small tasks, τ = ∞ ignores Δ_d, and an intermediate τ should win.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's modules, from any working directory
from gpt2 import GPT, GPTConfig  # noqa: E402
from data import gpt2_encoding, load_meta, load_split, prompt_ids  # noqa: E402

TASKS = ("amber", "birch", "cedar", "delta", "ember", "fern", "grove", "heath")  # sorted, as prepare_data sorts
EOT, VOCAB = 50256, 50257  # GPT-2's <|endoftext|> (our END) and its vocabulary size


@dataclass
class WorldConfig:
    sizes: tuple[int, ...] = (5, 12, 30, 75, 190, 480)  # training documents per task: ~100× first to last
    n_words: int = 300
    latent: int = 16  # k: logits are bilinear in k-dim word vectors, which a 64-dim GPT can express
    base_scale: float = 3.6  # these scales put P0, P0 + S and P_d at perplexity ~18, ~13, ~8
    bias_scale: float = 1.0
    shared_scale: float = 1.1
    task_scale: float = 1.5
    end_prob: float = 0.08  # P(END | word): ~11 words a document
    base_docs: int = 12000  # documents from P0 to pretrain the base on
    base_steps: int = 1500
    block_size: int = 64
    split: tuple[float, float, float] = (0.25, 0.25, 0.5)  # train/val/test: a test set twice the training set,
    # so that even the smallest task's test perplexity rests on more than a couple of documents
    base_seed: int = 0  # P0 and the base: words, L0, END, pretraining documents
    seed: int = 0  # the tasks: S, Δ_d, their documents (task worlds can share one base)


WORLDS = {"related": {}, "identical": dict(task_scale=0.0), "unrelated": dict(shared_scale=0.0)}  # the extremes: τ = ∞, τ = 0

# The test suite's world: 60 words, ~6-word documents, 4 tasks of 3 to 81 training documents
QUICK = WorldConfig(sizes=(3, 9, 27, 81), n_words=60, base_scale=3.0, shared_scale=2.0, task_scale=1.3,
                    end_prob=0.15, base_docs=3000, base_steps=300)


@dataclass
class World:
    cfg: WorldConfig
    words: list[str]  # V words
    ids: np.ndarray  # (V,) their GPT-2 token ids, " word"
    L0: np.ndarray  # (V+1, V) base logits of the next word; row V is START
    S: np.ndarray  # (V+1, V) shared shift
    deltas: np.ndarray  # (D, V+1, V) the tasks' own shifts
    end_logit: np.ndarray  # (V+1,) logit of P(END | word), every task alike; −∞ at START

    @property
    def tasks(self) -> list[str]:
        return list(TASKS[: len(self.cfg.sizes)])


# ---------------------------------------------------------------------------------------------
# The world

def pick_words(n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """n words that GPT-2 reads as one token " word". Many such tokens are fragments (" contin");
    requiring " words" and " Word" to be single tokens too leaves ordinary nouns and verbs."""
    enc, pool = gpt2_encoding(), []
    for i in range(EOT):  # every id but <|endoftext|>
        tok = enc.decode_single_token_bytes(i)
        word = tok.decode() if re.fullmatch(rb" [a-z]{4,7}", tok) and not tok.endswith(b"s") else ""
        if word and all(len(enc.encode_ordinary(s)) == 1 for s in (word + "s", word.title())):
            pool.append((word[1:], i))
    chosen = sorted(rng.choice(len(pool), size=n, replace=False))
    return [pool[j][0] for j in chosen], np.array([pool[j][1] for j in chosen])


def make_world(cfg: WorldConfig) -> World:
    """Random tables. The shifts live in L0's own k-dim word space, so a LoRA of a model that learned
    P0 can express them: how much of Δ_d a task *learns* is then a matter of its data alone."""
    rng = np.random.default_rng(cfg.base_seed)
    words, ids = pick_words(cfg.n_words, rng)
    V, k = len(words), cfg.latent
    unit = lambda a: a * math.sqrt(k) / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731  equal norms:
    e = unit(rng.standard_normal((V + 1, k)))  # (V+1, k) what a word asks of the next  # no word dominates
    o = unit(rng.standard_normal((V, k)))  # (V, k) what a word offers
    L0 = cfg.base_scale * e @ o.T / math.sqrt(k) + cfg.bias_scale * rng.standard_normal(V)  # (V+1, V)
    end_logit = math.log(cfg.end_prob / (1 - cfg.end_prob)) + 0.5 * rng.standard_normal(V + 1)
    end_logit[V] = -math.inf  # START never ends: a document has one word at least
    rng = np.random.default_rng([cfg.base_seed, cfg.seed])  # the tasks' own draws

    def shift(scale: float) -> np.ndarray:  # a random bilinear map plus a word preference, (V+1, V)
        M, m = rng.standard_normal((k, k)) / math.sqrt(k), rng.standard_normal(k)
        return scale * (e @ M + m) @ o.T / math.sqrt(2 * k)

    S = shift(cfg.shared_scale)
    return World(cfg, words, ids, L0, S, np.stack([shift(cfg.task_scale) for _ in cfg.sizes]), end_logit)


def transitions(world: World, logits: np.ndarray) -> np.ndarray:
    """(V+1, V) word logits -> (V+1, V+1) probabilities, column V = END. Row-wise this is
    softmax([logits, logsumexp(logits) + end_logit]): every task keeps the same document lengths."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    q = 1 / (1 + np.exp(-world.end_logit[:, None]))  # (V+1, 1) P(END | row)
    return np.concatenate([(1 - q) * p / p.sum(axis=1, keepdims=True), q], axis=1)


def task_tables(world: World, shared: bool = True, own: bool = True) -> np.ndarray:
    """(D, V+1, V+1) every task's chain: P0, plus S if shared, plus Δ_d if own."""
    return np.stack([transitions(world, world.L0 + shared * world.S + own * delta) for delta in world.deltas])


def sample_docs(P: np.ndarray, n: int, rng: np.random.Generator) -> list[list[int]]:
    """n documents (word indices) from the chain P (V+1, V+1), all advanced one word at a time."""
    V = len(P) - 1
    cdf = np.cumsum(P, axis=1)
    docs, state, alive = [[] for _ in range(n)], np.full(n, V), np.arange(n)  # all start at START
    while alive.size:
        nxt = np.minimum((cdf[state[alive]] < rng.random((alive.size, 1))).sum(1), V)  # inverse cdf, (alive,)
        for i, w in zip(alive[nxt < V], nxt[nxt < V]):
            docs[i].append(int(w))
        state[alive] = nxt
        alive = alive[nxt < V]  # those that drew END are done
    return docs


def prepare(world: World, out: Path) -> Path:
    """corpus.csv (text, task), each task's training size / train fraction rows, then prepare_data.py
    -> out/data: the world's documents go the way of any corpus."""
    with open(out / "corpus.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["text", "task"])
        for d, (task, P) in enumerate(zip(world.tasks, task_tables(world))):
            rng = np.random.default_rng([world.cfg.base_seed, world.cfg.seed, d])  # independent of other tasks
            rows.writerows([" ".join(world.words[w] for w in doc), task]
                           for doc in sample_docs(P, round(world.cfg.sizes[d] / world.cfg.split[0]), rng))
    run([sys.executable, str(ROOT / "prepare_data.py"), "--csv", str(out / "corpus.csv"), "--out", str(out / "data"),
         "--seed", str(world.cfg.seed), "--split", ",".join(map(str, world.cfg.split)), "--force"])
    assert load_meta(out / "data")["tasks"] == world.tasks  # task ids agree with ours
    return out / "data"


# ---------------------------------------------------------------------------------------------
# The truth: the log-likelihood of the test documents under a known chain, scored as eval.py scores

def oracle_ll(world: World, split, tables: np.ndarray) -> list[float]:
    """Mean log-likelihood per scored token, per task, under tables (D, V+1, V+1): documents cut to
    block_size + 1 tokens, the prompt not scored, the first word from START, <|endoftext|> = END."""
    V = len(world.words)
    index = np.full(VOCAB, -1)
    index[world.ids], index[EOT] = np.arange(V), V  # token id -> state
    ll, n = np.zeros(len(tables)), np.zeros(len(tables))
    for i, (d, p) in enumerate(zip(split.task_ids, split.prompt_lens)):
        nxt = index[split.document(i)[: world.cfg.block_size + 1][p:].astype(np.int64)]  # (scored,)
        prev = np.concatenate([[V], nxt[:-1]])  # START, then the word before each
        ll[d], n[d] = ll[d] + np.log(tables[d][prev, nxt]).sum(), n[d] + len(nxt)
    return (ll / n).tolist()


def task_avg_ppl(ll: list[float]) -> float:
    """eval.py's task-averaged perplexity: exp of minus the mean over tasks of each task's ll/token."""
    return math.exp(-sum(ll) / len(ll))


# ---------------------------------------------------------------------------------------------
# The base: a small GPT-2 pretrained on P0, over the world's tokens only

def restricted_vocab(world: World) -> np.ndarray:
    """(R,) the only token ids the base reads or predicts: the words, the prompts', <|endoftext|>."""
    prompts = [t for task in world.tasks for t in prompt_ids(gpt2_encoding(), task)]
    return np.unique(np.concatenate([world.ids, prompts, [EOT]]))


def nll_restricted(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Token NLL (N, T) of y (−1: not scored) under the FULL vocabulary's softmax, from R logits.

    The other VOCAB − R tokens have zero embeddings in the saved model, so their logits are exactly 0
    and add (VOCAB − R)·e⁰ to the normaliser: one constant column log(VOCAB − R) stands for them all."""
    logits = model(x)  # (N, T, R)
    rest = torch.full_like(logits[..., :1], math.log(VOCAB - logits.size(-1)))  # (N, T, 1)
    nll = F.cross_entropy(torch.cat([logits, rest], -1).flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    return nll.view_as(y)


def to_rows(docs: list[np.ndarray], prompt_lens: list[int], R: np.ndarray, T: int) -> tuple[torch.Tensor, ...]:
    """GPT-2 token lists -> x, y (N, T) in rows of R, as train.py builds them: cut to T + 1 tokens,
    targets −1 on the prompt and the padding."""
    local = np.zeros(VOCAB, np.int64)
    local[R] = np.arange(len(R))
    x, y = np.zeros((len(docs), T), np.int64), np.full((len(docs), T), -1)
    for i, (doc, p) in enumerate(zip(docs, prompt_lens)):
        doc = local[np.asarray(doc[: T + 1], np.int64)]
        x[i, : len(doc) - 1], y[i, p - 1: len(doc) - 1] = doc[:-1], doc[p:]
    return torch.from_numpy(x), torch.from_numpy(y)


def base_documents(world: World, R: np.ndarray) -> tuple[torch.Tensor, ...]:
    """x, y (N, T): documents of P0, each behind a random task's prompt like the tasks' documents."""
    rng, enc = np.random.default_rng([world.cfg.base_seed, 2**31]), gpt2_encoding()
    prompts = [prompt_ids(enc, world.tasks[i]) for i in rng.integers(len(world.tasks), size=world.cfg.base_docs)]
    docs = sample_docs(transitions(world, world.L0), world.cfg.base_docs, rng)
    return to_rows([[*p, *world.ids[doc], EOT] for p, doc in zip(prompts, docs)], [len(p) for p in prompts], R,
                   world.cfg.block_size)


@torch.no_grad()
def base_ll(world: World, small: GPT, split) -> list[float]:
    """The pretrained base's mean log-likelihood per scored token, per task, on a split."""
    x, y = to_rows([split.document(i) for i in range(len(split))], split.prompt_lens, restricted_vocab(world),
                   world.cfg.block_size)
    t, zeros = torch.from_numpy(split.task_ids), torch.zeros(len(world.tasks), dtype=torch.float64)
    nll = zeros.index_add(0, t, nll_restricted(small.eval(), x, y).sum(1).double())  # (D,)
    return (-nll / zeros.index_add(0, t, (y != -1).sum(1).double())).tolist()


def train_base(world: World, folder: Path, n_embd: int = 64, lr: float = 1e-2, batch: int = 32) -> GPT:
    """Pretrain a 2-layer GPT-2 on R columns, save it with all 50257 rows (zero outside R) as a
    Hugging Face folder, and return the small model (whose softmax the saved one equals exactly)."""
    R, threads = restricted_vocab(world), torch.get_num_threads()
    torch.manual_seed(world.cfg.base_seed)
    small = GPT(GPTConfig(block_size=world.cfg.block_size, vocab_size=len(R), n_layer=2, n_head=2, n_embd=n_embd))
    x, y = base_documents(world, R)
    opt = torch.optim.AdamW(small.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=world.cfg.base_steps)  # warm up, anneal
    torch.set_num_threads(1)  # a model this small gains little from threads, and loses much on a busy core
    gen = torch.Generator().manual_seed(world.cfg.base_seed)
    for _ in range(world.cfg.base_steps):
        rows = torch.randint(len(x), (batch,), generator=gen)
        T = int((y[rows] != -1).any(0).nonzero().max()) + 1  # drop the batch's all-padding tail
        loss = nll_restricted(small, x[rows, :T], y[rows, :T]).sum() / (y[rows] != -1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    torch.set_num_threads(threads)
    state = small.state_dict()
    wte = state["transformer.wte.weight"] = state["lm_head.weight"] = torch.zeros(VOCAB, n_embd)  # tied
    wte[torch.from_numpy(R)] = small.transformer.wte.weight.detach()  # (R, C) rows into (VOCAB, C)
    full = GPT(replace(small.config, vocab_size=VOCAB))
    full.load_state_dict(state)
    full.save_pretrained(folder)
    return small


# ---------------------------------------------------------------------------------------------
# The sweep: train.py and eval.py, run as a user runs them

def run(cmd: list[str], threads: int = 1) -> str:
    """Run a command with `threads` threads; return its stdout, or stop showing its output.

    The MALLOC_ settings keep glibc from handing each step's (batch, T, 50257) logits back to the
    OS and page-faulting them in again next step: that halved train.py's speed on our CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return p.stdout


def train_argv(data: Path, base: Path, out: Path, tau: str, a: argparse.Namespace) -> list[str]:
    argv = ["--data", str(data), "--init", str(base), "--out", str(out), "--tau", tau, "--block-size", "64",
            "--batch-size", str(a.batch_size), "--max-epochs", str(a.max_epochs)]
    return argv + ["--targets", a.targets] * bool(a.targets) + ["--lr", a.lr] * bool(a.lr)  # else train.py's


def run_tau(data: Path, base: Path, out: Path, tau: str, a: argparse.Namespace, threads: int = 1) -> dict:
    """train.py, then eval.py --json: eval's numbers plus how training ended and how long it took."""
    started = time.time()
    run([sys.executable, str(ROOT / "train.py"), *train_argv(data, base, out, tau, a)], threads)
    wall = time.time() - started
    result = json.loads(run([sys.executable, str(ROOT / "eval.py"), str(out / "ckpt.pt"), "--json", "--bootstrap", "0"],
                            threads))
    done = json.loads((out / "log.jsonl").read_text().splitlines()[-1])  # "done", or the τ path's "path done"
    return {**result["checkpoints"][0], "name": "path" if "," in tau else "auto" if tau == "auto" else None,
            "epochs_run": 1 + sum(e - 1 for e in done["epochs"].values()) if "epochs" in done  # the path: all its τ
            else done.get("epoch", 1) - 1, "wall": wall}  # the epoch it would have run next


def sweep(data: Path, base: Path, out: Path, a: argparse.Namespace, t0: float) -> list[dict]:
    """Every τ, then auto and the τ path (one command over the same τ), `jobs` runs side by side with one
    thread each when cores are few: ops this small scale badly over threads, and two threads stall whenever
    one core is busy elsewhere."""
    taus = a.taus.split(",") + ["auto"] * a.auto + [a.taus] * a.path
    jobs = max(1, min(a.jobs, len(taus)))

    def one(tau: str) -> dict:
        r = run_tau(data, base, out / ("path" if "," in tau else f"tau{tau}"), tau, a, max(1, (os.cpu_count() or 1) // jobs))
        print(f"tau={tau}: task-avg test ppl {r['overall']['ppl_task_avg']:.3f} ({time.time() - t0:.0f} s)", flush=True)
        return r

    with ThreadPoolExecutor(jobs) as pool:  # the threads only wait for subprocesses
        return list(pool.map(one, taus))


def print_table(rows: list[dict], refs: dict[str, list[float]], bayes: list[float]) -> None:
    """One line per τ, then the references; excess = ppl − Bayes ppl of the smallest and largest task."""
    best = task_avg_ppl(bayes)

    def excess(ll: list[float]) -> str:  # perplexity above the Bayes perplexity, smallest and largest task
        return "".join(f"{math.exp(-ll[d]) - math.exp(-bayes[d]):>+{w}.3f}" for d, w in ((0, 17), (-1, 8)))

    fixed = sorted(r["wall"] for r in rows if r["name"] is None)
    one_run = fixed[len(fixed) // 2]  # the median fixed-τ run
    print(f"\n{'':<22}{'wall':>8}{'best epoch':>12}{'task-avg ppl':>13}{'Bayes ppl':>10}{'excess: smallest':>17}"
          f"{'largest':>8}")
    for r in rows:
        ll, tau = [t["ll"] for t in r["tasks"]], format(float(r["tau"]), ".3g")
        name = f"tau={tau}" if r["name"] is None else f"{r['name']} (tau={tau})"
        print(f"{name:<22}{r['wall'] / one_run:>7.2f}x{r['epoch']:>6} of {r['epochs_run']:<4}"
              f"{task_avg_ppl(ll):>13.3f}{best:>10.3f}" + excess(ll))
    for name, ll in refs.items():
        print(f"{name:<48}{task_avg_ppl(ll):>13.3f}{best:>10.3f}" + excess(ll))
    print(f"wall: relative to the median fixed-tau run ({one_run:.0f} s); the path's best epoch counts its shared first, "
          "and its epochs are every τ's together")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build a known-truth world, pretrain a base on it, sweep τ.")
    p.add_argument("--out", default="out/known_truth", help="everything is written here")
    p.add_argument("--seed", type=int, default=0, help="the world, base and tasks alike")
    p.add_argument("--taus", default="0,1,10,100,1000,inf")
    p.add_argument("--lr", default=None, help="for train.py (default: train.py's own rule)")
    p.add_argument("--targets", default=None, help="for train.py (default: train.py's, c_attn)")
    p.add_argument("--max-epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="τ runs side by side")
    p.add_argument("--quick", action="store_true", help="the test suite's much smaller world")
    p.add_argument("--world", choices=sorted(WORLDS), default="related",
                   help="related: a shared and a task-specific shift; identical: no task-specific shift; unrelated: no "
                        "shared shift")
    p.add_argument("--no-auto", dest="auto", action="store_false", help="do not add a --tau auto run")
    p.add_argument("--no-path", dest="path", action="store_false", help="do not add the τ path (--tau with every τ)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a, t0 = parse_args(argv), time.time()
    world = make_world(replace(QUICK if a.quick else WorldConfig(), seed=a.seed, base_seed=a.seed, **WORLDS[a.world]))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    test = load_split(data := prepare(world, out), "test")
    refs = {"P0: no adaptation": oracle_ll(world, test, task_tables(world, shared=False, own=False)),
            "P0 + S: shared-only oracle": oracle_ll(world, test, task_tables(world, own=False))}
    print(f"{len(world.words)} words; training documents {dict(zip(world.tasks, world.cfg.sizes))}", flush=True)
    refs["the pretrained base"] = base_ll(world, train_base(world, out / "base"), test)
    print(f"base pretrained ({time.time() - t0:.0f} s)", flush=True)
    rows = sweep(data, out / "base", out, a, t0)
    print_table(rows, refs, oracle_ll(world, test, task_tables(world)))
    print(f"\nwall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
