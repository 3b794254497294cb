"""The docs match the code and each other: generated references are current, links resolve, the README stays short.

The README keeps what it is, the two set-up commands, two curls, a short config, the modes and links (issue #12);
everything else lives under docs/, where scripts/gen_docs.py generates the config and metrics references.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.config.load import load_config
from tests.live_server import REPO

README = REPO / "README.md"
DOCS = sorted([README, *(REPO / "docs").rglob("*.md")])
# [text](target) and ![alt](target); targets with a scheme (https:, mailto:) are not ours to check.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _gen_docs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/gen_docs.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def _fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text())
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_generated_references_are_current() -> None:
    proc = _gen_docs("--check")
    assert proc.returncode == 0, proc.stderr


def test_check_names_a_stale_reference(tmp_path: Path) -> None:
    for name in ("config.md", "metrics.md"):
        shutil.copy(REPO / "docs" / "reference" / name, tmp_path / name)
    stale = tmp_path / "config.md"
    text = stale.read_text()
    assert "| Port to listen on. |" in text
    stale.write_text(text.replace("| Port to listen on. |", "| Port to listen on, once. |"))
    proc = _gen_docs("--check", "--reference-dir", str(tmp_path))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.md is stale: 1 line(s) differ" in lines[0], proc.stderr
    assert "server.port" in lines[0]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{doc.relative_to(REPO)}: {broken}"


def test_readme_stays_under_10_kb() -> None:
    assert len(README.read_bytes()) <= 10_000


def test_readme_names_exactly_the_two_setup_commands() -> None:
    readme = README.read_text()
    setup = _fenced(readme, "bash")[0]
    assert [line.split()[0] for line in setup.splitlines() if line.strip()] == ["scripts/serve.sh", "scripts/test.sh"]
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_readme_curls_cover_tgi_and_openai() -> None:
    curls = [block for block in _fenced(README.read_text(), "bash") if block.startswith("curl")]
    routes = [re.findall(r"localhost:8080(\S+)", block) for block in curls]
    assert routes == [["/generate"], ["/v1/chat/completions"]]


def test_readme_config_loads_and_fits_in_10_lines(tmp_path: Path) -> None:
    # The example's adapter path is relative to its file, as in configs/, so give it the same neighbours.
    (tmp_path / "adapters").symlink_to(REPO / "configs" / "adapters")
    block = _fenced(README.read_text(), "yaml")[0]
    assert len(block.splitlines()) <= 10
    (tmp_path / "config.yaml").write_text(block)
    config = load_config(tmp_path / "config.yaml")
    assert [a.name for a in config.adapters] == ["pirate"]
    assert (config.adapters[0].path / "adapter_config.json").is_file()
