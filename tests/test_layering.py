"""Imports flow one way: depgraph -> passes -> torch."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_passes_never_import_depgraph():
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in (ROOT / "passes").rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*(from|import)\s+depgraph\b", line)
    ]
    assert offenders == []
