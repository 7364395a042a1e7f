"""prepare_data.py: reading nasty CSV/JSONL files, the presets' selection, splits, tokenisation,
the output folder's atomicity and determinism, and the reader used by train.py and eval.py.

Every test writes its own small source file and runs the command line through main(argv).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

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
    # a split with a zero fraction needs no document
    main(["--csv", str(tmp_path / "s.csv"), "--split", "0.5,0.5,0", "--drop-small-tasks", "--out", str(tmp_path / "e")])
    assert load_meta(tmp_path / "e")["tasks"] == ["big", "duo"]


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
    assert "No space left on device" in fails(["--csv", src, "--force", "--seed", "7", "--out", str(out)], tmp_path)
    assert folder_bytes(out) == old


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
    take, _ = pd_.choose_tasks({**counts, "True": 40, "thirst": 3}, args)
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
