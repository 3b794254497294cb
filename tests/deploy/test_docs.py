"""The README's generated sections match the code, and it shows exactly the two set-up commands."""

from __future__ import annotations

import subprocess
import sys

from tests.live_server import REPO


def test_generated_readme_sections_are_current() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/gen_docs.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_readme_names_the_two_setup_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert "scripts/serve.sh" in readme and "scripts/test.sh" in readme
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
