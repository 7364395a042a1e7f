"""Turn a corpus into a tokenised multi-task dataset for BoRA on GPT-2 (the folder data.py reads).

Every row of a CSV or JSONL file is a document: one column holds its text, another its task (an
emotion, a speaker, ...). Exact duplicates within a task are dropped, each task's documents are split
train/val/test (50/25/25 by default, seeded) and tokenised with GPT-2's BPE as "[task] text<|endoftext|>",
into data/NAME/{train,val,test}/*.npy and data/NAME/meta.json.

The source is streamed twice: first each row's task and a hash of its text (to count, drop duplicates
and choose rows without holding any text), then the chosen rows are tokenised. The README lists the commands.
"""
from __future__ import annotations

import cli  # first: Ctrl-C while the imports below load is one line (cli.exit_on_interrupt)

cli.exit_on_interrupt(__name__)

import argparse
import csv
import glob
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import sys
import zlib
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np

from cli import ArgumentParser, one_line_errors, uninterrupted
from data import ENCODING, FORMAT, SPLITS, encode_documents, fingerprint, gpt2_encoding
from files import exchange, hub_file, writing

# ---- Presets: where a corpus comes from and how its tasks are chosen ----

EMOTION = ("dair-ai/emotion", "0f2013aff0f120885b4892bddfe59faafa13a310",  # a revision that has these files
           ("data/train.jsonl.gz", "data/validation.jsonl.gz", "data/test.jsonl.gz"))
PRESETS = {
    # The default: ~20k English tweets (dair-ai/emotion) labelled 0-5 with the lyrics reproduction's emotions.
    "emotion": dict(text_col="text", task_col="label",
                    labels=dict(enumerate(["sadness", "joy", "love", "anger", "fear", "surprise"]))),  # the card's order
    # The lyrics paper (Kaggle, "500k+ Spotify songs"): emotions of >= 5000 songs, 4933 songs in their ratio.
    "spotify": dict(text_col="text", task_col="emotion", min_task_size=5000, total=4933),
    # The BoRA paper (Talk of Norway), as its code did: speeches of >= 40 characters, speakers with more than
    # 200 and fewer than 1000 (by raw rep_name), named in lower case without dots, the first 25 by name.
    "talkofnorway": dict(text_col="text", task_col="rep_name", min_chars=40, min_docs=200, max_docs=1000, num_tasks=25),
}
RESERVED = "global"  # bora.GLOBAL_NAME, sample.py's and export.py's name for the shared mean Θ: no task's
DUPLICATE = "exact duplicate of an earlier text of its task"
DEFAULTS = dict(text_col="text", task_col="task", min_chars=0, labels=None)
ONLY = {"min_task_size": ("spotify",), "total": ("spotify", None, "emotion"), "num_tasks": ("talkofnorway",),
        "min_docs": ("talkofnorway",), "max_docs": ("talkofnorway",), "tasks": (None, "emotion"),
        "max_docs_per_task": (None, "emotion")}  # options for some presets only; None: no preset


# ---- Pass 1: every row's task and a hash of its text; then the tasks, rows and splits to use ----

def read_rows(a: argparse.Namespace, stats: Counter):
    """(text, task) of every row of every source file, in order; None where a value is missing. Invalid
    UTF-8 becomes U+FFFD, counted in stats["invalid_utf8"] (less the U+FFFD the file really holds)."""
    for path in a.sources:
        if not path.is_file():
            raise FileNotFoundError(f"{path} {'is not a file' if path.exists() else 'does not exist'}")
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            if not (head := f.peek(1 << 16)):  # a broken .gz raises gzip's own one-line OSError here
                raise ValueError(f"{path} is empty")
            if b"\0" in head:  # never in UTF-8 text; always in binary, compressed or UTF-16 files
                raise ValueError(f"{path} is not a UTF-8 text file (it contains NUL bytes: binary, compressed or UTF-16?)")
            lines = (decoded(raw, stats) for raw in f)  # bytes split on b"\n" only: CSV fields keep their "\r"
            for text, task in (csv_rows if a.format == "csv" else jsonl_rows)(path, lines, a, stats):
                yield text, a.labels.get(int(task), task) if a.labels and task and task.isdigit() else task


