"""The README's first Python example runs as written (in a scratch directory)."""

import os
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_workflow_example_runs(tmp_path: pathlib.Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert "depgraph.solve" in blocks[0] and "Plan.load" in blocks[0]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(blocks[0], "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "resnet18-half.json").exists()
