"""Turn a CSV or JSONL corpus into a tokenised multi-task dataset for BoRA on GPT-2.

Every row is one document: one column holds its text, another its task (an emotion, a speaker, ...).
The documents of each task are split train/val/test (50/25/25 by default, seeded), tokenised with
GPT-2's BPE (tiktoken) as `task prompt + text + <|endoftext|>` and written into one folder:

    data/NAME/
      meta.json               tasks (sorted), docs and tokens per split and task, source file, arguments
      train/tokens.npy        (n_tokens,) uint16  the split's documents one after another
      train/offsets.npy       (n_docs + 1,) int64 document i = tokens[offsets[i]:offsets[i + 1]]
      train/task_ids.npy      (n_docs,) int64     index into meta["tasks"]
      train/prompt_lens.npy   (n_docs,) int64     leading prompt tokens of each document (not scored)
      val/...  test/...       the same four arrays

Usage:
    python prepare_data.py --csv spotify_songs.csv --preset spotify          # the lyrics paper's data
    python prepare_data.py --csv talk_of_norway.csv --preset talkofnorway   # the BoRA paper's data
    python prepare_data.py --jsonl notes.jsonl --text-col body --task-col label --out data/notes

The source is read twice, streaming. The first pass notes only each row's task (4 bytes a row), so
tasks can be counted and rows chosen without holding any text; the second pass tokenises the chosen
rows and appends their tokens to the split files. Memory stays small however big the file is.
The folder appears only when complete (it is written beside the target and renamed).

train.py and eval.py read the folder with `load_meta(data_dir)` and `load_split(data_dir, split)`.
"""
from __future__ import annotations

import argparse
import codecs
import csv
import hashlib
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import zlib
from array import array
from collections import Counter
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # tiktoken is imported where it is used: reading a prepared folder does not need it
    import tiktoken

FORMAT = "bora-gpt2-data/1"
ENCODING = "gpt2"
SPLITS = ("train", "val", "test")
PROMPT_FORMAT = "[{task}] "  # what the model reads before each text, e.g. "[sadness] "
_REMAKE = "re-create it with prepare_data.py (python prepare_data.py --help)"


# ----------------------------------------------------------------------------------------------
# Reading a prepared folder (used by train.py and eval.py)


@dataclass
class Split:
    """One split of a prepared dataset. `tokens` is memory-mapped; the other arrays are small."""

    tokens: np.ndarray  # (n_tokens,) uint16
    offsets: np.ndarray  # (n_docs + 1,) int64: document i = tokens[offsets[i]:offsets[i + 1]]
    task_ids: np.ndarray  # (n_docs,) int64: index into meta["tasks"]
    prompt_lens: np.ndarray  # (n_docs,) int64: leading tokens of each document that are input only

    def __len__(self) -> int:
        return len(self.task_ids)

    def document(self, i: int) -> np.ndarray:
        """Token ids of document i (prompt + text + <|endoftext|>), shape (offsets[i+1] - offsets[i],)."""
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range: the split has {len(self)} documents")
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def load_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a folder written by prepare_data.py, checked for format and encoding."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist; create it with prepare_data.py --out {folder}")
    path = folder / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing, so {folder} is not a prepared dataset; {_REMAKE}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} cannot be read ({e}); {_REMAKE}") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise ValueError(f"{path} has format {found!r}, expected {FORMAT!r}; {_REMAKE}")
    if meta.get("encoding") != ENCODING:
        raise ValueError(f"{path} has encoding {meta.get('encoding')!r}, expected {ENCODING!r}; {_REMAKE}")
    return meta


