"""TEMPORARY STUB (replaced by the concat branch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Written:
    path: Path
    rank: int


def refuse_for_vllm(config: Any) -> None:
    return None


def write_vllm_adapter(config: Any, root: Path, dtype: str) -> Written:
    raise NotImplementedError