def decoded(raw: bytes, stats: Counter) -> str:
    line = raw.decode("utf-8", errors="replace")
    stats["invalid_utf8"] += line.count("\ufffd") - raw.count("\ufffd".encode())
    return line.removeprefix("\ufeff")  # a byte-order mark


def csv_rows(path: Path, lines, a: argparse.Namespace, stats: Counter):
    csv.field_size_limit(2**31 - 1)  # real lyrics and speeches exceed the default 128 KiB field limit
    reader = csv.reader(lines)
    try:
        text_i, task_i = columns(path, [name.strip() for name in next(reader, [])], a)
        for row in reader:
            if len(row) > max(text_i, task_i):
                yield row[text_i], row[task_i]
            elif row:  # not a blank line, a short one
                stats["short"] += 1
    except csv.Error as e:
        raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None


def jsonl_rows(path: Path, lines, a: argparse.Namespace, stats: Counter):
    numbered = ((number, line) for number, line in enumerate(lines, start=1) if line.strip())  # blank lines skipped
    for i, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: not valid JSON ({getattr(e, 'msg', e)}); "
                             "each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, found {type(row).__name__}")
        if i == 0:
            columns(path, list(row), a)  # the first object plays the part of a CSV header
        values = [row.get(a.text_col), row.get(a.task_col)]
        if bad := [v for v in values if isinstance(v, (list, dict))]:
            raise ValueError(f"{path}, line {number}: expected text, found a JSON {type(bad[0]).__name__}")
        yield tuple(None if v is None or v != v else str(v) for v in values)  # null and NaN are missing


def columns(path: Path, header: list[str], a: argparse.Namespace) -> tuple[int, int]:
    for which, col in (("text", a.text_col), ("task", a.task_col)):
        if col not in header:
            hint = " (is the file comma-separated?)" if len(header) == 1 and any(c in header[0] for c in ";\t|") else ""
            shown = ", ".join(repr(h[:40]) for h in header[:20]) or "(none)"
            raise ValueError(f"{path} has no {which} column {col!r}; its columns are: {shown}{hint}; "
                             f"choose one with --{which}-col")
    return header.index(a.text_col), header.index(a.task_col)


def index_rows(a: argparse.Namespace) -> tuple[dict[str, list[tuple[int, bytes]]], dict]:
    """(row number, hash of its text) of every usable row of each task name in the source, duplicates
    included, and a report of the rows read and dropped. A text is kept only as a hash, to find exact
    duplicates once the tasks are known (distinct)."""
    stats, dropped, rows_of = Counter(), Counter(), {}

    def blank(value: str | None) -> bool:  # missing: None, only whitespace, or "nan" as pandas writes an empty cell
        return value is None or not value.strip() or (len(value) < 8 and value.strip().lower() == "nan")

    for row, (text, task) in enumerate(read_rows(a, stats)):
        reason = ("empty text" if blank(text) else "no task" if blank(task)
                  else f"text shorter than {a.min_chars} characters" if len(text) < a.min_chars else None)
        if reason is None:
            rows_of.setdefault(task.strip(), []).append((row, hashlib.blake2b(text.encode(), digest_size=8).digest()))
        else:
            dropped[reason] += 1
    if stats["short"]:
        dropped["fewer fields than the header"] = stats["short"]
    usable = sum(map(len, rows_of.values()))
    return rows_of, {"read": usable + sum(dropped.values()), "usable": usable, "dropped": dict(dropped),
                     "invalid_utf8_replaced": stats["invalid_utf8"]}


