"""Every shell command in README.md's code blocks runs as written from the repository root.

A README's commands drift when nobody runs them. This test reads every code block without
a language (the shell blocks: a command per line, or lines beginning with '$ ' where output
follows) and runs each command's Python part the quick way - with ``--help``, since the
commands themselves take minutes (the cat/dog recipe, the whole test suite, a comparison at
299 px) - after checking what the reader would type: the venv's python (the set-up command
makes it), scripts and photos that exist. The set-up steps themselves (making the venv,
installing) are not rerun: the test runs inside that set-up.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SET_UP = ('python3 -m venv .venv', '.venv/bin/pip install')


def shell_commands(readme):
    """The commands of README's language-less code blocks, in order: in a block with output,
    the lines after '$ '; in any other, every line."""
    commands, block, language = [], None, ''
    for line in readme.splitlines():
        if line.startswith('```'):
            if block is None:
                block, language = [], line[3:].strip()
                continue
            if not language:
                prompted = [l[2:].strip() for l in block if l.startswith('$ ')]
                commands += prompted or [l.strip() for l in block if l.strip()]
            block = None
        elif block is not None:
            block.append(line)
    return commands


def steps(command):
    """The parts of a command joined by '&&', set-up steps left out."""
    return [part.strip() for part in command.split('&&') if not part.strip().startswith(SET_UP)]


COMMANDS = shell_commands((REPO / 'README.md').read_text())


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 3


@pytest.mark.parametrize('command', COMMANDS)
def test_readme_command_runs_as_written(command):
    for step in steps(command):
        words = shlex.split(step)
        assert words[0] == '.venv/bin/python', (
            f'{step!r}: run with .venv/bin/python (the set-up command makes it; a bare python is '
            'another interpreter, without the package)')
        target = words[1:3] if words[1] == '-m' else words[1:2]
        if target[0] != '-m':
            assert (REPO / target[0]).is_file(), f'{step!r}: no {target[0]} in the repository'
        for word in words[2:]:
            if re.search(r'\.(jpe?g|png)$', word) and (REPO / word).parent.parent.is_dir():   # photos here
                assert (REPO / word).is_file(), f'{step!r}: the photo {word} does not exist from the repository root'
        result = subprocess.run([sys.executable, *target, '--help'], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f'{step!r} --help failed:\n{result.stderr[-2000:]}'
        assert 'usage' in result.stdout.lower()
