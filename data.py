"""The dataset on disk, as prepare_data.py writes it and train.py, eval.py and sample.py read it.

A document is one text of one task, tokenised with GPT-2's BPE as "[task] " + text + <|endoftext|>; the
"[task]" prompt is input only, never scored. A prepared folder holds

    meta.json                    tasks, docs and tokens per split and task, rows dropped, fingerprint, arguments
    {train,val,test}/            tokens.npy (uint16, the documents one after another), offsets.npy (n_docs + 1,),
                                 task_ids.npy and prompt_lens.npy (n_docs,): document i = tokens[offsets[i]:offsets[i+1]]

Nothing here knows about models."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

FORMAT, ENCODING, SPLITS = "bora-gpt2-data/2", "gpt2", ("train", "val", "test")
ARRAYS = ("tokens", "offsets", "task_ids", "prompt_lens")  # the files of a split, as Split holds them
PROMPT = "[{task}]"  # what the model reads before each text (input only, never scored)
EOT = 50256  # GPT-2's <|endoftext|>: ends every document, and pads batches (padding is never scored)
VOCAB = EOT + 1  # token ids 0 .. EOT
REMAKE = "re-create it with prepare_data.py (python prepare_data.py --help)"


# ---- The document: what the model reads ----

def gpt2_encoding():
    """tiktoken's GPT-2 encoding, or a one-line error saying how to make it available offline."""
    try:
        import tiktoken
        return tiktoken.get_encoding(ENCODING)  # 50257 ids: they fit uint16
    except Exception as e:  # not installed, no network, no cache: all mean the same to the user
        raise ValueError(f"cannot load tiktoken's {ENCODING!r} encoding ({type(e).__name__}); install tiktoken and "
                         "allow network access once, or set TIKTOKEN_CACHE_DIR to a folder of its files") from None


def prompt_ids(enc, task: str | None) -> list[int]:
    return enc.encode_ordinary(PROMPT.format(task=task)) if task is not None else []


def encode_documents(enc, texts: list[str], tasks: list[str | None]) -> list[tuple[list[int], int]]:
    """(ids, prompt_len) of each document as the split files hold it; a task of None: no prompt.

    "[task]" and " " + text are tokenised apart. GPT-2's tokenizer joins a space to the word after it
    and always cuts after "]", so this equals tokenising "[task] text" at once, and prompt_len counts
    exactly "[task]". A literal "<|endoftext|>" in a text stays text; the real one is added here."""
    prompts = {task: prompt_ids(enc, task) for task in set(tasks)}
    bodies = enc.encode_ordinary_batch([text if task is None else " " + text for text, task in zip(texts, tasks)],
                                       num_threads=8)  # tiktoken's threads share the batch
    return [(prompts[task] + body + [enc.eot_token], len(prompts[task])) for task, body in zip(tasks, bodies)]


def encode_document(enc, text: str, task: str | None) -> tuple[list[int], int]:
    return encode_documents(enc, [text], [task])[0]


# ---- A prepared folder ----

@dataclass
class Split:
    tokens: np.ndarray  # (n_tokens,) uint16, memory-mapped
    offsets: np.ndarray  # (n_docs + 1,) int64
    task_ids: np.ndarray  # (n_docs,) int64: index into meta["tasks"]
    prompt_lens: np.ndarray  # (n_docs,) int64: leading tokens that are input only

    def __len__(self) -> int:
        return len(self.task_ids)

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]  # prompt + text + <|endoftext|>


