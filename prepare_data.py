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


# ---- Reading a prepared folder (used by train.py and eval.py) ----


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
    for key, expected in (("format", FORMAT), ("encoding", ENCODING)):
        found = meta.get(key) if isinstance(meta, dict) else None
        if found != expected:
            raise ValueError(f"{path} has {key} {found!r}, expected {expected!r}; {_REMAKE}")
    return meta


def load_split(data_dir: str | os.PathLike, split: str) -> Split:
    """The arrays of one split ("train", "val" or "test"), with a check of their types and lengths."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    load_meta(data_dir)
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
    s, n = Split(**arrays), len(arrays["task_ids"])
    ok = s.tokens.dtype == np.uint16 and all(a.dtype == np.int64 for a in (s.offsets, s.task_ids, s.prompt_lens))
    if not ok or s.offsets.shape != (n + 1,) or s.prompt_lens.shape != (n,) or s.offsets[-1] != len(s.tokens):
        raise ValueError(f"{folder} is inconsistent (its arrays' types or lengths do not match); {_REMAKE}")
    return s


# ---- Settings: argparse fills a Config; the presets only change its defaults ----


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


# ---- Streaming the source file ----


def check_source(path: Path) -> int:
    """The source's size in bytes, after checking that it is a non-empty text file."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    with open(path, "rb") as f:  # an unreadable file raises an OSError naming it and the reason
        head = f.read(1 << 16)
    if not head:
        raise ValueError(f"{path} is empty")
    if b"\0" in head:  # never in UTF-8 text; always in binary, compressed or UTF-16 files
        raise ValueError(f"{path} is not a UTF-8 text file (it contains NUL bytes: binary, compressed or UTF-16?)")
    return path.stat().st_size


def read_rows(cfg: Config, stats: Counter) -> Iterator[tuple[str | None, str | None]]:
    """(text, task) of every non-blank row of the source, in file order; None for a missing value.

    Invalid UTF-8 becomes U+FFFD, counted in stats["invalid_utf8"] by a decoding error handler of
    our own (counting U+FFFD afterwards would also count the ones the file really contains). CSV rows
    with fewer fields than the header are skipped and counted in stats["short_rows"].
    """

    def replace_and_count(err: UnicodeDecodeError) -> tuple[str, int]:
        stats["invalid_utf8"] += 1
        return "\ufffd", err.end

    codecs.register_error("prepare_data.count", replace_and_count)
    read = _csv_rows if cfg.source_format == "csv" else _jsonl_rows
    return read(Path(cfg.source), (cfg.text_col, cfg.task_col), stats)


def _csv_rows(path: Path, columns: tuple[str, str], stats: Counter) -> Iterator[tuple[str, str]]:
    csv.field_size_limit(2**31 - 1)  # real lyrics and speeches exceed the default 128 KiB field limit
    # newline="" lets the csv module see newlines inside quoted fields; utf-8-sig drops a BOM.
    with open(path, encoding="utf-8-sig", errors="prepare_data.count", newline="") as f:
        reader = csv.reader(f)
        try:
            header = [name.strip() for name in next(reader, [])]
            _check_columns(path, columns, header)
            text_i, task_i = header.index(columns[0]), header.index(columns[1])
            for row in reader:
                if len(row) > max(text_i, task_i):
                    yield row[text_i], row[task_i]
                elif row:  # not a blank line, a short one
                    stats["short_rows"] += 1
        except csv.Error as e:
            raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None


def _jsonl_rows(path: Path, columns: tuple[str, str], stats: Counter) -> Iterator[tuple[str | None, str | None]]:
    # Bytes split on b"\n" only: JSON allows a stray "\r" where text-mode line splitting would cut.
    with open(path, "rb") as f:
        first = True
        for line_no, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", errors="prepare_data.count").removeprefix("\ufeff")  # and a BOM
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                msg = getattr(e, "msg", e)
                raise ValueError(f"{where}: not valid JSON ({msg}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, found {type(obj).__name__}")
            if first:  # the first object plays the part of a CSV header
                _check_columns(path, columns, list(obj))
                first = False
            text, task = (obj.get(col) for col in columns)
            for value in (text, task):
                if isinstance(value, (list, dict)):
                    raise ValueError(f"{where}: expected text, found a JSON {type(value).__name__}")
            # null and NaN are missing values; numbers and booleans are spelled out
            yield tuple(None if v is None or v != v else str(v) for v in (text, task))