def distinct(rows_of: dict[str, list[tuple[int, bytes]]], task_of: dict[str, str]
             ) -> tuple[dict[str, list[int]], dict[str, int]]:
    """{task: its rows in file order, each exact duplicate of an earlier text of the task left out}, and {task:
    its rows, duplicates included}. Several names in the source may form one task (talkofnorway): the
    duplicates are found across all of them."""
    merged: dict[str, list[tuple[int, bytes]]] = {}
    for name, rows in rows_of.items():
        if name in task_of:
            merged.setdefault(task_of[name], []).extend(rows)
    kept = {}
    for task, rows in merged.items():
        kept[task], seen = [], set()
        for row, text in sorted(rows):  # in file order: the first of equal texts stays
            if text not in seen:
                seen.add(text)
                kept[task].append(row)
    return kept, {task: len(rows) for task, rows in merged.items()}


def speakers(rows_of: dict[str, list[tuple[int, bytes]]], a: argparse.Namespace) -> dict[str, str]:
    """talkofnorway's tasks as the paper's code chose them: {name in the source: task}. Speakers are counted
    by raw name over all their speeches (of >= --min-chars characters, repeats included), kept with more
    than --min-docs and fewer than --max-docs, named in lower case without dots ("Abid Q. Raja" -> "abid q
    raja"), and the first --num-tasks taken by name."""
    raws: dict[str, list[str]] = {}
    for raw in (raw for raw, rows in rows_of.items() if a.min_docs < len(rows) < a.max_docs):
        raws.setdefault(raw.lower().replace(".", ""), []).append(raw)
    for task in (task for task, names in raws.items() if len(names) > 1):
        warn(f"speakers {', '.join(map(repr, raws[task]))} all become {task!r}: their speeches form one task")
    if not raws:
        raise ValueError(f"no {a.task_col!r} value has more than {a.min_docs} and fewer than {a.max_docs} texts of "
                         f"at least {a.min_chars} characters; is this the Talk of Norway file? adjust --min-docs/--max-docs")
    if len(raws) < a.num_tasks:
        warn(f"only {len(raws)} tasks have between {a.min_docs} and {a.max_docs} documents; using them all")
    return {raw: task for task in sorted(raws)[:a.num_tasks] for raw in raws[task]}


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Integers proportional to weights that add up to total: floors of the exact quotas, then the
    leftover units to the largest fractional parts (ties to the earlier weight). Exact fractions."""
    quotas = [Fraction(w) * total / sum(map(Fraction, weights)) for w in weights]
    shares = [math.floor(q) for q in quotas]
    for i in sorted(range(len(weights)), key=lambda i: (shares[i] - quotas[i], i))[:total - sum(shares)]:
        shares[i] += 1
    return shares


def choose_tasks(counts: dict[str, int], a: argparse.Namespace) -> dict[str, int]:
    """{task: documents to use} of the tasks the preset or --tasks selects, from each task's distinct documents."""
    if a.preset == "spotify":
        take = {t: n for t, n in sorted(counts.items()) if n >= a.min_task_size}
        if not take:
            top, n = max(counts.items(), key=lambda item: item[1])
            raise ValueError(f"no {a.task_col!r} value has at least {a.min_task_size} documents (the largest, {top!r}, "
                             f"has {n}); is this the Spotify lyrics file? lower the threshold with --min-task-size")
    else:
        if unknown := [t for t in a.tasks or () if t not in counts]:
            raise ValueError(f"no usable documents of task(s) {', '.join(map(repr, unknown[:20]))} in {a.task_col!r}; "
                             f"its tasks are: {', '.join(map(repr, sorted(counts)[:20]))}")
        take = {t: min(a.max_docs_per_task or counts[t], counts[t]) for t in a.tasks or sorted(counts)}
    if RESERVED in take:
        raise ValueError(f"a task is named {RESERVED!r}, the name sample.py and export.py give the shared mean of "
                         f"all tasks; rename it in {a.task_col!r}, or leave it out")
    if a.total is not None:  # N documents in all, in the tasks' proportions, so that small tasks stay small
        if a.total > sum(take.values()):
            raise ValueError(f"--total {a.total} is more than the {sum(take.values())} documents of the kept tasks")
        take = dict(zip(take, largest_remainder(a.total, list(take.values()))))
    return take