def load_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a prepared folder, with every field that the readers use present."""
    path = Path(data_dir) / "meta.json"
    if not Path(data_dir).is_dir():
        if Path(data_dir).exists():
            raise ValueError(f"{data_dir} is a file, not a dataset folder; prepare_data.py makes one from a CSV or "
                             f"JSONL file (--csv or --jsonl FILE --out FOLDER)")
        raise FileNotFoundError(f"data folder {data_dir} does not exist; create it with prepare_data.py --out {data_dir}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}); {REMAKE}") from None
    if not isinstance(meta, dict) or (meta.get("format"), meta.get("encoding")) != (FORMAT, ENCODING):
        raise ValueError(f"{path} is not a {FORMAT} dataset of the {ENCODING} encoding; {REMAKE}")
    if not (isinstance(meta.get("tasks"), list) and all(isinstance(t, str) for t in meta["tasks"])
            and isinstance(meta.get("task_prompt"), bool) and isinstance(meta.get("fingerprint"), str)):
        raise ValueError(f"{path} lacks its tasks, task_prompt or fingerprint; {REMAKE}")
    try:
        [int(meta["counts"][s][t][k]) for s in SPLITS for t in meta["tasks"] for k in ("docs", "tokens")]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path} lacks the document counts of a split or task; {REMAKE}") from None
    return meta


def fingerprint(folder: Path, tasks: list[str]) -> str:
    """sha256 of the task names and every split array: the dataset's identity (which document went where)."""
    digest = hashlib.sha256(json.dumps(tasks).encode())
    for split in sorted(SPLITS):
        for name in sorted(ARRAYS):
            with open(folder / split / f"{name}.npy", "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def load_split(data_dir: str | os.PathLike, split: str) -> Split:
    """A split's arrays, once the folder's files are checked against meta.json: its fingerprint (what
    prepare_data.py wrote, bit for bit) and what it says of this split (sizes, counts, ranges)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    meta = load_meta(data_dir)
    try:
        if fingerprint(Path(data_dir), meta["tasks"]) != meta["fingerprint"]:
            raise ValueError(f"the files of {data_dir} are not those its meta.json's fingerprint describes: "
                             "changed or damaged")
        s = Split(*(np.load(Path(data_dir, split, f"{name}.npy"), mmap_mode="r" if name == "tokens" else None)
                    for name in ARRAYS))  # the tokens can be large: mapped, not read
        check_split(s, meta, split)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{data_dir}/{split} cannot be read ({e}); {REMAKE}") from None
    return s


def check_split(s: Split, meta: dict, split: str) -> None:
    """What meta.json promises about the split, checked on its arrays (their fingerprint may be right for
    arrays that were wrong when it was taken)."""
    for name, dtype in zip(ARRAYS, ("uint16", "int64", "int64", "int64")):
        if (array := getattr(s, name)).dtype != dtype or array.ndim != 1:
            raise ValueError(f"{name}.npy holds {array.dtype} of shape {array.shape}, not a 1-D {dtype} array")
    if len(s.offsets) != len(s) + 1 or len(s.prompt_lens) != len(s):
        raise ValueError(f"offsets.npy and prompt_lens.npy do not have {len(s) + 1} and {len(s)} entries")
    lengths = np.diff(s.offsets)
    if s.offsets[0] != 0 or (lengths < 1).any() or s.offsets[-1] != len(s.tokens):
        raise ValueError(f"offsets.npy does not cut the {len(s.tokens)} tokens into documents")
    if len(s) and (s.task_ids.min() < 0 or s.task_ids.max() >= len(meta["tasks"]) or s.tokens.max() >= VOCAB
                   or (s.prompt_lens < 0).any() or (s.prompt_lens >= lengths).any()):
        raise ValueError("a task id, token id or prompt length is out of range")
    tasks = meta["tasks"]
    docs, tokens = np.bincount(s.task_ids, minlength=len(tasks)), np.bincount(s.task_ids, lengths, len(tasks))
    if any((docs[i], tokens[i]) != (meta["counts"][split][t]["docs"], meta["counts"][split][t]["tokens"])
           for i, t in enumerate(tasks)):
        raise ValueError("its documents or tokens per task are not meta.json's counts")


def scored_tokens(split: Split, block_size: int) -> np.ndarray:
    """(n_docs,) how many targets of each document make_batch scores: its first block_size + 1 tokens are
    read, and the targets inside the prompt are not scored."""
    read = np.minimum(np.diff(split.offsets), block_size + 1)
    return np.maximum(read - np.maximum(split.prompt_lens, 1), 0)


def require_scored(split: Split, tasks: list[str], block_size: int, name: str) -> None:
    """Refuse a split in which a task has no token to score: its perplexity would be exp(0 / 0), not a number."""
    unscored = np.flatnonzero(np.bincount(split.task_ids, scored_tokens(split, block_size), len(tasks)) == 0)
    if len(unscored) == 0:
        return
    t, mine = unscored[0], split.task_ids == unscored[0]
    if not mine.any():
        raise ValueError(f"task {tasks[t]!r} has no documents in the {name} split; re-create the data with "
                         "prepare_data.py, its --split giving every split a fraction > 0")
    need = int(np.maximum(split.prompt_lens[mine], 1).min())  # a document scores a token once the block holds its prompt
    raise ValueError(f"at block size {block_size} no token of task {tasks[t]!r}'s {name} documents is scored (its "
                     f"task prompt takes {need} tokens); train with --block-size {need} or more")


# ---- Batches: what one forward pass reads ----

def make_batch(split: Split, doc_ids: list[int], block_size: int, device: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents -> inputs x (N, T), targets y (N, T) with -1 where nothing is scored, task ids t (N,).

    x = doc[:-1] and y = doc[1:], cut to block_size and right-padded to the longest row. The target at
    position j is token j+1, so with a prompt of p tokens the targets j < p-1 are prompt: not scored."""
    docs = [split.document(i)[:block_size + 1].astype(np.int64) for i in doc_ids]
    x = np.full((len(docs), max(map(len, docs)) - 1), EOT)
    y = np.full_like(x, -1)
    for row, (i, doc) in enumerate(zip(doc_ids, docs)):
        x[row, :len(doc) - 1], y[row, :len(doc) - 1] = doc[:-1], doc[1:]
        y[row, :max(split.prompt_lens[i] - 1, 0)] = -1
    t = torch.as_tensor(split.task_ids[doc_ids])
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), t.to(device)