def load_split(data_dir: str | os.PathLike, split: str) -> Split:
    """The arrays of one split ("train", "val" or "test"), checked against each other and meta.json."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    meta = load_meta(data_dir)
    folder = Path(data_dir) / split
    arrays = {}
    for name in ("tokens", "offsets", "task_ids", "prompt_lens"):
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; {_REMAKE}")
        try:  # tokens can be large: map them instead of reading them
            arrays[name] = np.load(path, mmap_mode="r" if name == "tokens" else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path} is not a readable .npy file ({e}); {_REMAKE}") from None
    data = Split(**arrays)
    problem = _split_problem(data, num_tasks=len(meta["tasks"]))
    if problem:
        raise ValueError(f"{folder} is inconsistent ({problem}); {_REMAKE}")
    return data


def _split_problem(data: Split, num_tasks: int) -> str | None:
    """What is wrong with a split's arrays, or None."""
    n = len(data.task_ids)
    if data.tokens.dtype != np.uint16 or data.tokens.ndim != 1:
        return f"tokens are {data.tokens.dtype} {data.tokens.shape}, expected uint16 (n_tokens,)"
    for name in ("offsets", "task_ids", "prompt_lens"):
        if getattr(data, name).dtype != np.int64:
            return f"{name} are {getattr(data, name).dtype}, expected int64"
    if data.offsets.shape != (n + 1,) or data.prompt_lens.shape != (n,):
        return f"{n} task ids but {len(data.offsets)} offsets and {len(data.prompt_lens)} prompt lengths"
    lengths = np.diff(data.offsets)  # (n,)
    if data.offsets[0] != 0 or data.offsets[-1] != len(data.tokens) or (lengths < 0).any():
        return "offsets do not cover the tokens in order"
    if n and (data.task_ids.min() < 0 or data.task_ids.max() >= num_tasks):
        return f"task ids outside 0..{num_tasks - 1}"
    if (data.prompt_lens < 0).any() or (data.prompt_lens >= np.maximum(lengths, 1)).any():
        return "a prompt is as long as its document"
    return None


# ----------------------------------------------------------------------------------------------
# Settings: argparse fills a Config; the presets only change its defaults.


@dataclass
class Config:
    source: str  # the CSV or JSONL file
    source_format: str  # "csv" or "jsonl"
    out: str  # the folder to write
    preset: str | None = None
    text_col: str = "text"
    task_col: str = "task"
    task_prompt: bool = True  # prefix each document with "[task] "
    split: tuple[float, float, float] = (0.5, 0.25, 0.25)  # train, val, test fractions of each task
    seed: int = 42
    min_chars: int = 0  # drop texts shorter than this
    drop_small_tasks: bool = False  # drop a task too small to split instead of stopping
    force: bool = False  # replace an existing output folder
    tasks: list[str] | None = None  # no preset: keep only these tasks
    max_docs_per_task: int | None = None  # no preset: sample at most this many documents per task
    min_task_size: int | None = None  # spotify: keep tasks with at least this many documents ...
    total: int | None = None  # spotify: ... then sample this many documents in all, keeping the ratios
    num_tasks: int | None = None  # talkofnorway: the first this many tasks alphabetically ...
    min_docs: int | None = None  # talkofnorway: ... among those with more than min_docs ...
    max_docs: int | None = None  # talkofnorway: ... and fewer than max_docs documents


PRESETS: dict[str, dict] = {
    # The lyrics paper: Kaggle's "500k+ Spotify songs with lyrics, emotions & more". Emotions with at
    # least 5000 songs in the whole file, then 4933 songs sampled keeping the emotions' ratio
    # (the paper's set runs from 50 `surprise` to 1869 `joy` songs).
    "spotify": dict(text_col="text", task_col="emotion", min_task_size=5000, total=4933),
    # The BoRA paper: Talk of Norway, one task per speaker. As the paper's code did (its Table A.1
    # shows the result): speeches of at least 40 characters, speakers with more than 200 and fewer
    # than 1000 of them, named in lower case without dots, the first 25 names alphabetically
    # (abid q raja ... borghild tenden), hence 110-477 training speeches per speaker.
    "talkofnorway": dict(text_col="text", task_col="rep_name", min_chars=40, min_docs=200, max_docs=1000, num_tasks=25),
}

# Options that only make sense in one mode; giving them in another is an error, not silently ignored.
_MODE_OPTIONS = {
    None: ("tasks", "max_docs_per_task"),
    "spotify": ("min_task_size", "total"),
    "talkofnorway": ("num_tasks", "min_docs", "max_docs"),
}


def task_name(raw: str, preset: str | None) -> str:
    """The task name a raw task-column value stands for ("Abid Q. Raja" -> "abid q raja" for Talk of Norway)."""
    if preset == "talkofnorway":
        return raw.strip().lower().replace(".", "")
    return raw.strip()


