"""The console examples of README.md and docs/applications.md, run for real.

Every ```console block of those files holds commands (``$ robaudit ...``, continued with a
trailing backslash) each followed by its output; ``$ echo $?`` shows the previous command's
exit code. This script reruns the commands as a user would in a terminal 160 columns wide,
in a scratch folder with a copy of the repository's ``sample_models/`` (so files the examples write,
such as ``scaled.onnx``, land there), and either compares (the default; exit 1 on a
difference) or rewrites the outputs in place::

    python tests/readme_examples.py            # compare
    python tests/readme_examples.py --write    # regenerate the examples from real runs

Only trailing spaces are normalised (rich pads title lines); stdout is what is shown. The figures of
``inject`` on an int8 model are onnxruntime's integer kernels', which differ by CPU (without AVX-512 VNNI
its u8×s8 products may saturate): those examples are compared with every number and table rule masked.
``tests/test_readme_examples.py`` runs the comparison in the test suite.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Every file whose console examples are real output.
FILES = (README, ROOT / "docs" / "applications.md")
#: The terminal width the examples are shown at (rich's default when output is piped).
WIDTH = 160


@dataclass
class Example:
    """One command of a console block and the output the README shows for it."""

    command: str
    #: README line indices [start, end) of the shown output.
    start: int
    end: int
    shown: list[str]


def _console_blocks(lines: list[str]) -> list[tuple[int, int]]:
    """[start, end) line ranges of the contents of every ```console block."""
    blocks, start = [], None
    for number, line in enumerate(lines):
        if start is None and line.strip() == "```console":
            start = number + 1
        elif start is not None and line.strip() == "```":
            blocks.append((start, number))
            start = None
    return blocks


def _is_runnable(command: str) -> bool:
    """A plain ``robaudit`` command (or ``echo $?``); shell loops, pipes and redirections are not rerun."""
    if command.strip() == "echo $?":
        return True
    return command.startswith("robaudit ") and not any(c in command for c in ("|", ">", "<", ";", "&", "$", "*"))


def examples(lines: list[str]) -> list[Example]:
    """Every ``$`` command of the console blocks, with the lines of output shown for it.

    A block with any command that is not a plain ``robaudit`` command (a shell loop, a
    redirection, ``cmp``) is left as written: it is not rerun.
    """
    found = []
    for start, end in _console_blocks(lines):
        commands = _block_examples(lines, start, end)
        if all(_is_runnable(example.command) for example in commands):
            found += commands
    return found


def _block_examples(lines: list[str], start: int, end: int) -> list[Example]:
    """The commands of one console block (lines [start, end)) with their shown output."""
    found = []
    number = start
    while number < end:
        if not lines[number].startswith("$ "):
            number += 1
            continue
        command = lines[number][2:]
        while command.endswith("\\"):
            number += 1
            command = command[:-1].rstrip() + " " + lines[number].strip()
        number += 1
        first = number
        while number < end and not lines[number].startswith("$ "):
            number += 1
        found.append(Example(command, first, number, lines[first:number]))
    return found


def run(command: str, previous: int, cwd: Path = ROOT) -> tuple[list[str], int]:
    """The stdout lines and exit code of one example command (``echo $?`` prints ``previous``)."""
    if command.strip() == "echo $?":
        return [str(previous)], 0
    argv = shlex.split(command)
    if argv[0] != "robaudit":
        raise ValueError(f"README example is not a robaudit command: {command}")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "ROBAUDIT_DEBUG")}
    env["COLUMNS"] = str(WIDTH)
    proc = subprocess.run(
        [sys.executable, "-m", "robaudit", *argv[1:]], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"README example failed (exit {proc.returncode}): {command}\n{proc.stderr}")
    return [line.rstrip() for line in proc.stdout.splitlines()], proc.returncode


@contextmanager
def scratch() -> Iterator[Path]:
    """A temporary working folder holding a copy of the repository's ``sample_models/``."""
    with tempfile.TemporaryDirectory(prefix="robaudit-examples-") as folder:
        shutil.copytree(ROOT / "sample_models", Path(folder) / "sample_models")  # 0.7 MB; paths stay relative
        yield Path(folder)


#: Models whose onnxruntime outputs depend on the CPU (int8 kernels): ``inject`` on them is compared masked.
CPU_DEPENDENT = ("_int8.onnx",)
_NUMBER = re.compile(r"[-+]?\d[\d.,]*(e[-+]?\d+)?%?")
_RULES = re.compile(r"[─━┏┓┗┛┃│┡┩┳┻╇╋└┘┌┐├┤┬┴┼\s]+")


def _masked(command: str, lines: list[str]) -> list[str]:
    """``lines`` as compared for ``command``: as they are, or for inject on a CPU-dependent model as one text with
    every number masked and every run of table rules, spaces and line breaks one space (numbers of other lengths
    wrap elsewhere; the words, the columns and the notes stay compared)."""
    if not (command.startswith("robaudit inject") and any(name in command for name in CPU_DEPENDENT)):
        return lines
    return [_RULES.sub(" ", _NUMBER.sub("#", " ".join(lines))).strip()]


def compare(text: str) -> list[str]:
    """A unified diff per example whose real output differs from what is shown."""
    lines = text.splitlines()
    problems, previous = [], 0
    with scratch() as cwd:
        outputs = []
        for example in examples(lines):
            output, previous = run(example.command, previous, cwd)
            outputs.append(output)
    for example, output in zip(examples(lines), outputs, strict=True):
        shown = [line.rstrip() for line in example.shown]
        if _masked(example.command, output) != _masked(example.command, shown):
            diff = difflib.unified_diff(shown, output, "shown", "real run", lineterm="")
            problems.append(f"$ {example.command}\n" + "\n".join(diff))
    return problems


def regenerate(text: str) -> str:
    """The text with every example's output replaced by a real run's."""
    lines = text.splitlines()
    replacements, previous = [], 0
    with scratch() as cwd:
        for example in examples(lines):
            output, previous = run(example.command, previous, cwd)
            replacements.append((example.start, example.end, output))
    for start, end, output in reversed(replacements):
        lines[start:end] = output
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    failed = False
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        if "--write" in argv:
            path.write_text(regenerate(text), encoding="utf-8")
            print(f"rewrote the outputs of {len(examples(text.splitlines()))} examples in {path}")
            continue
        for problem in compare(text):
            failed = True
            print(f"{path.relative_to(ROOT)}: {problem}", end="\n\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
