"""prepare_data.py: reading nasty CSV/JSONL files, the presets' selection, splits, tokenisation,
the output folder's atomicity and determinism, and the reader used by train.py and eval.py.

Every test writes its own small source file and runs the command line through main(argv).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import bora
import data
import prepare_data as pd_
from data import load_meta, load_split
from prepare_data import main

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def enc():
    return data.gpt2_encoding()


# ----------------------------------------------------------------------------------------------
# helpers


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, objects: list[dict]) -> Path:
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects), encoding="utf-8")
    return path


def fails(argv: list[str], tmp_path: Path) -> str:
    """Run main(argv), expect a one-line error and no output folder or temp folder left behind."""
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = str(exc.value.code)
    assert exc.value.code != 0 and message.startswith(("error: ", "interrupted: ")) and "\n" not in message
    assert set(tmp_path.rglob("*")) == before, "a failed run must not leave files behind"
    return message


def documents(data_dir: Path, enc) -> list[tuple[str, str, str, int]]:
    """(split, task, decoded document, prompt length) of every document in the folder."""
    tasks = load_meta(data_dir)["tasks"]
    out = []
    for split in data.SPLITS:
        s = load_split(data_dir, split)
        for i in range(len(s)):
            out.append((split, tasks[s.task_ids[i]], enc.decode(s.document(i).tolist()), int(s.prompt_lens[i])))
    return out


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


NASTY_TEXTS = {
    "a": [
        'She said "hello", then "goodbye"',
        "line one\nline two\r\nline three",
        "emoji 😀 and æøå and 日本語",
        "a literal <|endoftext|> inside a lyric",
        "  leading and trailing spaces  ",
        "comma, separated, words",
    ],
    "b": [
        "'s the contraction first",
        "\nstarts with a newline",
        "1234 numbers first",
        "plain words here",
        "tabs\tinside\ttext",
        '"""triple quotes"""',
    ],
}


def nasty_csv(path: Path) -> Path:
    """Quotes, newlines inside fields, unicode, blank lines, empty/NaN texts, a short row and a missing task."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "task"])
        for i, (ta, tb) in enumerate(zip(NASTY_TEXTS["a"], NASTY_TEXTS["b"])):
            writer.writerow([i, ta, "a"])
            writer.writerow([i, tb, " b "])  # task names are stripped
        f.write("\r\n\r\n")  # blank lines: skipped silently
        writer.writerows([[90, "", "a"], [91, "   ", "b"], [92, "nan", "a"], [93, "NaN", "b"], [94, "no task", ""]])
        f.write("95\r\n")  # a row with fewer fields than the header
    return path


# ----------------------------------------------------------------------------------------------
# documents, tokens and the reader


def test_round_trip_of_nasty_csv(tmp_path, enc, capsys):
    main(["--csv", str(nasty_csv(tmp_path / "n.csv")), "--out", str(tmp_path / "d")])
    docs = documents(tmp_path / "d", enc)
    expected = Counter(f"[{task}] {text}{EOT}" for task, texts in NASTY_TEXTS.items() for text in texts)
    assert Counter(doc for _, _, doc, _ in docs) == expected  # every usable row exactly once, unchanged
    for _, task, _, prompt_len in docs:
        assert prompt_len == len(enc.encode_ordinary(f"[{task}]"))
    err = capsys.readouterr().err
    assert "dropped 4 row(s): empty text" in err and "dropped 1 row(s): no task" in err
    assert "dropped 1 row(s): fewer fields than the header" in err
    meta = load_meta(tmp_path / "d")
    assert meta["rows"] == {
        "read": 18,
        "usable": 12,
        "dropped": {"empty text": 4, "no task": 1, "fewer fields than the header": 1},
        "invalid_utf8_replaced": 0,
    }


def test_tokens_equal_tiktoken_of_the_whole_document(tmp_path, enc):
    """Prompt and text tokenised apart give exactly GPT-2's tokens of the joined string; the only
    end-of-text id is the last one (a literal "<|endoftext|>" in a text stays text)."""
    main(["--csv", str(nasty_csv(tmp_path / "n.csv")), "--out", str(tmp_path / "d")])
    meta = load_meta(tmp_path / "d")
    for split in data.SPLITS:
        s = load_split(tmp_path / "d", split)
        assert s.tokens.dtype == np.uint16 and s.offsets.dtype == s.task_ids.dtype == s.prompt_lens.dtype == np.int64
        for i in range(len(s)):
            doc = s.document(i).tolist()
            text = enc.decode(doc)[: -len(EOT)]
            assert doc == enc.encode_ordinary(text) + [enc.eot_token]
            assert doc.count(enc.eot_token) == 1
            # encode_document (what sample.py uses) rebuilds the stored document from task and text
            task = meta["tasks"][s.task_ids[i]]
            body = text[len(f"[{task}] "):]
            assert data.encode_document(enc, body, task) == (doc, s.prompt_lens[i])
            assert enc.decode(doc[: s.prompt_lens[i]]) == f"[{task}]"


def test_jsonl_gives_the_same_dataset_as_csv(tmp_path):
    nasty_csv(tmp_path / "n.csv")
    objects = []
    for i, (ta, tb) in enumerate(zip(NASTY_TEXTS["a"], NASTY_TEXTS["b"])):
        objects += [{"id": i, "text": ta, "task": "a"}, {"id": i, "text": tb, "task": " b "}]
    objects += [{"text": None, "task": "a"}, {"text": "  ", "task": "b"}]
    objects += [{"text": "nan", "task": "a"}, {"text": "NaN", "task": "b"}]
    objects += [{"text": "no task", "task": None}, {"id": 95}]  # the last has neither key: dropped as empty
    write_jsonl(tmp_path / "n.jsonl", objects)
    main(["--csv", str(tmp_path / "n.csv"), "--out", str(tmp_path / "from_csv")])
    main(["--jsonl", str(tmp_path / "n.jsonl"), "--out", str(tmp_path / "from_jsonl")])
    a, b = folder_bytes(tmp_path / "from_csv"), folder_bytes(tmp_path / "from_jsonl")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a if k != "meta.json")
    assert load_meta(tmp_path / "from_csv")["counts"] == load_meta(tmp_path / "from_jsonl")["counts"]