def _check_columns(path: Path, columns: tuple[str, str], found: list[str]) -> None:
    for which, col in zip(("text", "task"), columns):
        if col not in found:
            hint = " (is the file comma-separated?)" if len(found) == 1 and any(c in found[0] for c in ";\t|") else ""
            raise ValueError(f"{path} has no {which} column {col!r}; its columns are: {_preview(found)}{hint}; "
                             f"choose one with --{which}-col")


def _preview(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n[:40]) for n in names[:limit]) or "(none)"
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _is_blank(value: str | None) -> bool:
    """True for missing values: None, "", whitespace, and "nan" as pandas writes a missing cell."""
    if value is None or value == "" or value.isspace():  # isspace() stops at the first letter: cheap on long texts
        return True
    return len(value) < 16 and value.strip().lower() == "nan"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- Pass 1: which row belongs to which task ----


def index_rows(cfg: Config) -> tuple[list[str], np.ndarray, dict]:
    """Read the source once, keeping only the task of each usable row (4 bytes a row, no text).

    Returns the task names in order of first appearance, each row's index into them ((n_rows,) int32,
    -1 for a dropped row) and a report of the rows read, usable and dropped (meta.json's "rows").
    """
    stats: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    ids: dict[str, int] = {}
    row_task = array("i")
    for text, task in read_rows(cfg, stats):
        if _is_blank(text):
            dropped["empty text"] += 1
        elif _is_blank(task):
            dropped["no task"] += 1
        elif len(text) < cfg.min_chars:
            dropped[f"text shorter than {cfg.min_chars} characters"] += 1
        else:
            # Talk of Norway's names as the paper's code wrote them: "Abid Q. Raja" -> "abid q raja"
            name = task.strip().lower().replace(".", "") if cfg.preset == "talkofnorway" else task.strip()
            row_task.append(ids.setdefault(name, len(ids)))
            continue
        row_task.append(-1)
    usable = len(row_task) - sum(dropped.values())
    if stats["short_rows"]:
        dropped["fewer fields than the header"] = stats["short_rows"]
    read = len(row_task) + stats["short_rows"]
    rows = {"read": read, "usable": usable, "dropped": dict(dropped), "invalid_utf8_replaced": stats["invalid_utf8"]}
    return list(ids), np.array(row_task, dtype=np.int32), rows


# ---- Choosing tasks, documents and splits ----


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
            top, n = max(counts.items(), key=lambda item: item[1], default=("none", 0))
            raise ValueError(f"no {col!r} value has at least {cfg.min_task_size} documents (the largest, {top!r}, "
                             f"has {n}); is this the Spotify lyrics file? lower the threshold with --min-task-size")
        if cfg.total > sum(kept.values()):
            raise ValueError(f"--total {cfg.total} is more than the {sum(kept.values())} documents of the kept tasks")
        return dict(zip(kept, largest_remainder(cfg.total, list(kept.values()))))
    if cfg.preset == "talkofnorway":
        eligible = sorted(t for t, n in counts.items() if cfg.min_docs < n < cfg.max_docs)
        if not eligible:
            raise ValueError(f"no {col!r} value has more than {cfg.min_docs} and fewer than {cfg.max_docs} texts of "
                             f"at least {cfg.min_chars} characters; is this the Talk of Norway file? "
                             f"adjust --min-docs/--max-docs")
        if len(eligible) < cfg.num_tasks:
            warn(f"only {len(eligible)} tasks have between {cfg.min_docs} and {cfg.max_docs} documents; using them all")
        return {t: counts[t] for t in eligible[: cfg.num_tasks]}
    names = sorted(counts) if cfg.tasks is None else cfg.tasks
    unknown = [t for t in names if t not in counts]
    if unknown:
        raise ValueError(f"no usable documents of task(s) {_preview(unknown)} in {col!r}; "
                         f"its tasks are: {_preview(sorted(counts))}")
    return {t: min(cfg.max_docs_per_task or counts[t], counts[t]) for t in names}


def drop_unsplittable(take: dict[str, int], cfg: Config) -> dict[str, int]:
    """Stop on (or, with --drop-small-tasks, leave out) tasks with too few documents to split."""
    need = min_docs_to_split(cfg.split)
    small = {t: n for t, n in take.items() if n < need}
    how = f"fewer than the {need} documents needed to split " + "/".join(f"{f:g}" for f in cfg.split)
    if small and not cfg.drop_small_tasks:
        listed = ", ".join(f"{t!r} ({n})" for t, n in list(small.items())[:5])
        raise ValueError(f"task(s) {listed} have {how}; add --drop-small-tasks to leave them out")
    for t, n in small.items():
        warn(f"dropped task {t!r}: {n} document(s), {how}")
    if len(small) == len(take):
        raise ValueError(f"every task has {how}")
    return {t: n for t, n in take.items() if t not in small}