# ----------------------------------------------------------------------------------------------
# Streaming the source file


class SourceReader:
    """Streams (text, task) value pairs from a CSV or JSONL file, one per non-blank row, in file order.

    A value missing from a row comes back as None. Invalid UTF-8 is replaced by U+FFFD and counted
    (self.invalid_utf8); CSV rows with fewer fields than the header are skipped and counted
    (self.short_rows). Reading the same file twice yields the same rows, which the two passes rely on.
    """

    def __init__(self, path: Path, source_format: str, text_col: str, task_col: str):
        self.path, self.format, self.columns = path, source_format, (text_col, task_col)
        self.invalid_utf8 = 0
        self.short_rows = 0
        # A decoding error handler of our own, so that each replacement is counted where it happens
        # (counting U+FFFD afterwards would also count the ones the file really contains).
        self._errors = f"prepare-data-count-{id(self)}"
        codecs.register_error(self._errors, self._replace_and_count)

    def _replace_and_count(self, err: UnicodeDecodeError) -> tuple[str, int]:
        self.invalid_utf8 += 1
        return "\ufffd", err.end

    def rows(self) -> Iterator[tuple[str | None, str | None]]:
        return self._csv_rows() if self.format == "csv" else self._jsonl_rows()

    def _missing_column(self, col: str, found: Sequence[str]) -> ValueError:
        which = "text" if col == self.columns[0] else "task"
        hint = " (is the file comma-separated?)" if len(found) == 1 and any(c in found[0] for c in ";\t|") else ""
        return ValueError(
            f"{self.path} has no {which} column {col!r}; its columns are: {_preview(found)}{hint}; "
            f"choose one with --{which}-col"
        )

    def _csv_rows(self) -> Iterator[tuple[str | None, str | None]]:
        # Real lyrics and speeches exceed the csv module's default 128 KiB field limit.
        csv.field_size_limit(2**31 - 1)
        # newline="" lets the csv module see newlines inside quoted fields; utf-8-sig drops a BOM.
        with open(self.path, encoding="utf-8-sig", errors=self._errors, newline="") as f:
            reader = csv.reader(f)
            try:
                header = [name.strip() for name in next(reader, [])]
                for col in self.columns:
                    if col not in header:
                        raise self._missing_column(col, header)
                text_i, task_i = (header.index(col) for col in self.columns)
                for row in reader:
                    if not row:  # a blank line
                        continue
                    if len(row) <= max(text_i, task_i):
                        self.short_rows += 1
                        continue
                    yield row[text_i], row[task_i]
            except csv.Error as e:
                raise ValueError(f"{self.path}, line {reader.line_num}: not valid CSV ({e})") from None

    def _jsonl_rows(self) -> Iterator[tuple[str | None, str | None]]:
        # Bytes split on b"\n" only: JSON allows a stray "\r" where text-mode line splitting would cut.
        with open(self.path, "rb") as f:
            checked_keys = False
            for line_no, raw in enumerate(f, start=1):
                line = raw.decode("utf-8", errors=self._errors)
                if line_no == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark
                if not line.strip():
                    continue
                where = f"{self.path}, line {line_no}"
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    msg = getattr(e, "msg", str(e))
                    raise ValueError(f"{where}: not valid JSON ({msg}); each line must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{where}: expected a JSON object, found {type(obj).__name__}")
                if not checked_keys:  # the first object plays the part of a CSV header
                    for col in self.columns:
                        if col not in obj:
                            raise self._missing_column(col, list(obj))
                    checked_keys = True
                yield _json_text(obj.get(self.columns[0]), where), _json_text(obj.get(self.columns[1]), where)