def test_jsonl_numbers_become_task_names(tmp_path, enc):
    write_jsonl(tmp_path / "n.jsonl", [{"text": f"text {i}", "label": i % 2} for i in range(6)])
    main(["--jsonl", str(tmp_path / "n.jsonl"), "--task-col", "label", "--out", str(tmp_path / "d")])
    assert load_meta(tmp_path / "d")["tasks"] == ["0", "1"]
    assert any(doc == f"[1] text 1{EOT}" for _, _, doc, _ in documents(tmp_path / "d", enc))


def test_no_task_prompt(tmp_path, enc):
    main(["--csv", str(nasty_csv(tmp_path / "n.csv")), "--no-task-prompt", "--out", str(tmp_path / "d")])
    docs = documents(tmp_path / "d", enc)
    assert Counter(doc for _, _, doc, _ in docs) == Counter(t + EOT for texts in NASTY_TEXTS.values() for t in texts)
    assert all(prompt_len == 0 for *_, prompt_len in docs)
    assert load_meta(tmp_path / "d")["task_prompt"] is False


def test_reader_arrays_and_meta(tmp_path):
    main(["--csv", str(nasty_csv(tmp_path / "n.csv")), "--out", str(tmp_path / "d")])
    meta = load_meta(tmp_path / "d")
    assert meta["format"] == "bora-gpt2-data/2" and meta["encoding"] == "gpt2" and meta["tasks"] == ["a", "b"]
    assert meta["sources"] == [str(tmp_path / "n.csv")] and len(meta["fingerprint"]) == 64
    assert meta["args"]["split"] == [0.5, 0.25, 0.25] and meta["args"]["seed"] == 42
    for split in data.SPLITS:
        s = load_split(tmp_path / "d", split)
        assert len(s) == len(s.task_ids) == len(s.offsets) - 1 and s.offsets[-1] == len(s.tokens)
        for t, task in enumerate(meta["tasks"]):
            mine = s.task_ids == t
            assert meta["counts"][split][task]["docs"] == mine.sum()
            assert meta["counts"][split][task]["tokens"] == np.diff(s.offsets)[mine].sum()
        with pytest.raises(IndexError):
            s.document(len(s))


def test_scored_tokens_are_those_make_batch_scores(tmp_path):
    main(["--csv", str(nasty_csv(tmp_path / "n.csv")), "--out", str(tmp_path / "d")])
    for no_prompt in (False, True):
        if no_prompt:
            main(["--csv", str(tmp_path / "n.csv"), "--no-task-prompt", "--force", "--out", str(tmp_path / "d")])
        s = load_split(tmp_path / "d", "train")
        for block_size in (1, 2, 3, 5, 256):
            y = [data.make_batch(s, [i], block_size, "cpu")[1] for i in range(len(s))]
            assert data.scored_tokens(s, block_size).tolist() == [int((row != -1).sum()) for row in y]


def test_reader_errors_name_prepare_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*prepare_data.py"):
        load_meta(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="meta.json cannot be read.*prepare_data.py"):
        load_meta(tmp_path / "empty")
    main(["--csv", str(nasty_csv(tmp_path / "n.csv")), "--out", str(tmp_path / "d")])
    meta_path = tmp_path / "d" / "meta.json"
    meta = json.loads(meta_path.read_text())
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_split(tmp_path / "d", "dev")
    (tmp_path / "d" / "test" / "tokens.npy").unlink()
    with pytest.raises(ValueError, match="tokens.npy.*prepare_data.py"):
        load_split(tmp_path / "d", "test")
    meta_path.write_text(json.dumps({**meta, "encoding": "cl100k_base"}))
    with pytest.raises(ValueError, match="not a bora-gpt2-data/2 dataset of the gpt2 encoding.*prepare_data.py"):
        load_meta(tmp_path / "d")
    meta_path.write_text(json.dumps({**meta, "format": "something/0"}))
    with pytest.raises(ValueError, match="not a bora-gpt2-data/2 dataset.*prepare_data.py"):
        load_meta(tmp_path / "d")
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read.*prepare_data.py"):
        load_meta(tmp_path / "d")


def rewritten(folder: Path, split: str, name: str, array: np.ndarray, fingerprint: bool = True) -> Path:
    """folder with one array of a split replaced, and (fingerprint=True) meta.json's fingerprint taken anew, as a
    hand-made dataset or a buggy writer would have it: only the array's own checks can then find it."""
    np.save(folder / split / f"{name}.npy", array)
    if fingerprint:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "fingerprint": data.fingerprint(folder, meta["tasks"])}))
    return folder


