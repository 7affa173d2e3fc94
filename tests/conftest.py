"""Shared test setup: ``tests/`` is on ``sys.path``, so tests import helpers as
``from zoo import ZOO`` or ``from oracle import check_group``."""

import pathlib
import sys

_TESTS = str(pathlib.Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
