"""The generated configuration reference (docs/configuration.md), written from the config models.

`python -m agent.commission.reference` rewrites it; tests/test_reference.py fails when it is stale or when
a model field has no line in it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from agent.commission.models import all_sections, keys

HEADER = """\
# Configuration reference

Generated from the config models by `python -m agent.commission.reference`; do not edit by hand.
Every key of `agent.toml`, per section and per driver: its type (with bounds), default, unit and meaning.
`required` marks a key without a default; `-` means unset. Secrets are never written in the file: each is
a `*_file` (usually `/run/credentials/edge-agent.service/NAME`) or a `*_env`.

Start from `edge-agent config sample [--driver D]`; check with `edge-agent check-config`; editors can
validate with the JSON Schema from `edge-agent config schema`. The HTTP API is described by the OpenAPI
document the daemon serves at `/api/v1/openapi.json`.
"""


def render() -> str:
    """The whole reference as Markdown."""
    out = [HEADER]
    current: str | None = "-"
    for driver, table, model in all_sections():
        if driver != current:
            current = driver
            if driver is None:
                out.append("\n## Core sections\n")
            else:
                out.append(f"\n## Driver `{driver}`\n")
                out.append(f'`driver = "{driver}"` in `[[equipment]]`; see also drivers/{_folder(driver)}/README.md.\n')
        out.append(f"\n### `{table}`\n")
        out.append("| key | type | default | unit | meaning |")
        out.append("|---|---|---|---|---|")
        for k in keys(table, model):
            cells = [f"`{k.name}`", k.type, k.default, k.unit or "", k.meaning]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


def _folder(driver: str) -> str:
    return {"serial_printer": "printer"}.get(driver, driver)


def write_doc(render_doc: Callable[[], str], module: str, doc: str, argv: list[str] | None) -> int:
    """The command line of a generated reference: write `docs/<doc>` (or the path given)."""
    args = argv if argv is not None else sys.argv[1:]
    if args and args[0].startswith("-"):
        # Not a path: `--help` must not become a file named --help.
        print(f"usage: python -m {module} [OUTPUT.md]", file=sys.stderr)
        return 0 if args[0] in ("-h", "--help") else 2
    target = Path(args[0]) if args else Path(__file__).resolve().parents[2] / "docs" / doc
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_doc(), encoding="utf-8")
    print(target)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Write the reference to docs/configuration.md (or the path given)."""
    return write_doc(render, "agent.commission.reference", "configuration.md", argv)


if __name__ == "__main__":
    sys.exit(main())