def assign_splits(names: list[str], row_task: np.ndarray, take: dict[str, int], cfg: Config) -> np.ndarray:
    """(n_rows,) int8: the split of every chosen row (0 train, 1 val, 2 test), -1 for the others.

    Each task has its own generator, seeded from --seed and the task's name, so a task's documents and
    splits do not depend on which other tasks are chosen.
    """
    row_split = np.full(len(row_task), -1, dtype=np.int8)
    # Rows grouped by task without a pass over all rows per task: a stable sort, then the group ends.
    order = np.argsort(row_task, kind="stable")  # dropped rows (-1) first, then task 0, task 1, ...
    ends = np.cumsum(np.bincount(row_task + 1, minlength=len(names) + 1))  # (num_tasks + 1,)
    for t, name in enumerate(names):
        if name in take:
            rows = order[ends[t] : ends[t + 1]]  # this task's rows, in file order
            rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode("utf-8"))])
            chosen = rng.permutation(rows)[: take[name]]  # a uniformly random subset, in random order
            bounds = np.cumsum([0, *largest_remainder(take[name], cfg.split)])
            for s in range(len(SPLITS)):
                row_split[chosen[bounds[s] : bounds[s + 1]]] = s
    return row_split


# ---- Pass 2: tokenise the chosen rows and write the split arrays ----