def _json_text(value: object, where: str) -> str | None:
    """A JSON value as text: null and NaN are missing, numbers and booleans are spelled out."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise ValueError(f"{where}: expected text, found a JSON {type(value).__name__}")


def _is_blank(value: str | None) -> bool:
    """True for missing values: None, "", whitespace, and "nan" as pandas writes a missing cell."""
    if value is None or value == "" or value.isspace():  # isspace() stops at the first letter: cheap on long texts
        return True
    return len(value) < 16 and value.strip().lower() == "nan"


def _preview(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n[:40]) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "(none)"


def check_source(path: Path) -> int:
    """The source's size in bytes, after checking that it is a readable, non-empty text file."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if not head:
        raise ValueError(f"{path} is empty")
    if b"\0" in head:  # never in UTF-8 text; always in binary, compressed or UTF-16 files
        raise ValueError(f"{path} is not a UTF-8 text file (it contains NUL bytes: binary, compressed or UTF-16?)")
    return path.stat().st_size


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Pass 1: which row belongs to which task


@dataclass
class RowIndex:
    names: list[str]  # task names in order of first appearance
    row_task: np.ndarray  # (n_rows,) int32: index into names, -1 for a dropped row
    rows_read: int  # n_rows plus the rows skipped for having too few fields
    dropped: dict[str, int]  # reason -> number of rows
    invalid_utf8: int  # invalid UTF-8 sequences replaced by U+FFFD

    def counts(self) -> dict[str, int]:
        """Usable documents per task."""
        per_task = np.bincount(self.row_task[self.row_task >= 0], minlength=len(self.names))
        return dict(zip(self.names, per_task.tolist()))


def index_rows(cfg: Config) -> RowIndex:
    """Read the source once, keeping only the task of each usable row (4 bytes a row, no text)."""
    reader = SourceReader(Path(cfg.source), cfg.source_format, cfg.text_col, cfg.task_col)
    ids: dict[str, int] = {}
    row_task = array("i")
    dropped: Counter[str] = Counter()
    for text, task in reader.rows():
        if _is_blank(text):
            reason = "empty text"
        elif _is_blank(task):
            reason = "no task"
        elif len(text) < cfg.min_chars:
            reason = f"text shorter than {cfg.min_chars} characters"
        else:
            row_task.append(ids.setdefault(task_name(task, cfg.preset), len(ids)))
            continue
        dropped[reason] += 1
        row_task.append(-1)
    if reader.short_rows:
        dropped["fewer fields than the header"] = reader.short_rows
    row_task = np.array(row_task, dtype=np.int32)
    return RowIndex(list(ids), row_task, len(row_task) + reader.short_rows, dict(dropped), reader.invalid_utf8)


