"""The README's "nattool as a library" example, run as written: two copies of it
against a real `nattool serve` find each other and exchange their hello."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, TrackerFactory, nattool_env

README_TRACKER = "127.0.0.1:43283"


def library_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## nattool as a library", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the library section should hold one python example"
    return blocks[0]


def test_the_readme_library_example_runs_as_written(tracker: TrackerFactory, tmp_path: Path) -> None:
    code = library_example()
    assert README_TRACKER in code  # the example talks to the tour's tracker
    tp = tracker()
    demo = tmp_path / "demo.py"
    demo.write_text(code.replace(README_TRACKER, tp.endpoint), encoding="utf-8")
    env = nattool_env(tmp_path)
    procs = [
        subprocess.Popen([sys.executable, str(demo)], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("the README's library example did not finish within 60 s") from None
        outputs.append((proc.returncode, out, err))
    for code_, out, err in outputs:
        assert code_ == 0, f"exit {code_}\nstdout: {out}\nstderr: {err}"
        assert re.search(r"^my public endpoint: 127\.0\.0\.1:\d+$", out, re.M), out
        assert "other members:" in out, out
        assert re.search(r" says hello \| peers: \['.+'\]$", out, re.M), out
        assert err == "", err
