"""One error type: every refusal carries problem, fix and where as fields, renders as one line, names its exit code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from server.boot.cached import DamagedEntry
from server.cli import main
from server.config.inputs import KeySourceError
from server.config.load import load_config
from server.config.schema import ConfigError
from server.errors import ExitCode, MergeserveError
from server.load.adapters import BootError, merge_refusal
from server.merge.apply import MergeError
from server.merge.check import write_problem
from server.store.sources import SourceError

Writer = Callable[[dict[str, Any]], Path]


def test_exit_codes_keep_their_numbers() -> None:
    """Orchestrators and scripts match on the numbers, so the names must not move them."""
    assert [int(c) for c in (ExitCode.OK, ExitCode.UNEXPECTED, ExitCode.BAD_INPUT, ExitCode.CHECK_FAILED)] == [
        0,
        1,
        2,
        3,
    ]


def test_line_leaves_out_empty_parts() -> None:
    assert MergeserveError("p", "f", "w").line() == "w: p; fix: f" == str(MergeserveError("p", "f", "w"))
    assert MergeserveError("p", "f").line() == "p; fix: f"
    assert MergeserveError("p", "").line() == "p"


@pytest.mark.parametrize(
    "error", [ConfigError, BootError, MergeError, SourceError, KeySourceError, DamagedEntry], ids=lambda c: c.__name__
)
def test_every_refusal_is_one_type(error: type[Exception]) -> None:
    assert issubclass(error, MergeserveError)


def test_merge_check_returns_problem_and_fix_apart() -> None:
    """A delta of 1e-9 is far below bf16's spacing at 1.0 (2^-7), so the merged weight stays put and is refused."""
    before = torch.ones(4, dtype=torch.bfloat16)
    refusal = write_problem(before, before.clone(), torch.full((4,), 1e-9))
    assert refusal is not None
    assert refusal.problem == "it did not change: the delta rounds away entirely in torch.bfloat16"
    assert refusal.fix == "serve in float32 or unmerged"


def test_merge_refusal_keeps_fields_and_the_line_operators_know() -> None:
    exc = MergeError("cannot merge into Conv2d", "serve unmerged", "adapter 'a', module 'm'")
    refused = merge_refusal(exc, ExitCode.CHECK_FAILED, "merge check failed")
    assert (refused.problem, refused.fix, refused.exit_code) == ("cannot merge into Conv2d", "serve unmerged", 3)
    assert (
        refused.line() == "merge check failed: adapter 'a', module 'm': cannot merge into Conv2d; fix: serve unmerged"
    )


def test_config_error_keeps_the_validator_fix_as_a_field(
    write_config: Writer, tiny_config_data: dict[str, Any]
) -> None:
    tiny_config_data["model"]["path"] = "absent"
    path = write_config(tiny_config_data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert (err.value.where, err.value.fix) == (f"{path}: model.path", "point it at a model folder or .gguf file")
    assert err.value.exit_code == ExitCode.BAD_INPUT and " | " not in err.value.line()


def test_cli_renders_the_line_and_returns_its_exit_code(
    write_config: Writer,
    tiny_config_data: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = ["merge", "--config", str(write_config(tiny_config_data)), "--out", str(tmp_path / "out")]
    assert main([*argv, "--max-shard-size", "lots"]) is ExitCode.BAD_INPUT
    line = "mergeserve: --max-shard-size: cannot read size 'lots'; fix: write it like 200MB or 2GB\n"
    assert capsys.readouterr().err == line
    monkeypatch.delenv("MERGESERVE_CONFIG", raising=False)
    assert main(["serve"]) is ExitCode.BAD_INPUT
    assert capsys.readouterr().err == "mergeserve: no config given; fix: pass --config FILE or set MERGESERVE_CONFIG\n"