def assign_splits(docs_of: dict[str, list[int]], take: dict[str, int], a: argparse.Namespace
                  ) -> tuple[list[str], dict[int, tuple[int, int]]]:
    """The tasks, sorted, and {row: (split 0/1/2 = train/val/test, task id)} of every row to use.

    Each task draws its documents and splits with a generator seeded from --seed and its own name, so
    they do not depend on which other tasks are chosen."""
    need = next(n for n in itertools.count(1) if all(largest_remainder(n, a.split)))  # a document in every split
    how = f"fewer than the {need} documents needed to split " + "/".join(f"{f:g}" for f in a.split)
    if (small := {t: n for t, n in take.items() if n < need}) and not a.drop_small_tasks:
        raise ValueError(f"task(s) {', '.join(f'{t!r} ({n})' for t, n in list(small.items())[:5])} have {how}; "
                         "add --drop-small-tasks to leave them out")
    for t, n in small.items():
        warn(f"dropped task {t!r}: {n} document(s), {how}")
    if not (tasks := sorted(set(take) - set(small))):
        raise ValueError(f"every task has {how}")
    assignment = {}
    for i, task in enumerate(tasks):
        rng = np.random.default_rng([a.seed, zlib.crc32(task.encode("utf-8"))])
        chosen = rng.permutation(docs_of[task])[:take[task]]  # a uniformly random subset
        for s, part in enumerate(np.split(chosen, np.cumsum(largest_remainder(take[task], a.split))[:-1])):
            assignment.update(dict.fromkeys(part.tolist(), (s, i)))
    return tasks, assignment


# ---- Pass 2: tokenise the chosen rows into the split files ----

def write_splits(a: argparse.Namespace, assignment: dict[int, tuple[int, int]], tasks: list[str], folder: Path,
                 enc) -> dict:
    """Read the source again, tokenise each chosen row into its split, write the arrays; return the counts."""
    docs = [[] for _ in SPLITS]  # per split: (task id, tokens (n,) uint16, prompt length) of each document, in file order
    rows = ((*assignment[row], text) for row, (text, _) in enumerate(read_rows(a, Counter())) if row in assignment)
    while chunk := list(itertools.islice(rows, 1024)):
        texts, names = [text for *_, text in chunk], [tasks[t] if a.task_prompt else None for _, t, _ in chunk]
        for (s, t, _), (ids, prompt_len) in zip(chunk, encode_documents(enc, texts, names)):
            docs[s].append((t, np.array(ids, np.uint16), prompt_len))
    counts = {}
    for split, split_docs in zip(SPLITS, docs):
        task_ids = np.array([t for t, _, _ in split_docs], np.int64)
        lengths = np.array([len(d) for _, d, _ in split_docs], np.int64)
        (folder / split).mkdir()
        for name, array in dict(tokens=np.concatenate([d for _, d, _ in split_docs] or [np.zeros(0, np.uint16)]),
                                offsets=np.concatenate([[0], lengths.cumsum()]), task_ids=task_ids,
                                prompt_lens=np.array([p for *_, p in split_docs], np.int64)).items():
            np.save(folder / split / f"{name}.npy", array)
        n_docs, n_tokens = np.bincount(task_ids, minlength=len(tasks)), np.bincount(task_ids, lengths, len(tasks))
        counts[split] = {t: {"docs": int(n_docs[i]), "tokens": int(n_tokens[i])} for i, t in enumerate(tasks)}
    return counts


# ---- The whole run: the folder appears only when complete ----

