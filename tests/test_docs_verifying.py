"""docs/verifying.md: every Python block runs as written (in a fresh process, x64 off, as a
user's would be) and prints exactly the output the page shows after it."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "verifying.md"

RUNNER = r'''
import contextlib, io, json, pathlib, sys
blocks = json.loads(sys.stdin.read())
pathlib.Path("my_layers.py").write_text(blocks[0])
pathlib.Path("test_my_layers.py").write_text(blocks[1])
sys.path.insert(0, ".")
outputs = []
for i, code in enumerate(blocks[1:], 1):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        namespace = {"__name__": f"block{i}"}
        exec(compile(code, f"block{i}", "exec"), namespace)
        for name, fn in list(namespace.items()):  # the pytest block: run its tests
            if name.startswith("test_") and callable(fn):
                fn()
    outputs.append(out.getvalue())
print(json.dumps(outputs))
'''


@pytest.mark.slow
def test_every_block_runs_and_prints_what_the_page_shows(tmp_path):
    text = PAGE.read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, re.S)
    python = [code for lang, code in blocks if lang == "python"]
    shown = [code for lang, code in blocks if lang == ""]  # the printed outputs, in order
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(python), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [out for out in json.loads(proc.stdout.splitlines()[-1]) if out]
    assert printed == shown, (printed, shown)
