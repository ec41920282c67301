"""The habits that keep the code in shape, checked with the rest of the suite (so CI runs them too): ruff's lint
rules and formatter, and mypy on ``influence_core`` — all configured in ``pyproject.toml``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "command", [("ruff", "check", "."), ("ruff", "format", "--check", ".")], ids=["ruff-lint", "ruff-format"]
)
def test_ruff(command):
    done = _run(*command)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_on_the_library():
    done = _run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
