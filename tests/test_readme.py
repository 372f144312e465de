"""The README's Python examples run as written (so they cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        scope: dict = {}
        exec(compile(code, str(README), "exec"), scope)
        if "plan" in scope:
            plan = scope["plan"]
            assert plan.max_load == plan.gpu_load.max()
