"""The README's Python example runs as written (on the tiny model it names)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text.split("### Python", 1)[1]
    block = re.search(r"\n\n((?:    .*\n)+)", section).group(1)
    code = textwrap.dedent(block)
    assert "sheafprune.discover(" in code and "sheafprune.evaluate(" in code, code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert (tmp_path / "exports/tiny/model.safetensors").is_file() and (tmp_path / "exports/tiny/model.onnx").is_file()
    assert scope["sheaf"].density() and scope["results"], "the example's objects are empty"