def test_damaged_datasets_are_refused_saying_to_run_prepare_data_again(tmp_path):
    src = str(nasty_csv(tmp_path / "n.csv"))

    def damaged(name: str) -> Path:
        main(["--csv", src, "--out", str(tmp_path / name)])
        return tmp_path / name

    def refused(folder: Path, why: str, split: str = "test") -> None:
        with pytest.raises(ValueError, match=f"{why}.*prepare_data.py"):
            load_split(folder, split)

    d = damaged("flipped")  # same size, 200 bytes zeroed: only the fingerprint can tell
    tokens = bytearray((d / "test" / "tokens.npy").read_bytes())
    tokens[-20:] = bytes(20)
    (d / "test" / "tokens.npy").write_bytes(bytes(tokens))
    refused(d, "not those its meta.json's fingerprint describes")
    refused(d, "not those its meta.json's fingerprint describes", "train")  # the dataset is no longer itself
    d = damaged("empty-file")
    (d / "val" / "task_ids.npy").write_bytes(b"")
    refused(d, "fingerprint", "val")
    offsets = np.load(tmp_path / "empty-file" / "test" / "offsets.npy")
    refused(rewritten(damaged("offsets"), "test", "offsets", offsets + 1000), "does not cut the .* tokens into documents")
    task_ids = np.load(tmp_path / "offsets" / "test" / "task_ids.npy")
    refused(rewritten(damaged("ids"), "test", "task_ids", task_ids + 5), "task id, token id or prompt length is out of range")
    refused(rewritten(damaged("dtype"), "test", "task_ids", task_ids.astype(np.int32)), "int32 .*not a 1-D int64")
    refused(rewritten(damaged("count"), "test", "task_ids", 1 - task_ids), "not meta.json's counts")
    for key in ("counts", "task_prompt", "fingerprint"):
        d = damaged(f"no-{key}")
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != key}))
        with pytest.raises(ValueError, match="meta.json lacks .*prepare_data.py"):
            load_meta(d)


# ----------------------------------------------------------------------------------------------
# bad input


def test_missing_unreadable_and_binary_sources(tmp_path):
    out = ["--out", str(tmp_path / "d")]
    assert "does not exist" in fails(["--csv", str(tmp_path / "nope.csv"), *out], tmp_path)
    (tmp_path / "folder.csv").mkdir()
    assert "is not a file" in fails(["--csv", str(tmp_path / "folder.csv"), *out], tmp_path)
    (tmp_path / "empty.csv").write_bytes(b"")
    assert "is empty" in fails(["--csv", str(tmp_path / "empty.csv"), *out], tmp_path)
    (tmp_path / "junk.bin").write_bytes(bytes(range(256)) * 64)
    assert "not a UTF-8 text file" in fails(["--csv", str(tmp_path / "junk.bin"), *out], tmp_path)
    assert "not a UTF-8 text file" in fails(["--jsonl", str(tmp_path / "junk.bin"), *out], tmp_path)
    (tmp_path / "utf16.csv").write_bytes("text,task\nhello,a\n".encode("utf-16"))
    assert "NUL bytes" in fails(["--csv", str(tmp_path / "utf16.csv"), *out], tmp_path)


def test_missing_columns_list_the_existing_ones(tmp_path):
    write_csv(tmp_path / "s.csv", ["lyrics", "mood"], [["la la", "joy"]])
    message = fails(["--csv", str(tmp_path / "s.csv"), "--out", str(tmp_path / "d")], tmp_path)
    assert "no text column 'text'" in message and "'lyrics', 'mood'" in message and "--text-col" in message
    message = fails(["--csv", str(tmp_path / "s.csv"), "--text-col", "lyrics", "--out", str(tmp_path / "d")], tmp_path)
    assert "no task column 'task'" in message and "--task-col" in message
    (tmp_path / "semi.csv").write_text("text;task\nhello;a\n")
    assert "comma-separated" in fails(["--csv", str(tmp_path / "semi.csv"), "--out", str(tmp_path / "d")], tmp_path)
    write_jsonl(tmp_path / "s.jsonl", [{"body": "x", "task": "a"}])
    message = fails(["--jsonl", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "d")], tmp_path)
    assert "no text column 'text'" in message and "'body', 'task'" in message


def test_malformed_jsonl_names_the_line(tmp_path):
    good = json.dumps({"text": "fine", "task": "a"})
    (tmp_path / "bad.jsonl").write_text(f"{good}\n\n{good}\n{{\"text\": \"unterminated\n{good}\n")
    message = fails(["--jsonl", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "d")], tmp_path)
    assert "line 4: not valid JSON" in message
    (tmp_path / "list.jsonl").write_text(f"{good}\n[1, 2]\n")
    message = fails(["--jsonl", str(tmp_path / "list.jsonl"), "--out", str(tmp_path / "d")], tmp_path)
    assert "line 2: expected a JSON object, found list" in message
    (tmp_path / "nested.jsonl").write_text(f"{good}\n" + json.dumps({"text": ["a"], "task": "a"}) + "\n")
    message = fails(["--jsonl", str(tmp_path / "nested.jsonl"), "--out", str(tmp_path / "d")], tmp_path)
    assert "line 2: expected text, found a JSON list" in message


def test_invalid_utf8_is_replaced_and_counted(tmp_path, enc, capsys):
    rows = [f"song {i},a\n".encode() for i in range(5)]
    rows[1] = b"bad \xff byte,a\n"  # one invalid byte
    rows[2] = b"cut \xc3( and \xe2\x82 end,a\n"  # two truncated sequences
    rows[3] = "a real \ufffd in the file,a\n".encode()  # valid UTF-8: not counted
    (tmp_path / "u.csv").write_bytes(b"\xef\xbb\xbftext,task\n" + b"".join(rows))  # with a byte-order mark
    main(["--csv", str(tmp_path / "u.csv"), "--out", str(tmp_path / "d")])
    assert "replaced 3 invalid UTF-8 sequence(s)" in capsys.readouterr().err
    assert load_meta(tmp_path / "d")["rows"]["invalid_utf8_replaced"] == 3
    docs = {doc for _, _, doc, _ in documents(tmp_path / "d", enc)}
    assert f"[a] bad \ufffd byte{EOT}" in docs and f"[a] cut \ufffd( and \ufffd end{EOT}" in docs