# ----------------------------------------------------------------------------------------------
# Choosing tasks, documents and splits


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to `weights` that add up to `total` (the largest remainder method).

    Each share gets the floor of its exact quota total·w/Σw; the units left over go to the largest
    fractional parts, ties to the earlier weight. Exact fractions, so no rounding error decides.
    """
    whole = sum(Fraction(w) for w in weights)
    quotas = [Fraction(w) * total / whole for w in weights]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (shares[i] - quotas[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def min_docs_to_split(fractions: Sequence[float]) -> int:
    """The fewest documents a task needs so that every split with a positive fraction gets one."""
    n = 1
    while any(size == 0 for size, f in zip(largest_remainder(n, fractions), fractions) if f > 0):
        n += 1
    return n


def choose_tasks(counts: dict[str, int], cfg: Config) -> dict[str, int]:
    """{task: number of documents to use} for the tasks this preset (or --tasks) selects."""
    col = cfg.task_col
    if cfg.preset == "spotify":
        kept = {t: n for t, n in sorted(counts.items()) if n >= cfg.min_task_size}
        if not kept:
            biggest = max(counts.items(), key=lambda item: item[1], default=("none", 0))
            raise ValueError(
                f"no {col!r} value has at least {cfg.min_task_size} documents (the largest, {biggest[0]!r}, has "
                f"{biggest[1]}); is this the Spotify lyrics file? lower the threshold with --min-task-size"
            )
        if cfg.total > sum(kept.values()):
            raise ValueError(f"--total {cfg.total} is more than the {sum(kept.values())} documents of the kept tasks")
        return dict(zip(kept, largest_remainder(cfg.total, list(kept.values()))))
    if cfg.preset == "talkofnorway":
        eligible = sorted(t for t, n in counts.items() if cfg.min_docs < n < cfg.max_docs)
        if not eligible:
            raise ValueError(
                f"no {col!r} value has more than {cfg.min_docs} and fewer than {cfg.max_docs} texts of at least "
                f"{cfg.min_chars} characters; is this the Talk of Norway file? adjust --min-docs/--max-docs"
            )
        if len(eligible) < cfg.num_tasks:
            warn(f"only {len(eligible)} tasks have between {cfg.min_docs} and {cfg.max_docs} documents; using them all")
        return {t: counts[t] for t in eligible[: cfg.num_tasks]}
    names = sorted(counts) if cfg.tasks is None else cfg.tasks
    unknown = [t for t in names if t not in counts]
    if unknown:
        known = _preview(sorted(counts))
        raise ValueError(f"no usable documents of task(s) {_preview(unknown)} in {col!r}; its tasks are: {known}")
    cap = cfg.max_docs_per_task
    return {t: counts[t] if cap is None else min(cap, counts[t]) for t in names}


def drop_unsplittable(take: dict[str, int], cfg: Config) -> dict[str, int]:
    """Stop on (or, with --drop-small-tasks, leave out) tasks with too few documents to split."""
    need = min_docs_to_split(cfg.split)
    small = {t: n for t, n in take.items() if n < need}
    how = "/".join(f"{f:g}" for f in cfg.split)
    if small and not cfg.drop_small_tasks:
        listed = ", ".join(f"{t!r} ({n})" for t, n in list(small.items())[:5])
        raise ValueError(
            f"task(s) {listed} have fewer than the {need} documents needed to split {how}; "
            f"add --drop-small-tasks to leave them out"
        )
    for t, n in small.items():
        warn(f"dropped task {t!r}: {n} document(s), fewer than the {need} needed to split {how}")
    kept = {t: n for t, n in take.items() if n >= need}
    if not kept:
        raise ValueError(f"no task has the {need} documents needed to split {how}")
    return kept


def assign_splits(index: RowIndex, take: dict[str, int], fractions: Sequence[float], seed: int) -> np.ndarray:
    """(n_rows,) int8: the split of every chosen row (0 train, 1 val, 2 test), -1 for the others.

    Each task has its own generator, seeded from --seed and the task's name, so a task's documents and
    splits do not depend on which other tasks are chosen.
    """
    row_split = np.full(len(index.row_task), -1, dtype=np.int8)
    # Rows grouped by task without a pass over all rows per task: a stable sort, then the group ends.
    order = np.argsort(index.row_task, kind="stable")  # dropped rows (-1) first, then task 0, task 1, ...
    ends = np.cumsum(np.bincount(index.row_task + 1, minlength=len(index.names) + 1))  # (num_tasks + 1,)
    position = {name: i for i, name in enumerate(index.names)}
    for name, n_docs in take.items():
        t = position[name]
        rows = order[ends[t] : ends[t + 1]]  # this task's rows, in file order
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        chosen = rng.permutation(rows)[:n_docs]  # a uniformly random subset, in random order
        bounds = np.cumsum([0, *largest_remainder(n_docs, fractions)])
        for s in range(len(SPLITS)):
            row_split[chosen[bounds[s] : bounds[s + 1]]] = s
    return row_split


# ----------------------------------------------------------------------------------------------
# Pass 2: tokenise the chosen rows and write the split arrays


def gpt2_encoding() -> "tiktoken.Encoding":
    """tiktoken's GPT-2 encoding, or a one-line error saying how to make it available offline."""
    try:
        import tiktoken

        enc = tiktoken.get_encoding(ENCODING)
    except Exception as e:  # import error, no network, no cache: all mean the same to the user
        first_line = (str(e).splitlines() or [""])[0]
        raise ValueError(
            f"cannot load tiktoken's {ENCODING!r} encoding ({type(e).__name__}: {first_line}); install tiktoken "
            f"and allow network access once, or set TIKTOKEN_CACHE_DIR to a folder holding its files"
        ) from None
    assert enc.n_vocab <= 2**16, "token ids must fit uint16"
    return enc


def encode_prompt(enc: "tiktoken.Encoding", task: str) -> list[int]:
    """The prompt tokens of a task: "[sadness]".

    The prompt's trailing space is tokenised with the text (" " + text), because GPT-2's tokenizer
    joins a space to the word after it; the result equals encoding prompt + text in one go, since
    the tokenizer always cuts after "]" when a space follows. So prompt_len counts exactly "[task]".
    """
    return enc.encode_ordinary(PROMPT_FORMAT.format(task=task).rstrip(" "))


