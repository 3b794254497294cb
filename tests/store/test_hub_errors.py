"""What a Hub id cannot give: one line naming the config key, the id and the fix, exit 2, before anything loads.

Offline cases use a real Hub cache (tests/hub_cache.py). The Hub's own refusals (gated, unknown repo, unknown
revision) come from a stub HTTP server at HF_ENDPOINT that answers as the Hub does (status and X-Error-Code
header), so huggingface_hub classifies them itself.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from huggingface_hub import constants

from server.boot.boot import boot
from server.config.load import load_config
from server.config.schema import ConfigError
from server.errors import ExitCode
from server.store.hub_errors import HubError
from tests.hub_cache import BASE, LORA, hub_config, publish
from tests.live_server import REPO, free_port

Writer = Callable[[dict[str, Any]], Path]


def _refusal(config: Path) -> HubError:
    with pytest.raises(HubError) as caught:
        boot(load_config(config))
    assert caught.value.exit_code == ExitCode.BAD_INPUT and "\n" not in caught.value.line()
    return caught.value


@pytest.mark.parametrize(
    ("adapter", "expected"),
    [
        ({"path": "test-org/no-such-lora"}, "adapters[0].path (test-org/no-such-lora): 'test-org/no-such-lora' is not "
         "in the Hub cache"),
        ({"path": f"{LORA}@v9"}, f"adapters[0].path ({LORA}@v9): revision 'v9' of '{LORA}' is not in the Hub cache "
         "(cached: main, "),
        ({"path": LORA, "subfolder": "nope"}, f"adapters[0].path ({LORA}): subfolder 'nope' has no "
         "adapter_config.json"),
    ],
)  # fmt: skip
def test_offline_with_nothing_cached(
    hub: Path, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer,
    adapter: dict[str, Any], expected: str,
) -> None:  # fmt: skip
    publish(hub, BASE, tiny_base)
    publish(hub, LORA, tiny_adapters["alpha"])
    refusal = _refusal(write_config(hub_config(BASE, adapter)))
    assert refusal.line().startswith(expected) and "; fix: " in refusal.line()
    if "cache" in expected:
        assert "HF_HUB_OFFLINE" in refusal.line()


def test_pickle_only_repo_and_allowed_roots(
    hub: Path, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer, tmp_path: Path
) -> None:
    publish(hub, BASE, tiny_base)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tiny_adapters["alpha"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    publish(hub, LORA, pickled)
    line = _refusal(write_config(hub_config(BASE, {"path": LORA}))).line()
    assert line.startswith(f"adapters[0].path ({LORA}): the repo has no adapter weights") and "allow_pickle" in line
    publish(hub, "test-org/good", tiny_adapters["alpha"])
    roots = {"security": {"allowed_roots": [str(tmp_path / "elsewhere")]}}
    line = _refusal(write_config(hub_config(BASE, {"path": "test-org/good"}, **roots))).line()
    assert line.startswith("model.path: ") and "outside security.allowed_roots" in line and "HF_HUB_CACHE" in line


def test_config_checks_id_syntax_without_the_hub(write_config: Writer, tiny_adapters: dict[str, Path]) -> None:
    cases = [
        ({"path": f"{LORA}@v1", "revision": "v2"}, "adapters[0]", "two revisions"),
        (
            {"path": str(tiny_adapters["alpha"]), "revision": "v2"},
            "adapters[0]",
            "revision and subfolder apply to Hub ids",
        ),
        ({"path": LORA, "subfolder": "../up"}, "adapters[0]", "leaves the repo"),
        ({"path": "not an id/x y"}, "adapters[0].path", "does not exist"),
    ]
    for adapter, key, problem in cases:
        with pytest.raises(ConfigError) as caught:
            load_config(write_config(hub_config(BASE, adapter)))
        assert caught.value.key == key and problem in caught.value.problem, caught.value.line()


class _StubHub(BaseHTTPRequestHandler):
    """Every request answered as the Hub answers the repo named in the URL: see ANSWERS."""

    ANSWERS: ClassVar[dict[str, tuple[int, str]]] = {
        "gated": (401, "GatedRepo"),
        "unknown": (401, "RepoNotFound"),
        "revision": (404, "RevisionNotFound"),
    }

    def _answer(self) -> None:
        status, code = next((a for name, a in self.ANSWERS.items() if f"/test-org/{name}" in self.path), (500, ""))
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def stub_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    yield endpoint
    server.shutdown()


@pytest.mark.parametrize(
    ("name", "expected", "fix"),
    [
        ("gated", "'test-org/gated' is a gated repo and no token is set", "set HF_TOKEN"),
        ("unknown", "no repo 'test-org/unknown' on http://127.0.0.1:", "check the id"),
        ("revision", "'test-org/revision' has no revision 'v2'", "give an existing branch, tag or commit"),
    ],
)
def test_the_hubs_refusals(
    hub: Path, stub_hub: str, tiny_adapters: dict[str, Path], write_config: Writer, name: str, expected: str, fix: str
) -> None:
    line = _refusal(write_config(hub_config(f"test-org/{name}@v2", {"path": str(tiny_adapters["alpha"])}))).line()
    assert line.startswith(f"model.path (test-org/{name}@v2): {expected}") and fix in line.split("; fix: ")[1]


def test_cli_exits_2_with_the_line_reading_only_the_environment(
    tmp_path: Path, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer
) -> None:
    cache = tmp_path / "env-cache"
    publish(cache, BASE, tiny_base)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "MERGESERVE_CACHE_DIR": str(tmp_path / "merge-cache")}  # fmt: skip
    config = write_config(hub_config(BASE, {"path": f"{LORA}@v1"}))
    argv = [sys.executable, "-m", "server", "serve", "--config", str(config), "--port", str(free_port())]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mergeserve: adapters[0].path ({LORA}@v1): '{LORA}' is not in the Hub cache ({cache})")
    assert "Traceback" not in proc.stderr