def prepare(a: argparse.Namespace) -> dict:
    out = Path(a.out).resolve() if Path(a.out).is_symlink() else Path(a.out)  # a link's folder is replaced, not it
    clean_leftovers(out)
    if out.exists() and not a.force:
        raise ValueError(f"{out} already exists; add --force to replace it")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file())):
        raise ValueError(f"refusing to replace {out}: it is not a folder written by prepare_data.py (no meta.json)")
    if a.sources is None:  # the default corpus, fetched once into the Hugging Face cache
        a.sources = [hub_file(EMOTION[0], file, EMOTION[1], kind="dataset") for file in EMOTION[2]]
    enc = gpt2_encoding()
    rows_of, rows = index_rows(a)  # pass 1
    if not rows_of:
        raise ValueError(f"{a.sources[0]} has no usable rows (texts in {a.text_col!r}, tasks in {a.task_col!r})")
    task_of = speakers(rows_of, a) if a.preset == "talkofnorway" else {name: name for name in rows_of}
    docs_of, found = distinct(rows_of, task_of)
    if duplicates := sum(found.values()) - sum(map(len, docs_of.values())):
        rows["dropped"][DUPLICATE] = duplicates
        rows["usable"] -= duplicates
    print(f"read {rows['read']:,} rows of {', '.join(p.name for p in a.sources)}: {rows['usable']:,} usable, "
          f"{len(rows_of):,} tasks")
    if rows["invalid_utf8_replaced"]:
        warn(f"replaced {rows['invalid_utf8_replaced']} invalid UTF-8 sequence(s) with U+FFFD")
    for reason, n in rows["dropped"].items():
        warn(f"dropped {n} row(s): {reason}")
    tasks, assignment = assign_splits(docs_of, choose_tasks({t: len(docs) for t, docs in docs_of.items()}, a), a)
    tmp = hidden(out, "tmp")
    try:
        tmp.mkdir(parents=True)  # hidden, beside the target
        with writing(out.parent, str(out)):
            meta = {"format": FORMAT, "encoding": ENCODING, "tasks": tasks, "task_prompt": a.task_prompt,
                    "counts": write_splits(a, assignment, tasks, tmp, enc),  # pass 2
                    "rows": rows, "task_rows": {t: {"rows": found[t], "distinct": len(docs_of[t])} for t in tasks},
                    "fingerprint": fingerprint(tmp, tasks), "sources": [str(p) for p in a.sources],
                    "args": {k: v for k, v in vars(a).items() if k != "sources"}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n",
                                           encoding="utf-8")
    except BaseException:  # Ctrl-C included: never a half-written folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        with uninterrupted():  # the swap and its report: a Ctrl-C waits for their end
            publish(tmp, out)
            print(table(meta))
            print(f"wrote {out}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {out} holds the new dataset (the interruption came as it was put in place)")
    return meta


