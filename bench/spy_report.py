"""Summarise a py-spy `--format raw` file: samples per thread, a breakdown of the worker's main
thread by component, and the top self and inclusive frames.

    .venv/bin/python -m bench.spy_report FILE [--top 40]

Components: each sample goes to the component of the frame nearest its leaf that belongs to one
(so the aiohttp work a Dispatcher call does counts as aiohttp, and the asyncio calls the fan-out
makes count as product code).
"""

from __future__ import annotations

import argparse
from collections import Counter

COMPONENTS = (
    ("aiohttp HTTP client", ("aiohttp/", "yarl/", "multidict/")),
    ("aiokafka producer (Outbox)", ("aiokafka/producer",)),
    (
        "aiokafka consumers in the loop (tiers, registry/DLQ/attempt views)",
        ("aiokafka/", "app/topic_tables", "app/attempt_log", "app/consumers/tiers", "app/observe"),
    ),
    ("signing (app/signing, hmac)", ("app/signing", "hmac.py")),
    ("input gate, delivery records (app/events, app/delivery, orjson)", ("app/events", "app/delivery")),
    ("Prometheus metrics", ("prometheus_client",)),
    ("product glue (fan-out, dispatcher, outbox, worker)", ("app/",)),
    ("Faust/mode stream, agent, conductor", ("faust/", "mode/")),
)


def _component(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in COMPONENTS:
            if any(n in frame for n in needles):
                if name.startswith("aiokafka consumers") and any("aiokafka/producer" in f for f in frames):
                    return COMPONENTS[1][0]  # the shared client/connection code, sending for the producer
                return name
    return "event loop itself (select, scheduling)"


def summarise(path: str, top: int = 40) -> str:
    threads: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue  # py-spy sometimes writes a stack cut short (no count): skip it
            n = int(count)
            total += n
            frames = stack.split(";")
            threads[frames[0]] += n
            if "MainThread" in frames[0]:
                parts[_component(frames[1:])] += n
            leaf[frames[-1]] += n
            # A function counts once per sample however deep it recurses; line numbers dropped.
            for name in {fr.rsplit(":", 1)[0] for fr in frames[1:]}:
                inclusive[name] += n
    out = [f"{total} samples"]
    out += [f"{n / total:6.1%}  {t}" for t, n in threads.most_common()]
    out.append("-- main thread by component (share of all samples)")
    out += [f"{n / total:6.1%}  {k}" for k, n in parts.most_common()]
    out.append("-- self (leaf frame, with line)")
    out += [f"{n / total:6.1%}  {k}" for k, n in leaf.most_common(top)]
    out.append("-- inclusive")
    out += [f"{n / total:6.1%}  {k}" for k, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    print(summarise(args.file, args.top))


if __name__ == "__main__":
    main()
