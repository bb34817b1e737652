"""Shared by the benchmark scripts: the machine they ran on, and BENCHMARKS.md sections."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every table below is written by a script in `benchmarks/`; the command and the machine "
    "that produced it stand above each table. Nothing here is typed by hand.\n"
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        if names:
            cpu = names[0].strip()
    return (
        f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def engine_version() -> str:
    """The git commit the benchmark ran on, marked when the working tree had local changes."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" with local changes" if git("status", "--porcelain", "src") else "")


def command() -> str:
    """The command that ran, its script named from the repository root (as BENCHMARKS.md
    quotes every command) wherever it was started from."""
    script = Path(sys.argv[0]).resolve()
    root = BENCHMARKS.parent
    name = script.relative_to(root).as_posix() if script.is_relative_to(root) else sys.argv[0]
    return "python " + " ".join(shlex.quote(arg) for arg in [name, *sys.argv[1:]])


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md with `body`."""
    text = BENCHMARKS.read_text() if BENCHMARKS.is_file() else HEADER
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    section = (
        f"{begin}\nCommand: `{command()}`  \nMachine: {machine()}  \n"
        f"Engine: commit {engine_version()}\n\n{body.strip()}\n{end}"
    )
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), flags=re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    BENCHMARKS.write_text(text)


def write_or_print(name: str, body: str, write: bool) -> None:
    """Write the section `name` of BENCHMARKS.md (`--write`), or print its body."""
    if write:
        write_section(name, body)
    else:
        print(body)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
