"""Summarise a py-spy `--format raw` file: samples per thread, top self and inclusive frames.

.venv/bin/python -m bench.spy_report FILE [--top 40]
"""

from __future__ import annotations

import argparse
from collections import Counter


def summarise(path: str, top: int = 40) -> str:
    threads: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            threads[frames[0]] += n
            leaf[frames[-1]] += n
            # A function counts once per sample however deep it recurses; line numbers dropped.
            for name in {fr.rsplit(":", 1)[0] for fr in frames[1:]}:
                inclusive[name] += n
    out = [f"{total} samples"]
    out += [f"{n / total:6.1%}  {t}" for t, n in threads.most_common()]
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
