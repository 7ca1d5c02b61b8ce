"""Every example in the README runs as shown: the first as a script (`python pi.py`),
all of them in order as notebook cells (top-level `await`, one namespace), each in a
fresh interpreter of its own."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)

NOTEBOOK = """
    import ast, asyncio, json, sys
    blocks = json.loads(sys.stdin.read())
    ns = {"__name__": "notebook"}  # the script's `if __name__ == "__main__"` stays out

    async def cells():
        import ashard, ashard.sync
        try:
            for i, code in enumerate(blocks, 1):
                compiled = compile(code, f"README block {i}", "exec",
                                   flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
                result = eval(compiled, ns)
                if asyncio.iscoroutine(result):
                    await result
                print(f"block {i} ran", flush=True)
        finally:
            ashard.sync.shutdown()
            await ashard.shutdown()

    asyncio.run(cells())
"""


def test_the_readme_has_examples_to_run() -> None:
    assert len(BLOCKS) >= 6
    assert "asyncio.run(main())" in BLOCKS[0]


def test_the_first_example_runs_as_a_script(tmp_path: Path) -> None:
    script = tmp_path / "pi.py"
    script.write_text(BLOCKS[0])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert abs(float(first) - 3.14159) < 0.01, out.stdout


def test_every_example_runs_as_notebook_cells(tmp_path: Path) -> None:
    import json

    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NOTEBOOK)], input=json.dumps(BLOCKS),
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert f"block {len(BLOCKS)} ran" in out.stdout