def test_fields_longer_than_the_csv_default_limit(tmp_path, enc):
    long_text = "word " * 60_000  # 300,000 characters; the csv module's default limit is 131,072
    rows = [[long_text, "a"], ["a2", "a"], ["a3", "a"], ["b1", "b"], ["b2", "b"], ["b3", "b"]]
    write_csv(tmp_path / "l.csv", ["text", "task"], rows)
    main(["--csv", str(tmp_path / "l.csv"), "--out", str(tmp_path / "d")])
    assert f"[a] {long_text}{EOT}" in {doc for _, _, doc, _ in documents(tmp_path / "d", enc)}


def test_task_too_small_to_split(tmp_path, capsys):
    rows = [[f"text {i}", "big"] for i in range(8)] + [["alone", "solo"], ["pair 1", "duo"], ["pair 2", "duo"]]
    write_csv(tmp_path / "s.csv", ["text", "task"], rows)
    message = fails(["--csv", str(tmp_path / "s.csv"), "--out", str(tmp_path / "d")], tmp_path)
    assert "'solo' (1)" in message and "'duo' (2)" in message and "fewer than the 3 documents" in message
    assert "--drop-small-tasks" in message
    main(["--csv", str(tmp_path / "s.csv"), "--drop-small-tasks", "--out", str(tmp_path / "d")])
    assert load_meta(tmp_path / "d")["tasks"] == ["big"]
    assert "dropped task 'solo': 1 document(s)" in capsys.readouterr().err
    # no split may be empty: train.py validates on val, eval.py measures on test
    message = fails(["--csv", str(tmp_path / "s.csv"), "--split", "0.5,0.5,0", "--out", str(tmp_path / "e")], tmp_path)
    assert "--split '0.5,0.5,0'" in message and "> 0" in message


def test_no_usable_rows(tmp_path):
    write_csv(tmp_path / "s.csv", ["text", "task"], [["", "a"], ["nan", "b"]])
    assert "no usable rows" in fails(["--csv", str(tmp_path / "s.csv"), "--out", str(tmp_path / "d")], tmp_path)


def test_bad_options(tmp_path):
    src, out = str(nasty_csv(tmp_path / "n.csv")), str(tmp_path / "d")
    for split in ("0.5,0.5", "0.5,0.3,0.3", "a,b,c", "0,0.5,0.5", "0.5,-0.25,0.75"):
        assert "--split" in fails(["--csv", src, "--split", split, "--out", out], tmp_path)
    message = fails(["--csv", src, "--preset", "talkofnorway", "--total", "10", "--out", out], tmp_path)
    assert "--total applies only to --preset spotify or runs without --preset" in message
    message = fails(["--csv", src, "--num-tasks", "3", "--out", out], tmp_path)
    assert "--num-tasks applies only to --preset talkofnorway" in message
    message = fails(["--csv", src, "--preset", "spotify", "--tasks", "a", "--out", out], tmp_path)
    assert "--tasks applies only to runs without --preset" in message
    assert "task(s) 'zzz'" in fails(["--csv", src, "--tasks", "a,zzz", "--out", out], tmp_path)
    with pytest.raises(SystemExit):  # argparse: two sources, or none
        main(["--csv", src, "--jsonl", src])


# ----------------------------------------------------------------------------------------------
# the output folder


def test_existing_output_needs_force(tmp_path, enc):
    src, out = str(nasty_csv(tmp_path / "n.csv")), tmp_path / "d"
    main(["--csv", src, "--out", str(out)])
    first = folder_bytes(out)
    assert "already exists; add --force" in fails(["--csv", src, "--out", str(out)], tmp_path)
    assert folder_bytes(out) == first
    main(["--csv", src, "--no-task-prompt", "--force", "--out", str(out)])
    assert load_meta(out)["task_prompt"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "n.csv"]  # no temp or old folders left
    # --force never deletes a folder that prepare_data.py did not write
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "refusing to replace" in fails(["--csv", src, "--force", "--out", str(tmp_path / "mine")], tmp_path)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_force_through_a_link_replaces_the_folder_it_points_to(tmp_path):
    src, big = str(nasty_csv(tmp_path / "n.csv")), tmp_path / "big-disk"
    big.mkdir()
    main(["--csv", src, "--out", str(big / "d")])
    (tmp_path / "d").symlink_to(big / "d")
    main(["--csv", src, "--seed", "7", "--force", "--out", str(tmp_path / "d")])
    assert (tmp_path / "d").is_symlink() and load_meta(big / "d")["args"]["seed"] == 7
    assert hidden_folders(tmp_path) == hidden_folders(big) == []


def test_interruption_leaves_no_folder(tmp_path, monkeypatch):
    src, out = str(nasty_csv(tmp_path / "n.csv")), tmp_path / "data" / "d"
    out.parent.mkdir()
    def interrupt(*args):  # Ctrl-C once the split files are written, before the folder is in place
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pd_, "fingerprint", interrupt)
        assert fails(["--csv", src, "--out", str(out)], tmp_path).startswith("interrupted: ")
    # with --force, an interrupted run keeps the old folder untouched
    main(["--csv", src, "--out", str(out)])
    old = folder_bytes(out)
    monkeypatch.setattr(pd_, "fingerprint", interrupt)
    assert fails(["--csv", src, "--force", "--seed", "7", "--out", str(out)], tmp_path).startswith("interrupted: ")
    assert folder_bytes(out) == old


