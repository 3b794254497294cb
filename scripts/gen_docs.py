"""Regenerate the config and metrics references in docs/reference/ from the code, so neither can drift.

python scripts/gen_docs.py          # rewrite the marked sections of docs/reference/{config,metrics}.md
python scripts/gen_docs.py --check  # exit 1, one line per stale file, if they no longer match (tests run this)

As TGI's update_doc.py: only the text between `<!-- name:start -->` and `<!-- name:end -->` is generated; the prose
around it is written by hand.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # document this checkout's code, not whichever copy of `server` is installed

from server.config.schema import Config  # noqa: E402
from server.http.metrics import Metrics  # noqa: E402

REFERENCE = REPO / "docs" / "reference"


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "").replace("<class '", "").replace("'>", "")
    return re.sub(r"server\.config\.\w+\.", "", text).replace("|", "\\|")


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "—" if isinstance(value, BaseModel) else f"`{value!r}`"


def config_rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))[0] if "list[" in str(annotation) else annotation
        rows.append(f"| `{key}` | {_type_name(annotation)} | {_default(field)} | {field.description or ''} |")
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            rows += config_rows(inner, f"{key}[]." if "list[" in str(annotation) else f"{key}.")
    return rows


def config_reference() -> str:
    head = ["| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(head + config_rows(Config))


def metrics_reference() -> str:
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for collector in Metrics().registry._collector_to_names:  # the registry's own list of what it exports
        for family in collector.describe():
            labels = ", ".join(f"`{label}`" for label in getattr(collector, "_labelnames", ()))
            suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
            rows.append(f"| `{family.name}{suffix}` | {family.type} | {labels} | {family.documentation} |")
    return "\n".join(rows)


# Each generated file and the marked sections it holds.
TARGETS: dict[str, tuple[tuple[str, Callable[[], str]], ...]] = {
    "config.md": (("config-reference", config_reference),),
    "metrics.md": (("metrics-reference", metrics_reference),),
}


def render(name: str, text: str) -> str:
    for section, build in TARGETS[name]:
        pattern = re.compile(rf"(<!-- {section}:start -->\n).*?(<!-- {section}:end -->)", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"{name} has no <!-- {section}:start/end --> markers")
        body = build()
        text = pattern.sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
    return text


def staleness(path: Path, current: str, fresh: str) -> str:
    """One line saying how far `current` is from `fresh`: the changed-line count and the first changed line."""
    old, new = current.splitlines(), fresh.splitlines()
    ops = [op for op in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes() if op[0] != "equal"]
    changed = sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in ops)
    first = ops[0][1]
    shown = old[first] if first < len(old) else "(end of file)"
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return (
        f"{where} is stale: {changed} line(s) differ from the code, first at line {first + 1}: "
        f"{shown[:80]!r}; run python scripts/gen_docs.py"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated section is out of date")
    parser.add_argument("--reference-dir", type=Path, default=REFERENCE, help="where config.md and metrics.md live")
    args = parser.parse_args()
    stale = 0
    for name in TARGETS:
        path = args.reference_dir / name
        current = path.read_text()
        fresh = render(name, current)
        if fresh == current:
            continue
        if args.check:
            print(staleness(path, current, fresh), file=sys.stderr)
            stale += 1
        else:
            path.write_text(fresh)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