def body_text(text: str, task_prompt: bool) -> str:
    """What is tokenised after the prompt: the text, led by the prompt's space (see encode_prompt)."""
    return " " + text if task_prompt else text


def encode_document(enc: "tiktoken.Encoding", text: str, task: str | None) -> tuple[list[int], int]:
    """(ids, prompt_len) of one document exactly as write_splits stores it; task=None: no prompt.

    encode_ordinary reads a literal "<|endoftext|>" in a text as text; the real end-of-text id is added here.
    """
    prompt = encode_prompt(enc, task) if task is not None else []
    return prompt + enc.encode_ordinary(body_text(text, task is not None)) + [enc.eot_token], len(prompt)


class SplitWriter:
    """Appends one split's documents to a raw token file; the per-document arrays stay in memory."""

    def __init__(self, folder: Path, num_tasks: int):
        folder.mkdir()
        self.folder = folder
        self.raw = open(folder / "tokens.raw", "wb")
        self.offsets = array("q", [0])
        self.task_ids = array("q")
        self.prompt_lens = array("q")
        self.docs = np.zeros(num_tasks, dtype=np.int64)  # (num_tasks,)
        self.tokens = np.zeros(num_tasks, dtype=np.int64)  # (num_tasks,)

    def add(self, ids: list[int], task: int, prompt_len: int) -> None:
        doc = np.array(ids, dtype="<u2")  # (len,)
        self.raw.write(doc.tobytes())
        self.offsets.append(self.offsets[-1] + len(doc))
        self.task_ids.append(task)
        self.prompt_lens.append(prompt_len)
        self.docs[task] += 1
        self.tokens[task] += len(doc)

    def finish(self) -> None:
        """Write the four .npy files. tokens.npy = an .npy header + the raw file, copied in chunks."""
        self.raw.close()
        raw_path = self.folder / "tokens.raw"
        header = {"descr": "<u2", "fortran_order": False, "shape": (self.offsets[-1],)}
        with open(self.folder / "tokens.npy", "wb") as out, open(raw_path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, 1 << 20)
        raw_path.unlink()
        for name in ("offsets", "task_ids", "prompt_lens"):
            np.save(self.folder / f"{name}.npy", np.array(getattr(self, name), dtype=np.int64))

    def close(self) -> None:
        self.raw.close()


_BATCH_DOCS = 1024  # documents tokenised together (threads inside tiktoken)
_THREADS = min(8, os.cpu_count() or 1)


def write_splits(
    cfg: Config, index: RowIndex, row_split: np.ndarray, tasks: list[str], folder: Path, enc: "tiktoken.Encoding"
) -> list[SplitWriter]:
    """Read the source again and append each chosen row, tokenised, to its split's files in `folder`."""
    # Each row's task id in the output (its position in the sorted `tasks`), -1 where unused;
    # the extra -1 at the end is what row_task == -1 picks.
    position = {name: i for i, name in enumerate(tasks)}
    new_id = np.array([position.get(name, -1) for name in index.names] + [-1])  # (n_pass1_tasks + 1,)
    split_of, task_of = row_split.tolist(), new_id[index.row_task].tolist()  # lists: fast per-row lookups
    prompts = [encode_prompt(enc, t) if cfg.task_prompt else [] for t in tasks]
    eot = [enc.eot_token]
    writers = [SplitWriter(folder / name, len(tasks)) for name in SPLITS]
    batch: list[tuple[int, int, str]] = []  # (split, task, text)

    def flush() -> None:
        # the batched form of encode_document: tiktoken's threads tokenise many documents at once
        texts = [body_text(text, cfg.task_prompt) for _, _, text in batch]
        for (s, t, _), body in zip(batch, enc.encode_ordinary_batch(texts, num_threads=_THREADS)):
            writers[s].add(prompts[t] + body + eot, t, len(prompts[t]))
        batch.clear()

    changed = ValueError(f"{cfg.source} changed while it was being read; run again")
    reader = SourceReader(Path(cfg.source), cfg.source_format, cfg.text_col, cfg.task_col)
    try:
        n_rows = 0
        for i, (text, _) in enumerate(reader.rows()):
            n_rows += 1
            if i >= len(split_of):
                raise changed
            if split_of[i] >= 0:
                if _is_blank(text):
                    raise changed
                batch.append((split_of[i], task_of[i], text))
                if len(batch) >= _BATCH_DOCS:
                    flush()
        flush()
        if n_rows != len(split_of):
            raise changed
        for w in writers:
            w.finish()
    finally:
        for w in writers:
            w.close()
    return writers