def test_force_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    src, out = str(nasty_csv(tmp_path / "n.csv")), tmp_path / "d"
    main(["--csv", src, "--out", str(out)])
    old = folder_bytes(out)
    real_rename = os.rename

    def rename(src_path, dst_path):  # the finished new folder cannot be moved into place
        if Path(src_path).name.startswith(".d.tmp-"):
            raise OSError(28, "No space left on device")
        real_rename(src_path, dst_path)

    monkeypatch.setattr(pd_.os, "rename", rename)
    monkeypatch.setattr(pd_, "exchange", lambda a, b: False)  # a system that cannot swap in one step
    assert "No space left on device" in fails(["--csv", src, "--force", "--seed", "7", "--out", str(out)], tmp_path)
    assert folder_bytes(out) == old

    def exchange(a, b):  # where it can, the swap itself fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd_, "exchange", exchange)
    assert "No space left on device" in fails(["--csv", src, "--force", "--seed", "7", "--out", str(out)], tmp_path)
    assert folder_bytes(out) == old


# prepare_data.py in a process of its own, stopped at one moment of its run: killed (os._exit, as kill -9 does,
# nothing cleaned up) right after the one-step swap, or, on a system without one, between moving the old dataset
# aside and moving the new one in; or paused for a signal before the folder is complete, or inside the swap.
STOPPED_PREPARE = """
import os, sys, time
import cli
cli.exit_on_interrupt("__main__")
import prepare_data
moment, real_exchange, real_rename = sys.argv[1], prepare_data.exchange, os.rename

def pause():  # until the test's signal: it raises KeyboardInterrupt here, or, during the swap, waits for its end
    print("paused", flush=True)
    for _ in range(6000):
        if cli.interrupts.pending:
            break
        time.sleep(0.01)

def exchange(a, b):
    if moment == "between the renames":
        return False  # a system that cannot swap in one step
    assert real_exchange(a, b)
    if moment == "killed after the swap":
        os._exit(9)
    pause()
    return True

def rename(src, dst):
    real_rename(src, dst)
    if ".old-" in str(dst):
        os._exit(9)

def fingerprint(*args):
    pause()
    return real_fingerprint(*args)

prepare_data.exchange, os.rename = exchange, rename
real_fingerprint, prepare_data.fingerprint = prepare_data.fingerprint, fingerprint if moment == "writing" else prepare_data.fingerprint
prepare_data.main(sys.argv[2:])
"""


def stopped_prepare(moment: str, argv: list[str], signal_=None) -> subprocess.CompletedProcess | tuple[int, str]:
    run = subprocess.Popen([sys.executable, "-c", STOPPED_PREPARE, moment, *argv], cwd=Path(pd_.__file__).parent,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if signal_:
            while run.stdout.readline().strip() != "paused":
                assert run.poll() is None, run.stderr.read()
            run.send_signal(signal_)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    return run.returncode, err


def hidden_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_kill_at_any_moment_of_the_swap_leaves_a_whole_dataset(tmp_path, capsys):
    """kill -9 right after the swap: --out holds the new dataset; between the two renames of a system without a
    one-step swap: --out is missing for that moment, and the next run puts the old one back. Either way the
    next run removes what the killed one left."""
    src, out = str(nasty_csv(tmp_path / "n.csv")), tmp_path / "d"
    main(["--csv", src, "--out", str(out)])
    main(["--csv", src, "--seed", "7", "--out", str(tmp_path / "new")])
    new = load_meta(tmp_path / "new")["fingerprint"]
    assert stopped_prepare("killed after the swap", ["--csv", src, "--seed", "7", "--force", "--out", str(out)])[0] == 9
    assert load_meta(out)["fingerprint"] == new and all(len(load_split(out, s)) for s in data.SPLITS)  # whole, new
    assert len(hidden_folders(tmp_path)) == 1  # the old dataset, not yet deleted
    main(["--csv", src, "--seed", "7", "--force", "--out", str(out)])
    assert "removed " in capsys.readouterr().err and hidden_folders(tmp_path) == []

    main(["--csv", src, "--force", "--out", str(out)])
    old = folder_bytes(out)
    assert stopped_prepare("between the renames", ["--csv", src, "--seed", "7", "--force", "--out", str(out)])[0] == 9
    assert not out.exists() and len(hidden_folders(tmp_path)) == 2  # the old dataset moved aside, the new one
    with pytest.raises(SystemExit, match="already exists"):  # any next run: it puts the old dataset back first
        main(["--csv", src, "--out", str(out)])
    assert folder_bytes(out) == old and hidden_folders(tmp_path) == []
    assert "put the old dataset back" in capsys.readouterr().err


def test_a_signal_during_a_run_is_one_line_that_says_what_it_left(tmp_path):
    src, out = str(nasty_csv(tmp_path / "n.csv")), tmp_path / "d"
    main(["--csv", src, "--out", str(out)])
    old = folder_bytes(out)
    argv = ["--csv", src, "--seed", "7", "--force", "--out", str(out)]
    code, err = stopped_prepare("writing", argv, signal.SIGTERM)  # the new dataset half-written
    assert code == 1 and err.endswith(f"\ninterrupted: {out} is as it was before this run\n")
    assert all(line.startswith("warning: ") for line in err.splitlines()[:-1])  # the warnings of pass 1
    assert folder_bytes(out) == old and hidden_folders(tmp_path) == []
    code, err = stopped_prepare("swapping", argv, signal.SIGINT)  # Ctrl-C waits for the swap to end
    assert code == 1 and err.endswith(f"\ninterrupted: {out} holds the new dataset (the interruption came as it was "
                                      "put in place)\n"), err
    assert load_meta(out)["args"]["seed"] == 7 and hidden_folders(tmp_path) == []


def test_default_out_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["--csv", str(nasty_csv(tmp_path / "lyrics.csv"))])
    assert load_meta(tmp_path / "data" / "lyrics")["tasks"] == ["a", "b"]


# ----------------------------------------------------------------------------------------------
# splits and determinism


