"""Generate the Perfex module's event/hook map (`perfex_webhooks/hook_map.php`) from the catalog.

The catalog (`app/catalog.yaml`) is the one source: each event's `perfex_hook` names the Perfex
action hook(s) that produce it, in a small notation this script reads:

    after_invoice_added                      the hook fires with the resource (or its id)
    client_updated | customer_updated_info   any of these hooks
    before_client_deleted / after_client_deleted
                                             snapshot on the first, send on the second
    note_created rel_type=customer (2 args)  only when the hook's data says rel_type=customer
    derived: invoice_status_changed status=2 that hook, only when status is 2
    (anything in parentheses is a remark)

Entries the module cannot send from a hook (`synthetic…`, `none…`, `proxy…`, `nearest…`,
`filter …`, or a derivation that compares two states) are listed under `not_sent` with the
catalog's words, so docs/perfex.md and the settings page can say why.

    python connectors/perfex/generate_hook_map.py          # write the file
    python connectors/perfex/generate_hook_map.py --check  # exit 1 if the file is stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "app" / "catalog.yaml"
TARGET = Path(__file__).resolve().parent / "perfex_webhooks" / "hook_map.php"

HOOK = re.compile(r"^[a-z][a-z0-9_]*$")
NOT_A_HOOK = ("synthetic", "none", "proxy", "nearest", "filter ")
DERIVED = re.compile(r"^derived: ([a-z][a-z0-9_]*),? ([a-z_]+)=(\w+)(?: \(.*\))?$")
WHERE = re.compile(r"\b([a-z_]+)=(\w+)\b")
REMARK = re.compile(r"\([^)]*\)")


def parse_hook(spec: str) -> dict[str, Any] | None:
    """The module's listener for one `perfex_hook` text, or None when no hook produces the event."""
    text = spec.strip()
    if text.startswith(NOT_A_HOOK):
        return None
    if text.startswith("derived:"):
        m = DERIVED.match(text)
        if not m:
            return None
        return {"hooks": [m.group(1)], "before": None, "where": {m.group(2): m.group(3)}}
    text = REMARK.sub("", text)
    where = dict(WHERE.findall(text))
    text = WHERE.sub("", text)
    before = None
    if "/" in text:
        first, _, text = text.partition("/")
        before = first.strip()
    hooks = [h.strip() for h in text.split("|")]
    if not all(HOOK.match(h) for h in [*hooks, *([before] if before else [])]):
        raise ValueError(f"cannot read perfex_hook {spec!r}")
    return {"hooks": hooks, "before": before, "where": where}


def hook_map(catalog: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    events: dict[str, dict[str, Any]] = {}
    not_sent: dict[str, str] = {}
    for resource, rdef in catalog["resources"].items():
        for ev in rdef["events"]:
            spec = ev.get("perfex_hook", "")
            listener = parse_hook(spec)
            if listener is None:
                not_sent[ev["name"]] = spec
            else:
                events[ev["name"]] = {"resource": resource, **listener}
    return events, not_sent


def php(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ", ".join(php(v) for v in value) + "]"
    if isinstance(value, dict):
        return "[" + ", ".join(f"{php(k)} => {php(v)}" for k, v in value.items()) + "]"
    raise TypeError(type(value))


def render(catalog: dict[str, Any]) -> str:
    events, not_sent = hook_map(catalog)
    lines = [
        "<?php",
        "",
        "// GENERATED from app/catalog.yaml by connectors/perfex/generate_hook_map.py: do not edit.",
        "// Each event: its resource, the Perfex action hooks that send it, an optional hook that",
        "// snapshots the resource first ('before'), and conditions on the hook's data ('where').",
        "",
        "defined('BASEPATH') or exit('No direct script access allowed');",
        "",
        "return [",
        "    'events' => [",
    ]
    lines += [f"        {php(name)} => {php(spec)}," for name, spec in events.items()]
    lines += ["    ],", "    // Events no Perfex action hook produces (the catalog's words): not sent by the module.", "    'not_sent' => ["]
    lines += [f"        {php(name)} => {php(why)}," for name, why in not_sent.items()]
    lines += ["    ],", "];", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if hook_map.php is not what the catalog gives")
    args = ap.parse_args(argv)
    text = render(yaml.safe_load(CATALOG.read_text(encoding="utf-8")))
    if args.check:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} is stale: run python {Path(__file__).relative_to(ROOT)}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