def pass_groups(split: Split, doc_ids: list[int], block_size: int, max_tokens: int, max_docs: int = 0
                ) -> list[list[int]]:
    """doc_ids grouped into forward passes of at most max_tokens positions (rows × longest row, padding
    included), so that memory is bounded whatever the lengths, and at most max_docs rows (0: no limit).
    Sorted longest first, so that each pass holds documents of about one length and computes little
    padding; a document longer than max_tokens gets a pass of its own. Any grouping gives the same
    optimiser step and the same evaluation: every term is one document's."""
    rows = np.minimum(np.diff(split.offsets)[doc_ids], block_size + 1) - 1  # positions of each document
    order, start, groups = np.argsort(-rows, kind="stable"), 0, []  # longest first
    while start < len(order):
        n = max(1, max_tokens // max(rows[order[start]], 1))  # the longest left sets the pass's width
        n = min(n, max_docs) if max_docs else n
        groups.append([doc_ids[j] for j in order[start:start + n]])
        start += n
    return groups


def forward_passes(split: Split, groups: list[list[int]], block_size: int, device: str
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One batch (x, y, task_ids) per group of pass_groups, each padded only to its own longest row."""
    for docs in groups:
        yield make_batch(split, docs, block_size, device)


def rank_share(groups: list[list[int]], rank: int, ranks: int) -> list[list[int]]:
    """Rank `rank`'s part of the forward passes one process would make (pass_groups) when `ranks` processes
    share them (torchrun), dealt out in runs of ⌈passes / ranks⌉. With fewer passes than ranks, the last
    ranks get none."""
    run = math.ceil(len(groups) / ranks)
    return groups[rank * run:(rank + 1) * run]
