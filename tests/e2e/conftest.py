"""A server two end-to-end modules share: the demo's A/B experiment on the vLLM engine.

test_e2e_vllm checks its tokens against the independent reference, test_vllm_conformance its /v1 answers against
vLLM's own OpenAI server. Its boot costs about two minutes on 2 cores (two vLLM engines), so it is booted once for
the package, with a merge cache of its own, and stopped when the package's last test is done.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config.schema import CACHE_DIR_ENV
from tests.demo_base import seed_cache
from tests.live_server import REPO, LiveServer


@pytest.fixture(scope="package")
def vllm_ab_server(demo_base_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """configs/demo-vllm.yaml: both arms on vLLM in one process (`x-merge-mode` picks the arm)."""
    cache = tmp_path_factory.mktemp("vllm-ab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_DIR_ENV, str(cache))
        seed_cache(demo_base_copy)  # the base copy the unmerged arm loads; test_e2e_demo tests its first build
    env = {**os.environ, CACHE_DIR_ENV: str(cache)}
    with LiveServer(REPO / "configs" / "demo-vllm.yaml", boot_timeout=900, env=env) as live:
        yield live