def test_same_seed_gives_byte_identical_folders(tmp_path, monkeypatch):
    rows = [[f"document number {i}", "abc"[i % 3]] for i in range(60)]
    src, out = str(write_csv(tmp_path / "s.csv", ["text", "task"], rows)), tmp_path / "d"
    main(["--csv", src, "--force", "--out", str(out)])
    first = folder_bytes(out)
    main(["--csv", src, "--force", "--out", str(out)])
    assert folder_bytes(out) == first
    main(["--csv", src, "--force", "--seed", "43", "--out", str(out)])
    other = folder_bytes(out)
    assert other["train/tokens.npy"] != first["train/tokens.npy"]  # other documents in each split ...
    assert load_meta(out)["counts"]["val"].keys() == {"a", "b", "c"}
    assert [load_meta(out)["counts"][s]["a"]["docs"] for s in data.SPLITS] == [10, 5, 5]  # ... of the same sizes


def test_split_sizes_per_task(tmp_path):
    sizes = {"a": 10, "b": 3, "c": 7, "d": 101}
    rows = [[f"{task} {i}", task] for task, n in sizes.items() for i in range(n)]
    src = str(write_csv(tmp_path / "s.csv", ["text", "task"], rows))
    for split_arg, fractions in (("0.5,0.25,0.25", (0.5, 0.25, 0.25)), ("0.8,0.1,0.1", (0.8, 0.1, 0.1))):
        out = tmp_path / split_arg
        main(["--csv", src, "--split", split_arg, "--drop-small-tasks", "--out", str(out)])
        meta = load_meta(out)
        for task in meta["tasks"]:
            got = [meta["counts"][s][task]["docs"] for s in data.SPLITS]
            assert got == pd_.largest_remainder(sizes[task], fractions)
    assert [load_meta(tmp_path / "0.5,0.25,0.25")["counts"][s]["a"]["docs"] for s in data.SPLITS] == [5, 3, 2]


def test_largest_remainder():
    assert pd_.largest_remainder(10, [0.5, 0.25, 0.25]) == [5, 3, 2]
    assert pd_.largest_remainder(3, [0.5, 0.25, 0.25]) == [1, 1, 1]
    assert pd_.largest_remainder(10, [0.7, 0.2, 0.1]) == [7, 2, 1]  # 0.7 * 10 in floats is 7.000000000000001
    assert pd_.largest_remainder(7, [1, 1, 1]) == [3, 2, 2]
    for n in range(0, 200):
        shares = pd_.largest_remainder(n, [0.5, 0.25, 0.25])
        assert sum(shares) == n and all(abs(s - n * f) < 1 for s, f in zip(shares, [0.5, 0.25, 0.25]))


def test_tasks_and_cap_without_preset(tmp_path):
    rows = [[f"{task} text {i}", task] for task in ("x", "y", "z") for i in range(12)]
    src = str(write_csv(tmp_path / "s.csv", ["text", "task"], rows))
    main(["--csv", src, "--tasks", "z,x", "--max-docs-per-task", "5", "--out", str(tmp_path / "d")])
    meta = load_meta(tmp_path / "d")
    assert meta["tasks"] == ["x", "z"]  # sorted, whatever order --tasks gave
    assert [sum(meta["counts"][s][t]["docs"] for s in data.SPLITS) for t in meta["tasks"]] == [5, 5]


# ----------------------------------------------------------------------------------------------
# presets


def spotify_csv(path: Path, per_emotion: dict[str, int]) -> Path:
    header = ["Artist(s)", "song", "text", "Length", "emotion", "Genre"]
    rows = [
        [f"artist {i}", f"song {i}", f"{emotion} lyric number {i}\nsecond line", "03:12", emotion, "pop"]
        for emotion, n in per_emotion.items()
        for i in range(n)
    ]
    rows += [["x", "y", "", "00:00", "joy", "pop"]] * 5  # empty lyrics do not count towards a size
    return write_csv(path, header, rows)


SPOTIFY_COUNTS = {"joy": 61, "sadness": 45, "anger": 30, "fear": 21, "love": 20, "surprise": 12, "True": 11, "pink": 1}


def test_spotify_preset_keeps_big_emotions_and_their_ratio(tmp_path):
    src = str(spotify_csv(tmp_path / "spotify.csv", SPOTIFY_COUNTS))
    main(["--csv", src, "--preset", "spotify", "--min-task-size", "12", "--total", "40", "--out", str(tmp_path / "d")])
    meta = load_meta(tmp_path / "d")
    kept = {e: n for e, n in sorted(SPOTIFY_COUNTS.items()) if n >= 12}  # surprise (12) in, True (11) out
    assert meta["tasks"] == sorted(kept)
    taken = {t: sum(meta["counts"][s][t]["docs"] for s in data.SPLITS) for t in meta["tasks"]}
    assert sum(taken.values()) == 40
    for t, n in taken.items():  # within one of the exact proportional quota
        assert abs(n - 40 * kept[t] / sum(kept.values())) < 1
    assert taken == dict(zip(kept, pd_.largest_remainder(40, list(kept.values()))))
    assert meta["args"]["text_col"] == "text" and meta["args"]["task_col"] == "emotion"


def test_total_samples_any_corpus_in_its_task_proportions(tmp_path):
    """--total without a preset (a smaller run of the default data, say): small tasks stay small."""
    src = str(spotify_csv(tmp_path / "s.csv", {"joy": 60, "fear": 20, "surprise": 12}))
    main(["--csv", src, "--task-col", "emotion", "--total", "46", "--out", str(tmp_path / "d")])
    meta = load_meta(tmp_path / "d")
    assert {t: sum(meta["counts"][s][t]["docs"] for s in data.SPLITS) for t in meta["tasks"]} == \
        {"fear": 10, "joy": 30, "surprise": 6}
    assert "is more than the 92 documents" in fails(["--csv", src, "--task-col", "emotion", "--total", "93", "--out",
                                                     str(tmp_path / "e")], tmp_path)


