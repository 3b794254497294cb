"""The demo's dequantized base copy, built once per test session and hard-linked into the e2e modules' caches.

transformers dequantizes the demo GGUF in Python, ~25 s on 2 cores, and the copy's write adds a few more: paid by
every module whose fresh merge cache starts empty (the ab reference module, the vLLM module, the cache export, the
two-adapter demo). Those modules test serving, merging and exporting, not the copy's first build, so they start
from a cache that already holds the copy, as a deployment does from its second boot on. The first build itself, and
the GGUF read without a copy, stay tested where they happen for a user: test_e2e_demo (unmerged stores it, merged
and the bare base read it), the container's first boot (tests/deploy/test_image.py) and the wheel in a fresh venv
(tests/deploy/test_deploy.py).

The copy is made by the product's own `base_entry`, and the served tokens are still checked against the
independent reference (tests.reference.demo_reference: transformers' GGUF loader and PEFT), never against the copy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from server.boot.phases import PhaseTimer
from server.boot.stored_base import base_entry
from server.config.load import load_config
from server.config.schema import CACHE_DIR_ENV
from server.store.cache import MergeCache
from tests.live_server import REPO


def build_demo_base(root: Path) -> Path:
    """The entry holding the demo base (every demo config names the same GGUF, in float32) in a cache at `root`."""
    config = load_config(REPO / "configs" / "demo-ab.yaml")
    entry = base_entry(config, MergeCache(root), PhaseTimer(None))
    assert entry is not None  # created when missing
    return entry


def seed_cache(entry: Path) -> None:
    """Hard-link `entry` into the merge cache the environment names now, the one a server started from here uses.
    Entries are never written in place (a damaged one is moved away whole), so the links cannot change the
    session's copy; a folder on another file system gets a copy instead."""
    target = Path(os.environ[CACHE_DIR_ENV]) / "entries" / entry.name
    try:
        shutil.copytree(entry, target, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(entry, target)
