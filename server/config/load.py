"""Reading a config file: YAML, dotted overrides, validation, then the checks that read files and the environment.

Every failure raises `ConfigError`, whose `line()` names the file, the key and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from server.config.inputs import input_problems
from server.config.schema import Config, ConfigError

_FIXES = {
    "extra_forbidden": "remove it or fix its spelling",
    "missing": "add it",
    "literal_error": "use one of the allowed values",
}


def _first_error(file: str, err: ValidationError) -> ConfigError:
    e = err.errors()[0]
    key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"]).replace(".[", "[") or "(top level)"
    msg = str(e["msg"]).removeprefix("Value error, ")
    # Pydantic keeps only a validator's message, so schema.py writes "problem | fix" into it; this is the one place
    # that text is split, and everywhere past it the two travel as ConfigError fields.
    problem, sep, fix = msg.partition(" | ")
    if not sep:
        if e["type"] == "extra_forbidden":
            problem = "unknown key"
        fix = _FIXES.get(e["type"], f"give a valid value (got {e.get('input')!r})")
    return ConfigError(file, key, problem, fix)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a config file; `overrides` (dotted keys, e.g. {"server.port": 9000}) win over the file."""
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(
            file, "(file)", f"cannot read it ({exc.strerror})", "check the path passed to --config"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(syntax)"
        raise ConfigError(
            file, where, f"YAML syntax error: {getattr(exc, 'problem', exc)}", "fix the YAML syntax"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(file, "(top level)", "expected a mapping of keys", "start from configs/demo.yaml")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        config = Config.model_validate(data, context={"base_dir": Path(path).resolve().parent})
    except ValidationError as exc:
        raise _first_error(file, exc) from None
    # Checks that read the filesystem or the environment, each naming the key at fault.
    for key, problem, fix in input_problems(config):
        raise ConfigError(file, key, problem, fix)
    return config