def test_spotify_preset_errors(tmp_path):
    src = str(spotify_csv(tmp_path / "spotify.csv", SPOTIFY_COUNTS))
    message = fails(["--csv", src, "--preset", "spotify", "--out", str(tmp_path / "d")], tmp_path)
    assert "no 'emotion' value has at least 5000 documents" in message and "'joy', has 61" in message
    argv = ["--csv", src, "--preset", "spotify", "--min-task-size", "12", "--total", "1000"]
    message = fails([*argv, "--out", str(tmp_path / "d")], tmp_path)
    assert "--total 1000 is more than the 189 documents" in message


def test_spotify_allocation_at_paper_scale():
    """4933 songs over the six emotions of the full file: integers, summing exactly, each within one of its quota."""
    counts = {"anger": 28_000, "fear": 9_000, "joy": 190_000, "love": 12_000, "sadness": 160_000, "surprise": 5_100}
    args = argparse.Namespace(preset="spotify", task_col="emotion", min_task_size=5000, total=4933)
    take = pd_.choose_tasks({**counts, "True": 40, "thirst": 3}, args)
    assert list(take) == sorted(counts) and sum(take.values()) == 4933
    assert all(abs(take[t] - 4933 * n / sum(counts.values())) < 1 for t, n in counts.items())


def test_talkofnorway_preset(tmp_path, enc, capsys):
    speech = "Dette er en tale i Stortinget som er lang nok, nummer {}."  # >= 40 characters
    speakers = {
        "Abid Q. Raja": 201,  # more than 200: kept
        "Aase Olsen": 200,  # not more than 200: out
        "Bjørn Dæhlie": 999,  # fewer than 1000: kept
        "Anne Berit": 1000,  # not fewer than 1000: out
        "Carl I. Hagen": 300,  # qualifies, but comes third alphabetically
    }
    rows = [[name, speech.format(i), "2015"] for name, n in speakers.items() for i in range(n)]
    rows += [["Børge Brende", speech.format(i), "2015"] for i in range(195)]
    rows += [["Børge Brende", "Kort innlegg.", "2015"]] * 10  # 205 speeches, only 195 long enough: out
    rows += [["Abid Q. Raja", "For kort.", "2015"]] * 3  # short speeches never reach the output
    src = str(write_csv(tmp_path / "ton.csv", ["rep_name", "text", "date"], rows))
    main(["--csv", src, "--preset", "talkofnorway", "--num-tasks", "2", "--out", str(tmp_path / "d")])
    meta = load_meta(tmp_path / "d")
    assert meta["tasks"] == ["abid q raja", "bjørn dæhlie"]  # lower case, no dots, first two alphabetically
    assert [meta["counts"][s]["abid q raja"]["docs"] for s in data.SPLITS] == [101, 50, 50]
    assert [meta["counts"][s]["bjørn dæhlie"]["docs"] for s in data.SPLITS] == [499, 250, 250]
    docs = documents(tmp_path / "d", enc)
    assert all(doc.startswith(f"[{task}] Dette er en tale") for _, task, doc, _ in docs)
    assert "dropped 13 row(s): text shorter than 40 characters" in capsys.readouterr().err
    # all qualifying speakers when fewer than --num-tasks (default 25) qualify
    main(["--csv", src, "--preset", "talkofnorway", "--out", str(tmp_path / "e")])
    assert load_meta(tmp_path / "e")["tasks"] == ["abid q raja", "bjørn dæhlie", "carl i hagen"]
    assert "only 3 tasks" in capsys.readouterr().err


def reference_talkofnorway(rows: list[tuple[str, str]], num_tasks: int = 25) -> dict[str, set[str]]:
    """The BoRA paper's selection as its code reads, {task: its distinct texts}: count the speeches of >= 40
    characters per raw rep_name, repeats included; keep the names with 200 < n < 1000; name them in lower case
    without dots; the first num_tasks names; every distinct text of a kept name, per task."""
    speeches = [(name, text) for name, text in rows if len(text) >= 40]
    n = Counter(name for name, _ in speeches)
    task = {name: name.lower().replace(".", "") for name in n if 200 < n[name] < 1000}
    return {t: {text for name, text in speeches if task.get(name) == t} for t in sorted(set(task.values()))[:num_tasks]}


def test_talkofnorway_selects_as_the_reference_code(tmp_path, enc):
    """Speakers at 200, 201 and 1000 speeches with repeats among them, and names that collide by case and dots:
    exactly the reference rule's speakers, and no text twice in a task (it could land in train and test)."""
    def speeches(name: str, n: int, repeats: int = 0, start: int = 0) -> list[tuple[str, str]]:
        texts = [f"Tale nummer {i} i Stortinget, lang nok for filteret." for i in range(start, start + n - repeats)]
        return [(name, text) for text in texts + texts[:repeats]]

    rows = (speeches("Per Olsen", 201, repeats=3)  # 198 distinct: kept, since the rule counts repeats
            + speeches("Kari Lie", 200, repeats=2)  # not more than 200: out
            + speeches("Ola Nordmann", 1000, repeats=25)  # 975 distinct, but 1000 speeches: out
            + speeches("Anne K. Berg", 230) + speeches("anne k. berg", 210, start=225)  # both in; 5 texts in both
            + speeches("Anne K Berg", 190, start=1000)  # the same task's name, but too few speeches: not in it
            + speeches("Eva Ek.", 150) + speeches("eva ek", 150)  # 300 together, each too few: out
            + [("Per Olsen", "For kort.")] * 5)  # short speeches count for nobody
    src = str(write_csv(tmp_path / "ton.csv", ["rep_name", "text"], [list(r) for r in rows]))
    main(["--csv", src, "--preset", "talkofnorway", "--out", str(tmp_path / "d")])
    meta, expected = load_meta(tmp_path / "d"), reference_talkofnorway(rows)
    assert meta["tasks"] == sorted(expected) == ["anne k berg", "per olsen"]
    docs = Counter((task, doc) for _, task, doc, _ in documents(tmp_path / "d", enc))
    assert max(docs.values()) == 1  # every task's documents distinct
    for task, texts in expected.items():
        assert {doc for t, doc in docs if t == task} == {f"[{task}] {text}{EOT}" for text in texts}
    assert meta["task_rows"] == {"anne k berg": {"rows": 440, "distinct": 435}, "per olsen": {"rows": 201, "distinct": 198}}


