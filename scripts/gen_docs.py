"""Regenerate the README's config reference and metrics table from the code, so neither can drift.

python scripts/gen_docs.py          # rewrite the marked README sections
python scripts/gen_docs.py --check  # exit 1 if the README is stale (tests run this)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # document this checkout's code, not whichever copy of `server` is installed

from server.config.schema import Config  # noqa: E402
from server.http.metrics import Metrics  # noqa: E402

README = REPO / "README.md"


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "").replace("<class '", "").replace("'>", "")
    return re.sub(r"server\.config\.schema\.", "", text).replace("|", "\\|")


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


def render(text: str) -> str:
    for section, body in (("config-reference", config_reference()), ("metrics-reference", metrics_reference())):
        pattern = re.compile(rf"(<!-- {section}:start -->\n).*?(<!-- {section}:end -->)", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- {section}:start/end --> markers")
        text = pattern.sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if README.md is out of date")
    args = parser.parse_args()
    current = README.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("README.md is stale: run python scripts/gen_docs.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
