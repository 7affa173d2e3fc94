"""Sphinx configuration: Markdown pages (myst-parser), the API reference from the numpydoc
docstrings (autodoc + napoleon). Build, failing on any warning:

    python -m pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs /tmp/docs-out
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the packages import from the checkout, installed or not

project = "depgraph"
author = "depgraph developers"
release = version = "0.1.0"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_heading_anchors = 3  # [text](page.md#a-heading) links resolve as they do on GitHub

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = "depgraph"
