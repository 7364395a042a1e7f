"""The README teaches: its equation-to-code table must point at code that exists, and every command
it shows must be accepted by the script it calls (the flows themselves run in the end-to-end tests)."""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def code_references() -> list[tuple[str, str]]:
    """(module, dotted name) for every `file.py::Name.attr` written in the README."""
    return re.findall(r"`(\w+)\.py::([\w.]+)`", README)


def readme_commands() -> list[list[str]]:
    """Every `python SCRIPT.py ARGS` inside the README's bash blocks, as an argv list."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for script, args in re.findall(r"python (\w+)\.py([^;&\n]*)", block):
            args = re.sub(r"#.*", "", args).replace("$tau", "100")  # drop comments; the sweep's variable
            commands.append([script, *shlex.split(args)])
    return commands


def test_the_readme_names_code_and_commands():
    assert len(code_references()) >= 10
    assert {c[0] for c in readme_commands()} >= {"prepare_data", "train", "eval", "sample", "export", "bench"}


@pytest.mark.parametrize("module, name", code_references())
def test_equation_table_points_at_existing_code(module, name):
    obj = importlib.import_module(module)
    for part in name.split("."):
        assert hasattr(obj, part), f"README names {module}.py::{name}, but {part!r} does not exist"
        obj = getattr(obj, part)
    assert callable(obj)


class Parsed(Exception):
    """Raised right after a script's arguments parsed, so that nothing is actually run."""


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda argv: " ".join(argv)[:60])
def test_readme_command_is_accepted_by_its_script(argv, monkeypatch):
    real_parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real_parse_args(self, args, namespace))  # a bad flag exits (SystemExit) instead

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    script = importlib.import_module(argv[0])
    with pytest.raises(Parsed):
        script.main(argv[1:])