# ----------------------------------------------------------------------------------------------
# The output folder: written beside the target, renamed into place only when complete


def check_out_folder(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise ValueError(f"{out} already exists; add --force to replace it")
    # --force replaces datasets, never an arbitrary folder given by mistake (say, --out .)
    if not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file()):
        raise ValueError(f"refusing to replace {out}: it is not a folder written by prepare_data.py (no meta.json)")


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder `tmp` to `out`; an old `out` is removed only after the new one is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    check_out_folder(out, force)  # again: it may have appeared while we were working
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.rename(out, old / "replaced")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "replaced", out)
        old.rmdir()
        raise
    shutil.rmtree(old)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def prepare(cfg: Config) -> dict:
    """Read, select, split, tokenise and write the dataset folder; return its meta.json contents."""
    source, out = Path(cfg.source), Path(cfg.out)
    check_out_folder(out, cfg.force)  # fail before reading a large file, not after
    size = check_source(source)
    enc = gpt2_encoding()

    index = index_rows(cfg)  # pass 1
    counts = index.counts()
    print(f"read {index.rows_read:,} rows of {source.name}: {sum(counts.values()):,} usable, {len(counts):,} tasks")
    if index.invalid_utf8:
        warn(f"replaced {index.invalid_utf8} invalid UTF-8 sequence(s) with U+FFFD")
    for reason, n in index.dropped.items():
        warn(f"dropped {n} row(s): {reason}")
    if not counts:
        raise ValueError(f"{source} has no usable rows (texts in {cfg.text_col!r}, tasks in {cfg.task_col!r})")

    take = drop_unsplittable(choose_tasks(counts, cfg), cfg)
    tasks = sorted(take)
    row_split = assign_splits(index, take, cfg.split, cfg.seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"  # hidden, beside the target
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stay on the published folder
    try:
        writers = write_splits(cfg, index, row_split, tasks, tmp, enc)  # pass 2
        meta = {
            "format": FORMAT,
            "tasks": tasks,
            "encoding": ENCODING,
            "task_prompt": cfg.task_prompt,
            "prompt_format": PROMPT_FORMAT if cfg.task_prompt else "",
            "counts": {
                split: {t: {"docs": int(w.docs[i]), "tokens": int(w.tokens[i])} for i, t in enumerate(tasks)}
                for split, w in zip(SPLITS, writers)
            },
            "source": {"name": source.name, "size": size, "sha256": sha256_of(source)},
            "rows": {
                "read": index.rows_read,
                "usable": sum(counts.values()),
                "dropped": index.dropped,
                "invalid_utf8_replaced": index.invalid_utf8,
            },
            "args": asdict(cfg),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        publish(tmp, out, cfg.force)
    except BaseException:  # Ctrl-C included: never leave a half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(format_table(meta))
    print(f"wrote {out}")
    return meta


def format_table(meta: dict) -> str:
    """Documents and tokens per task and split, with a total row."""
    tasks, counts = meta["tasks"], meta["counts"]
    width = max(len(t) for t in [*tasks, "task", "all"])
    lines = [f"{'task':<{width}}" + "".join(f"{s + ' docs':>12}{s + ' tokens':>14}" for s in SPLITS)]
    for t in tasks:
        cells = "".join(f"{counts[s][t]['docs']:>12,}{counts[s][t]['tokens']:>14,}" for s in SPLITS)
        lines.append(f"{t:<{width}}" + cells)
    total = {s: [sum(c[k] for c in counts[s].values()) for k in ("docs", "tokens")] for s in SPLITS}
    lines.append(f"{'all':<{width}}" + "".join(f"{total[s][0]:>12,}{total[s][1]:>14,}" for s in SPLITS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", metavar="PATH", help="a CSV file with a header row")
    source.add_argument("--jsonl", metavar="PATH", help="a file with one JSON object per line")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a paper's columns and task selection")
    p.add_argument("--text-col", metavar="COL", help="column with the document text (default: text, or the preset's)")
    p.add_argument("--task-col", metavar="COL", help="column with the task name (default: task, or the preset's)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: data/<preset or file name>)")
    p.add_argument("--split", metavar="F,F,F", default="0.5,0.25,0.25", help="train,val,test fractions per task")
    p.add_argument("--seed", metavar="N", type=_non_negative_int, default=42, help="seed of sampling and splits")
    p.add_argument("--no-task-prompt", action="store_true", help='do not prefix documents with "[task] "')
    p.add_argument("--min-chars", metavar="N", type=_non_negative_int, help="drop shorter texts (talkofnorway: 40)")
    p.add_argument("--drop-small-tasks", action="store_true", help="leave out tasks too small to split, do not stop")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    g = p.add_argument_group("without a preset")
    g.add_argument("--tasks", metavar="A,B,...", help="comma-separated task names to keep (default: every task)")
    g.add_argument("--max-docs-per-task", metavar="N", type=_positive_int, help="sample at most N documents per task")
    g = p.add_argument_group("--preset spotify")
    g.add_argument("--min-task-size", metavar="N", type=_positive_int, help="keep tasks with >= N documents (5000)")
    g.add_argument("--total", metavar="N", type=_positive_int, help="then sample N in all, keeping their ratio (4933)")
    g = p.add_argument_group("--preset talkofnorway")
    g.add_argument("--num-tasks", metavar="N", type=_positive_int, help="keep the first N tasks by name (25) ...")
    g.add_argument("--min-docs", metavar="N", type=_non_negative_int, help="... of those with > N documents (200)")
    g.add_argument("--max-docs", metavar="N", type=_positive_int, help="... and < N documents (1000)")
    return p


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(x) for x in text.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or any(not math.isfinite(f) or f < 0 for f in fractions) or fractions[0] <= 0:
        raise ValueError(f"--split {text!r}: need three fractions train,val,test >= 0, train > 0, like 0.5,0.25,0.25")
    if abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"--split {text!r}: the fractions add up to {sum(fractions):g}, not 1")
    return fractions


def config_from_args(args: argparse.Namespace) -> Config:
    """A Config from parsed arguments: the preset fills what was not given, misplaced options are errors."""
    for mode, options in _MODE_OPTIONS.items():
        for option in options:
            if getattr(args, option) is not None and args.preset != mode:
                where = f"--preset {mode}" if mode else "runs without --preset"
                raise ValueError(f"--{option.replace('_', '-')} applies only to {where}")
    source = args.csv if args.csv is not None else args.jsonl
    # Precedence: an option given on the command line, else the preset's value, else Config's default.
    given = {
        name: getattr(args, name)
        for name in ("preset", "text_col", "task_col", "min_chars", "max_docs_per_task",
                     "min_task_size", "total", "num_tasks", "min_docs", "max_docs")
        if getattr(args, name) is not None
    }
    cfg = Config(
        **{**PRESETS.get(args.preset, {}), **given},
        source=source,
        source_format="csv" if args.csv is not None else "jsonl",
        out=args.out or str(Path("data") / (args.preset or Path(source).stem)),
        split=parse_split(args.split),
        seed=args.seed,
        task_prompt=not args.no_task_prompt,
        drop_small_tasks=args.drop_small_tasks,
        force=args.force,
    )
    if args.tasks is not None:
        cfg.tasks = [task_name(t, None) for t in args.tasks.split(",") if t.strip()]
        if not cfg.tasks:
            raise ValueError("--tasks is empty; give comma-separated task names")
    if cfg.preset == "talkofnorway" and cfg.min_docs >= cfg.max_docs - 1:
        raise ValueError(f"--min-docs {cfg.min_docs} and --max-docs {cfg.max_docs} leave no task size between them")
    return cfg


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        prepare(config_from_args(args))
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: no output folder was written")


if __name__ == "__main__":
    main()
