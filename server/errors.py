"""The one error type every refusal raises, and the process exit codes, named once.

A refusal carries its parts as fields (what is wrong, how to fix it, where), so each surface renders them its own
way without re-parsing text:

- CLI: `mergeserve: <line()>` on stderr, and the process exits with `exit_code`.
- TGI: `{"error": line(), "error_type": ...}`, the type and status chosen from `exit_code` by the HTTP layer.
- OpenAI: `{"error": {"message": line(), "type": ..., "param": None, "code": ...}}`.
- SSE: the TGI body as one `data:` event, after which the stream ends.

Each layer has its subclass (ConfigError, MergeError, BootError, SourceError, ...), so a caller can catch one
layer's refusals; every one of them renders the same way. Checks that cannot know where they run (a weight
comparison, an adapter config rule) return a `Refusal` and let the caller add `where`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class ExitCode(IntEnum):
    """What `mergeserve serve` and `mergeserve merge` exit with; an orchestrator tells "fix it" from "restart it"."""

    OK = 0
    UNEXPECTED = 1  # a bug or a dead model thread: restarting may help, and the log holds the traceback
    BAD_INPUT = 2  # the config, an adapter, a model file or the command line: restarting will not help
    CHECK_FAILED = 3  # the inputs load but the merge fails its checks (parity gate, weight check), or the export fails


class Refusal(NamedTuple):
    """A check's verdict before it knows where it is raised: what is wrong and how to fix it."""

    problem: str
    fix: str


class MergeserveError(Exception):
    """A refusal the operator can act on; subclasses set the default exit code and say which layer refused."""

    default_exit_code = ExitCode.BAD_INPUT

    def __init__(self, problem: str, fix: str, where: str = "", exit_code: ExitCode | None = None) -> None:
        self.problem, self.fix, self.where = problem, fix, where
        self.exit_code = self.default_exit_code if exit_code is None else exit_code
        super().__init__(self.line())

    def line(self) -> str:
        """`<where>: <problem>; fix: <fix>`, each part left out when empty: the one line the CLI prints."""
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        return f"{text}; fix: {self.fix}" if self.fix else text