def hidden(out: Path, kind: str) -> Path:
    """A hidden folder beside out, named after this process: "tmp" while the dataset is written, "old" for
    the dataset it replaces while the swap cannot be done in one step."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def publish(tmp: Path, out: Path) -> None:
    """Move the finished folder tmp to out. An existing out is swapped with it in one step where the system can
    (Linux), so that out holds a whole dataset at every instant, the old one or the new; elsewhere the old
    one is moved aside first, and if the run is killed right then, the next run puts it back."""
    old = tmp  # after a swap, the old dataset is where the new one was
    try:
        if not out.exists():
            os.rename(tmp, out)
        elif not exchange(tmp, out):
            old = hidden(out, "old")
            os.rename(out, old)  # no dataset at out from here ...
            try:
                os.rename(tmp, out)  # ... to here
            except BaseException:
                os.rename(old, out)
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the new dataset, which did not get into place
        raise
    shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(out: Path) -> None:
    """Delete the hidden folders that killed runs left beside out (a dead process's "tmp" and "old"); an
    old dataset moved aside by a run killed before the new one took its place goes back to out."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        if not (match := pattern.fullmatch(path.name)) or alive(int(match[2])):
            continue
        if match[1] == "old" and not out.exists():
            os.rename(path, out)
            warn(f"put the old dataset back at {out}: a run killed while replacing it had moved it to {path}")
        else:
            shutil.rmtree(path)
            warn(f"removed {path}, left by a prepare_data.py run that was killed")


def alive(pid: int) -> bool:
    """Is process pid running? Where that cannot be asked safely (on Windows os.kill ends the process), yes."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def table(meta: dict) -> str:
    """Documents and tokens per task and split, and their totals."""
    rows = [(t, [meta["counts"][s][t][k] for s in SPLITS for k in ("docs", "tokens")]) for t in meta["tasks"]]
    rows.append(("all", [sum(values[i] for _, values in rows) for i in range(2 * len(SPLITS))]))
    width = max(len(t) for t in [*meta["tasks"], "task"])
    return "\n".join([f"{'task':<{width}}" + "".join(f"{s + ' docs':>12}{s + ' tokens':>14}" for s in SPLITS)] +
                     [f"{t:<{width}}" + "".join(f"{v:>{14 if i % 2 else 12},}" for i, v in enumerate(values)) for t, values in rows])


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---- Command line ----

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    positive = lambda text: int(text) if text.isdigit() and int(text) > 0 else p.error(f"expected a positive integer, got {text}")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--csv", type=Path, metavar="PATH", help="a CSV file with a header row")
    source.add_argument("--jsonl", type=Path, metavar="PATH", help="a file of one JSON object per line (.gz too)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a paper's columns and task selection; without a file: emotion")
    p.add_argument("--text-col", metavar="COL", help="column with the document text (default: text, or the preset's)")
    p.add_argument("--task-col", metavar="COL", help="column with the task name (default: task, or the preset's)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: data/<preset or file name>)")
    p.add_argument("--split", metavar="F,F,F", default="0.5,0.25,0.25", help="train,val,test fractions of every task")
    p.add_argument("--seed", metavar="N", type=int, default=42, help="seed of the sampling and the splits")
    p.add_argument("--no-task-prompt", dest="task_prompt", action="store_false", help='no "[task]" before each text')
    p.add_argument("--min-chars", metavar="N", type=int, help="drop shorter texts (talkofnorway: 40)")
    p.add_argument("--drop-small-tasks", action="store_true", help="leave out tasks too small to split, do not stop")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--tasks", metavar="A,B,...", help="without a preset or with emotion: keep only these tasks")
    p.add_argument("--max-docs-per-task", metavar="N", type=positive, help="... and sample at most N documents of each")
    p.add_argument("--min-task-size", metavar="N", type=positive, help="spotify: keep tasks with >= N documents (5000)")
    p.add_argument("--total", metavar="N", type=positive, help="sample N documents in all, in the tasks' proportions (spotify: 4933)")
    p.add_argument("--num-tasks", metavar="N", type=positive, help="talkofnorway: the first N tasks by name (25) ...")
    p.add_argument("--min-docs", metavar="N", type=int, help="talkofnorway: ... of those with > N documents (200)")
    p.add_argument("--max-docs", metavar="N", type=int, help="talkofnorway: ... and < N documents (1000)")
    a = p.parse_args(argv)
    if a.csv is None and a.jsonl is None and a.preset not in (None, "emotion"):
        p.error(f"--preset {a.preset} needs its file: --csv PATH")
    a.preset = a.preset or ("emotion" if a.csv is None and a.jsonl is None else None)
    for option, presets in ONLY.items():
        if getattr(a, option) is not None and a.preset not in presets:
            p.error(f"--{option.replace('_', '-')} applies only to " + " or ".join(
                "runs without --preset" if m is None else f"--preset {m}" for m in presets))
    for key, value in {**DEFAULTS, **PRESETS.get(a.preset, {})}.items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    a.sources, a.format = ([a.csv or a.jsonl], "csv" if a.csv else "jsonl") if a.csv or a.jsonl else (None, "jsonl")
    a.out = a.out or str(Path("data") / (a.preset or (a.csv or a.jsonl).name.split(".")[0]))
    if a.tasks is not None:
        a.tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] or p.error("--tasks is empty; give task names")
    fractions = [float(f) if f.replace(".", "", 1).isdigit() else -1.0 for f in a.split.split(",")]
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        p.error(f"--split {a.split!r}: need three fractions train,val,test > 0 adding up to 1, like 0.5,0.25,0.25 "
                "(train.py validates on val, eval.py reports on test: neither may be empty)")
    a.split = tuple(fractions)
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    with one_line_errors(f"interrupted: {a.out} is as it was before this run"):
        prepare(a)


if __name__ == "__main__":
    main()
