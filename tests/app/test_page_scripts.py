"""Page scripts hold no bare expressions: with Streamlit's magic (on by default wherever ``.streamlit/config.toml``
is not read, e.g. ``streamlit run`` from another folder) each one is written onto the page — a constant's docstring
once showed at the top of Data & model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]
DOC_OWNERS = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def bare_expressions(source: str) -> list[int]:
    """Line numbers of statements that magic would display: expressions other than calls, awaits and yields, and
    other than the docstring of the module, a function or a class."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            for i, stmt in enumerate(body if isinstance(body, list) else []):
                if not isinstance(stmt, ast.Expr) or isinstance(stmt.value, (ast.Call, ast.Await, ast.Yield)):
                    continue
                docstring = i == 0 and field == "body" and isinstance(node, DOC_OWNERS)
                if not (docstring and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
                    lines.append(stmt.lineno)
    return lines


def test_the_check_finds_what_magic_would_show():
    source = '"""Module docstring."""\nX = 1\n"""X\'s docstring."""\nif X:\n    X\ndef f():\n    """Doc."""\n    f()\n'
    assert bare_expressions(source) == [3, 5]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_bare_expressions(script):
    assert bare_expressions(script.read_text()) == [], f"{script.name}: use a comment or an st call"
