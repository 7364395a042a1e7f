"""The dataset on disk, as prepare_data.py writes it and train.py, eval.py and sample.py read it.

A document is one text of one task, tokenised with GPT-2's BPE as "[task] " + text + <|endoftext|>; the
"[task]" prompt is input only, never scored. A prepared folder holds

    meta.json                    tasks, docs and tokens per split and task, rows dropped, fingerprint, arguments
    {train,val,test}/            tokens.npy (uint16, the documents one after another), offsets.npy (n_docs + 1,),
                                 task_ids.npy and prompt_lens.npy (n_docs,): document i = tokens[offsets[i]:offsets[i+1]]

Nothing here knows about models."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

FORMAT, ENCODING, SPLITS = "bora-gpt2-data/2", "gpt2", ("train", "val", "test")
PROMPT = "[{task}]"  # what the model reads before each text (input only, never scored)
EOT = 50256  # GPT-2's <|endoftext|>: ends every document, and pads batches (padding is never scored)
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
    path = Path(data_dir) / "meta.json"
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist; create it with prepare_data.py --out {data_dir}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}); {REMAKE}") from None
    if not isinstance(meta, dict) or (meta.get("format"), meta.get("encoding")) != (FORMAT, ENCODING):
        raise ValueError(f"{path} is not a {FORMAT} dataset of the {ENCODING} encoding; {REMAKE}")
    return meta


def load_split(data_dir: str | os.PathLike, split: str) -> Split:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    load_meta(data_dir)
    try:  # the tokens can be large: mapped, not read
        return Split(*(np.load(Path(data_dir, split, f"{name}.npy"), mmap_mode="r" if name == "tokens" else None)
                       for name in ("tokens", "offsets", "task_ids", "prompt_lens")))
    except (OSError, ValueError) as e:
        raise ValueError(f"{data_dir}/{split} cannot be read ({e}); {REMAKE}") from None


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


def forward_passes(split: Split, doc_ids: list[int], block_size: int, max_tokens: int, device: str,
                   max_docs: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The documents in forward passes of at most max_tokens positions (rows × longest row, padding
    included), so that memory is bounded whatever the lengths, and at most max_docs rows (0: no limit).
    Sorted longest first, so that each pass holds documents of about one length and computes little
    padding; a document longer than max_tokens gets a pass of its own. Any grouping gives the same
    optimiser step and the same evaluation: every term is one document's."""
    rows = np.minimum(np.diff(split.offsets)[doc_ids], block_size + 1) - 1  # positions of each document
    order, start = np.argsort(-rows, kind="stable"), 0  # longest first
    while start < len(order):
        n = max(1, max_tokens // max(rows[order[start]], 1))  # the longest left sets the pass's width
        n = min(n, max_docs) if max_docs else n
        yield make_batch(split, [doc_ids[j] for j in order[start:start + n]], block_size, device)
        start += n
