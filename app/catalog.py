"""The event catalog: 19 Perfex CRM resources, 138 events (package data `app/catalog.yaml`).

The catalog is data the project ships (a copy of shared/catalog.yaml, checked equal by a test);
this module is the only reader. Subscription patterns (`invoice.*`, `*`, `lead.created`) are
matched here too, so the registry and the fan-out agree on what a pattern means.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml


@dataclass(frozen=True)
class EventDef:
    name: str
    resource: str
    description: str
    perfex_hook: str
    documented: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "resource": self.resource,
            "description": self.description,
            "perfex_hook": self.perfex_hook,
            "documented": self.documented,
        }


@dataclass(frozen=True)
class Catalog:
    resources: dict[str, str]  # resource name -> description
    events: dict[str, EventDef]  # event name -> definition, in catalog order

    def __contains__(self, name: object) -> bool:
        return name in self.events

    def resource_of(self, event: str) -> str:
        return self.events[event].resource

    def expand(self, pattern: str) -> list[str]:
        """Catalog events a subscription pattern selects."""
        if pattern == "*":
            return list(self.events)
        if any(ch in pattern for ch in "*?["):
            return [e for e in self.events if fnmatch.fnmatchcase(e, pattern)]
        return [pattern] if pattern in self.events else []

    def validate_patterns(self, patterns: list[str] | str) -> list[str]:
        """Normalise 'invoice.*,lead.created' or a list; every pattern must select some event."""
        items = patterns.split(",") if isinstance(patterns, str) else list(patterns)
        cleaned = [p.strip() for p in items if p and p.strip()]
        if not cleaned:
            raise ValueError("events: give at least one event name or pattern (e.g. 'invoice.*')")
        unknown = [p for p in cleaned if not self.expand(p)]
        if unknown:
            raise ValueError(
                f"events: {', '.join(unknown)} match no catalog event (see `perfex-webhooks catalog`)"
            )
        return list(dict.fromkeys(cleaned))

    def as_dict(self) -> dict[str, Any]:
        return {
            "resources": {
                name: {
                    "description": desc,
                    "events": [e.as_dict() for e in self.events.values() if e.resource == name],
                }
                for name, desc in self.resources.items()
            }
        }


def matches(patterns: list[str] | tuple[str, ...], event: str) -> bool:
    """True if any subscription pattern selects `event` (exact name, `resource.*` or `*`)."""
    for p in patterns:
        if p == "*" or p == event:
            return True
        if p.endswith(".*") and "*" not in p[:-2] and event.startswith(p[:-1]):
            return True
        if any(ch in p for ch in "*?[") and fnmatch.fnmatchcase(event, p):
            return True
    return False


def parse_catalog(doc: dict[str, Any]) -> Catalog:
    res: dict[str, str] = {}
    events: dict[str, EventDef] = {}
    for rname, rdef in doc["resources"].items():
        res[rname] = rdef.get("description", "")
        for ev in rdef["events"]:
            events[ev["name"]] = EventDef(
                name=ev["name"],
                resource=rname,
                description=ev.get("description", ""),
                perfex_hook=ev.get("perfex_hook", ""),
                documented=bool(ev.get("documented", False)),
            )
    return Catalog(resources=res, events=events)


@cache
def load_catalog() -> Catalog:
    text = resources.files("app").joinpath("catalog.yaml").read_text(encoding="utf-8")
    return parse_catalog(yaml.safe_load(text))