def test_a_task_named_global_is_refused(tmp_path):
    rows = [[f"text {i}", task] for task in ("global", "local") for i in range(6)]
    message = fails(["--csv", str(write_csv(tmp_path / "s.csv", ["text", "task"], rows)), "--out", str(tmp_path / "d")],
                    tmp_path)
    assert "a task is named 'global'" in message and "shared mean" in message
    assert pd_.RESERVED == bora.GLOBAL_NAME  # the name sample.py and export.py read as Θ


def test_talkofnorway_preset_on_the_wrong_file(tmp_path):
    src = str(spotify_csv(tmp_path / "spotify.csv", {"joy": 5}))
    message = fails(["--csv", src, "--preset", "talkofnorway", "--out", str(tmp_path / "d")], tmp_path)
    assert "no task column 'rep_name'" in message and "'emotion'" in message
    rows = [["Someone", "A long enough speech for the filter to keep it, surely."]] * 50
    src = str(write_csv(tmp_path / "ton.csv", ["rep_name", "text"], rows))
    message = fails(["--csv", src, "--preset", "talkofnorway", "--out", str(tmp_path / "d")], tmp_path)
    assert "more than 200 and fewer than 1000" in message


# ----------------------------------------------------------------------------------------------
# duplicates, the dataset's identity, the default corpus


def test_exact_duplicates_within_a_task_are_dropped_and_counted(tmp_path, enc, capsys):
    rows = [[f"text {i}", "a"] for i in range(6)] + [["text 0", "a"]] * 3 + [["text 0", "b"]] + \
           [[f"other {i}", "b"] for i in range(5)]
    main(["--csv", str(write_csv(tmp_path / "s.csv", ["text", "task"], rows)), "--out", str(tmp_path / "d")])
    meta = load_meta(tmp_path / "d")
    assert meta["rows"]["dropped"] == {"exact duplicate of an earlier text of its task": 3}
    assert "dropped 3 row(s): exact duplicate" in capsys.readouterr().err
    texts = Counter((task, doc) for _, task, doc, _ in documents(tmp_path / "d", enc))
    assert max(texts.values()) == 1 and texts[("b", "[b] text 0" + EOT)] == 1  # the same text in another task stays


def test_another_seed_or_split_gives_another_fingerprint(tmp_path):
    src = str(write_csv(tmp_path / "s.csv", ["text", "task"], [[f"doc {i}", "ab"[i % 2]] for i in range(40)]))
    prints = {}
    for name, extra in (("a", []), ("again", []), ("seed", ["--seed", "7"]), ("split", ["--split", "0.6,0.2,0.2"])):
        main(["--csv", src, "--out", str(tmp_path / name), *extra])
        prints[name] = load_meta(tmp_path / name)["fingerprint"]
    assert prints["a"] == prints["again"] and len({prints["a"], prints["seed"], prints["split"]}) == 3


def test_talkofnorway_counts_raw_names_and_reports_names_that_collide(tmp_path, capsys):
    speech = "Dette er en tale i Stortinget som er lang nok, nummer {} av {}."
    speakers = {"Per A. Hansen": 150, "Per A Hansen": 150,  # 300 together, but each raw name has too few
                "Kari Nordmann": 250, "Kari. Nordmann": 220}  # both qualify, and both become "kari nordmann"
    rows = [[name, speech.format(i, name)] for name, n in speakers.items() for i in range(n)]
    main(["--csv", str(write_csv(tmp_path / "ton.csv", ["rep_name", "text"], rows)), "--preset", "talkofnorway",
          "--out", str(tmp_path / "d")])
    meta = load_meta(tmp_path / "d")
    assert meta["tasks"] == ["kari nordmann"]
    assert sum(meta["counts"][s]["kari nordmann"]["docs"] for s in data.SPLITS) == 470
    assert "'Kari Nordmann', 'Kari. Nordmann' all become 'kari nordmann'" in capsys.readouterr().err


def test_gzipped_jsonl_with_integer_labels(tmp_path):
    import gzip
    lines = "".join(json.dumps({"text": f"tweet {i}", "label": i % 3}) + "\n" for i in range(30))
    with gzip.open(tmp_path / "t.jsonl.gz", "wt") as f:
        f.write(lines)
    main(["--jsonl", str(tmp_path / "t.jsonl.gz"), "--task-col", "label", "--out", str(tmp_path / "d")])
    assert load_meta(tmp_path / "d")["tasks"] == ["0", "1", "2"]


def test_many_tasks(tmp_path):
    """Task ids are dictionary look-ups: 5000 tasks take as long as their rows, not tasks × rows."""
    rows = [[f"text {i} of {t}", f"task{t}"] for t in range(5000) for i in range(3)]
    main(["--csv", str(write_csv(tmp_path / "s.csv", ["text", "task"], rows)), "--out", str(tmp_path / "d")])
    meta = load_meta(tmp_path / "d")
    assert len(meta["tasks"]) == 5000 and all(meta["counts"]["test"][t]["docs"] == 1 for t in meta["tasks"])