def gpt2_encoding() -> "tiktoken.Encoding":
    """tiktoken's GPT-2 encoding, or a one-line error saying how to make it available offline."""
    try:
        import tiktoken

        return tiktoken.get_encoding(ENCODING)  # 50257 ids: they fit uint16
    except Exception as e:  # import error, no network, no cache: all mean the same to the user
        raise ValueError(f"cannot load tiktoken's {ENCODING!r} encoding ({type(e).__name__}); install tiktoken "
                         f"and allow network access once, or set TIKTOKEN_CACHE_DIR to a folder of its files") from None


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
        self.folder, self.raw = folder, open(folder / "tokens.raw", "wb")
        self.offsets, self.task_ids, self.prompt_lens = array("q", [0]), array("q"), array("q")
        self.docs = np.zeros(num_tasks, dtype=np.int64)  # (num_tasks,)
        self.tokens = np.zeros(num_tasks, dtype=np.int64)  # (num_tasks,)

    def add(self, ids: list[int], task: int, prompt_len: int) -> None:
        self.raw.write(np.array(ids, dtype="<u2").tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.task_ids.append(task)
        self.prompt_lens.append(prompt_len)
        self.docs[task] += 1
        self.tokens[task] += len(ids)

    def finish(self) -> None:
        """Write the four .npy files. tokens.npy = an .npy header + the raw file, copied in chunks."""
        self.raw.close()
        header = {"descr": "<u2", "fortran_order": False, "shape": (self.offsets[-1],)}
        with open(self.folder / "tokens.npy", "wb") as out, open(self.folder / "tokens.raw", "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, 1 << 20)
        (self.folder / "tokens.raw").unlink()
        for name in ("offsets", "task_ids", "prompt_lens"):
            np.save(self.folder / f"{name}.npy", np.array(getattr(self, name), dtype=np.int64))


_BATCH_DOCS = 1024  # documents tokenised together (threads inside tiktoken)
_THREADS = min(8, os.cpu_count() or 1)


def write_splits(cfg: Config, new_task: np.ndarray, row_split: np.ndarray, tasks: list[str], folder: Path,
                 enc: "tiktoken.Encoding") -> list[SplitWriter]:
    """Read the source again and append each chosen row, tokenised, to its split's files in `folder`.

    new_task (n_rows,): each row's index into `tasks`; row_split (n_rows,): its split, -1 if unused.
    """
    prompts = [encode_prompt(enc, t) if cfg.task_prompt else [] for t in tasks]
    writers = [SplitWriter(folder / name, len(tasks)) for name in SPLITS]
    batch: list[tuple[int, int, str]] = []  # (split, task, text)

    def flush() -> None:
        # the batched form of encode_document: tiktoken's threads tokenise many documents at once
        texts = [body_text(text, cfg.task_prompt) for _, _, text in batch]
        for (s, t, _), body in zip(batch, enc.encode_ordinary_batch(texts, num_threads=_THREADS)):
            writers[s].add(prompts[t] + body + [enc.eot_token], t, len(prompts[t]))
        batch.clear()

    try:  # .tolist(): Python ints are faster to look up row by row than numpy scalars
        for s, t, (text, _) in zip(row_split.tolist(), new_task.tolist(), read_rows(cfg, Counter())):
            if s >= 0:
                batch.append((s, t, text))
                if len(batch) >= _BATCH_DOCS:
                    flush()
        flush()
        for w in writers:
            w.finish()
    finally:
        for w in writers:
            w.raw.close()
    return writers


# ---- The output folder: written beside the target, renamed into place only when complete ----


def check_out_folder(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; add --force to replace it")
    # --force replaces datasets, never an arbitrary folder given by mistake (say, --out .)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file())):
        raise ValueError(f"refusing to replace {out}: it is not a folder written by prepare_data.py (no meta.json)")


def publish(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`; an old `out` is removed only after the new one is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
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

    names, row_task, rows = index_rows(cfg)  # pass 1
    counts = dict(zip(names, np.bincount(row_task[row_task >= 0], minlength=len(names)).tolist()))
    print(f"read {rows['read']:,} rows of {source.name}: {rows['usable']:,} usable, {len(counts):,} tasks")
    if rows["invalid_utf8_replaced"]:
        warn(f"replaced {rows['invalid_utf8_replaced']} invalid UTF-8 sequence(s) with U+FFFD")
    for reason, n in rows["dropped"].items():
        warn(f"dropped {n} row(s): {reason}")
    if not counts:
        raise ValueError(f"{source} has no usable rows (texts in {cfg.text_col!r}, tasks in {cfg.task_col!r})")

    take = drop_unsplittable(choose_tasks(counts, cfg), cfg)
    tasks = sorted(take)
    row_split = assign_splits(names, row_task, take, cfg)
    # each row's index into the sorted `tasks` (-1 if unused); the extra -1 is what row_task == -1 picks
    new_id = np.array([tasks.index(n) if n in take else -1 for n in names] + [-1])  # (len(names) + 1,)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"  # hidden, beside the target
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stay on the published folder
    try:
        writers = write_splits(cfg, new_id[row_task], row_split, tasks, tmp, enc)  # pass 2
        counts = {
            split: {t: {"docs": int(w.docs[i]), "tokens": int(w.tokens[i])} for i, t in enumerate(tasks)}
            for split, w in zip(SPLITS, writers)
        }
        meta = {"format": FORMAT, "tasks": tasks, "encoding": ENCODING, "task_prompt": cfg.task_prompt,
                "prompt_format": PROMPT_FORMAT if cfg.task_prompt else "", "counts": counts,
                "source": {"name": source.name, "size": size, "sha256": sha256_of(source)},
                "rows": rows, "args": asdict(cfg)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        publish(tmp, out)
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


# ---- Command line ----


def _positive_int(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return int(text)


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
    p.add_argument("--seed", metavar="N", type=int, default=42, help="seed of sampling and splits")
    p.add_argument("--no-task-prompt", action="store_true", help='do not prefix documents with "[task] "')
    p.add_argument("--min-chars", metavar="N", type=int, help="drop shorter texts (talkofnorway: 40)")
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
    g.add_argument("--min-docs", metavar="N", type=int, help="... of those with > N documents (200)")
    g.add_argument("--max-docs", metavar="N", type=int, help="... and < N documents (1000)")
    return p


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(x) for x in text.split(","))
    except ValueError:
        fractions = ()
    valid = len(fractions) == 3 and all(0 <= f < math.inf for f in fractions) and fractions[0] > 0
    if not valid or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"--split {text!r}: need three fractions train,val,test >= 0 adding up to 1, train > 0, "
                         f"like 0.5,0.25,0.25")
    return fractions


def config_from_args(args: argparse.Namespace) -> Config:
    """A Config from parsed arguments: the preset fills what was not given, misplaced options are errors."""
    for mode, options in _MODE_OPTIONS.items():
        for option in options:
            if getattr(args, option) is not None and args.preset != mode:
                where = f"--preset {mode}" if mode else "runs without --preset"
                raise ValueError(f"--{option.replace('_', '-')} applies only to {where}")
    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if tasks == []:
        raise ValueError("--tasks is empty; give comma-separated task names")
    source = args.csv if args.csv is not None else args.jsonl
    # Precedence: an option given on the command line, else the preset's value, else Config's default.
    given = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
    return Config(**{
        **PRESETS.get(args.preset, {}),
        **given,
        "source": source,
        "source_format": "csv" if args.csv is not None else "jsonl",
        "out": args.out or str(Path("data") / (args.preset or Path(source).stem)),
        "split": parse_split(args.split),
        "task_prompt": not args.no_task_prompt,
        "tasks": tasks,
    })


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
