"""README.md: short, and every command a newcomer copies from it is run by `make` or the tests.

The rule, precisely. In each ```sh block of README.md a command is a line without its trailing
``# comment``, joined with the lines its ``\\`` continues; blank and comment lines are none.
Each command is either

- ``make T... [VAR=value...]``, every T a target the Makefile defines; or
- run here as written (``test_the_readme_commands_run``), in a folder laid out as a checkout
  (``.venv``, the README's own ``heatcrop.toml`` block, a ``thumbor.key``): a command ending in
  ``serve`` must come up and answer ``/healthz``, any other must exit 0.

So a README command that is neither a make target nor runs as written fails a test. Every TOML
block of README.md and docs/ must load as settings.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sidecar import settings as s
from tests.docs.markdown import blocks, links
from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
MAX_BYTES = 25 * 1000
MAX_LINES = 300
PICTURE_MAX_BYTES = 60 * 1000
SERVE_TIMEOUT_S = 120.0


def commands(text: str) -> list[str]:
    """The commands of the ```sh blocks of ``text``, as the module docstring defines them."""
    out = []
    for block in blocks(text):
        if block.lang not in ("sh", "bash", "shell", "console"):
            continue
        pending = ""
        for raw in block.text.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            line = (pending + line.strip()).strip()
            pending = ""
            if line:
                out.append(" ".join(line.split()))
    return out


def make_targets(makefile: str) -> set[str]:
    """Targets the Makefile defines (rules, not variable assignments)."""
    out: set[str] = set()
    for line in makefile.splitlines():
        match = re.match(r"^([A-Za-z0-9_.-][A-Za-z0-9_. -]*):(?!=)", line)
        if match:
            out.update(match.group(1).split())
    return out - {".PHONY"}


def is_make(command: str) -> bool:
    return command.split()[0] == "make"


TARGETS = make_targets((ROOT / "Makefile").read_text())
RUN = [c for c in commands(TEXT) if not is_make(c)]


def test_the_readme_is_short():
    assert len(TEXT.encode()) <= MAX_BYTES
    assert TEXT.count("\n") <= MAX_LINES


def test_the_readme_shows_the_picture_and_the_command_that_made_it():
    images = [t for _, t in links(TEXT) if t.startswith("docs/img/")]
    assert images, "README.md shows no picture from docs/img/"
    for image in images:
        assert (ROOT / image).stat().st_size <= PICTURE_MAX_BYTES
    assert "docs/make_picture.py" in TEXT and (ROOT / "docs" / "make_picture.py").is_file()


def test_the_two_commands_come_first():
    assert commands(TEXT)[:2] == ["make run", "make test"]


@pytest.mark.parametrize("command", [c for c in commands(TEXT) if is_make(c)])
def test_each_make_command_is_a_target(command):
    for word in command.split()[1:]:
        if "=" not in word:
            assert word in TARGETS, f"`{command}`: the Makefile has no target {word}"


def test_every_other_command_is_one_this_file_runs():
    """The rule's second branch: what test_the_readme_commands_run knows how to run."""
    for command in RUN:
        assert command.startswith((".venv/bin/heatcrop ", ".venv/bin/python -m ")), command


def test_the_rule_reads_commands_as_a_shell_does():
    text = (
        "```sh\nmake run   # comment\n# only a comment\n\na \\\n   b  # c\n```\n```\nnot sh\n```\n"
    )
    assert commands(text) == ["make run", "a b"]
    assert make_targets("X := 1\nrun: setup\na b: c\n.PHONY: run\n") == {"run", "a", "b"}


@pytest.mark.parametrize(
    "page", [README, *sorted((ROOT / "docs").rglob("*.md"))], ids=lambda p: p.name
)
def test_every_toml_block_loads_as_settings(page, tmp_path):
    for n, block in enumerate(b for b in blocks(page.read_text()) if b.lang == "toml"):
        path = tmp_path / f"{n}.toml"
        path.write_text(block.text)
        s.load(path, environ={})


@pytest.fixture
def checkout(tmp_path, model_dir):
    """A folder where the README's commands run as on a checkout after `make setup`."""
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    toml = [b.text for b in blocks(TEXT) if b.lang == "toml"]
    assert len(toml) == 1, "the README's commands read its one heatcrop.toml block"
    (tmp_path / "heatcrop.toml").write_text(toml[0])
    (tmp_path / "thumbor.key").write_text("a Thumbor SECURITY_KEY\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEATCROP_")}
    # The environment wins over the TOML file: a free port, and the test session's model.
    env |= {"HEATCROP_SERVER_PORT": str(free_port()), "HEATCROP_ENGINE_MODEL_DIR": str(model_dir)}
    return tmp_path, env


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN)
def test_the_readme_commands_run(command, checkout):
    folder, env = checkout
    if command.endswith(" serve"):
        _serves(command, folder, env)
    else:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr


def _serves(command: str, folder: Path, env: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{env['HEATCROP_SERVER_PORT']}/healthz"
    # bash execs the one command, so the process is the sidecar itself.
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _healthy(url, proc), proc.stderr.read() if proc.stderr else ""
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _healthy(url: str, proc: subprocess.Popen[str]) -> bool:
    end = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False
