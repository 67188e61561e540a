"""The README's "Your own data in 10 minutes", run exactly as written (each line a real `recsys` process in a
fresh folder; `serve` in the background, asked for one user's recommendations)."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time

import httpx
import pytest

from recsys.config import PROJECT_DIR

pytestmark = pytest.mark.slow


def tutorial_commands() -> list[str]:
    text = (PROJECT_DIR / "README.md").read_text()
    block = re.search(r"<!-- tutorial -->\n```bash\n(.*?)```", text, re.S)
    assert block, "the README lost its tutorial block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def run(cmd: str, cwd, **kw) -> subprocess.CompletedProcess:
    args = shlex.split(cmd)
    assert args[0] == "recsys"
    return subprocess.run([sys.executable, "-m", "recsys.cli", *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=1800, **kw)


def test_the_readme_tutorial_runs_as_written(tmp_path):
    commands = tutorial_commands()
    assert commands[-1].startswith("recsys serve")
    for cmd in commands[:-1]:
        res = run(cmd, tmp_path)
        assert res.returncode == 0, (cmd, res.stdout[-3000:], res.stderr[-3000:])
        assert "Traceback" not in res.stderr, (cmd, res.stderr[-3000:])
        if cmd.startswith("recsys data check"):
            assert "protocol LOO" in res.stdout and "ok:" in res.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", *shlex.split(commands[-1])[1:], "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the tutorial's service never became ready")
        reply = httpx.get(f"{base}/recommend/u0001?k=5", timeout=30).json()
        assert len(reply["items"]) == 5 and reply["known_user"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_wrong_folder_in_the_tutorial_is_one_clear_line(tmp_path):
    res = run("recsys data check --source generic --data no-such-folder", tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    # the dataset line every verb prints, the error, the --debug hint: nothing else
    assert lines[0].startswith("dataset: generic") and lines[1].startswith("error: ") and len(lines) == 3, lines
