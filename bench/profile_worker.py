"""`perfex-webhooks worker` under pyinstrument: the bench's profiling hook (nothing in app/ knows it).

    PERFEX_BENCH_PROFILE=/tmp/worker.txt python -m bench.profile_worker worker

Samples the worker's main thread (the event loop, where all the delivery work runs) every 1 ms and
writes the call tree when the worker stops (SIGTERM): text for a path ending in .txt, the raw
session for .pyisession (`pyinstrument --load FILE -r text --show-all`), else HTML.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    from pyinstrument import Profiler

    from app.cli import main as cli

    out = os.environ["PERFEX_BENCH_PROFILE"]
    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    try:
        cli.main(args=sys.argv[1:], prog_name="perfex-webhooks")
    finally:
        profiler.stop()
        if out.endswith(".pyisession"):  # reload later with pyinstrument --load
            profiler.last_session.save(out)
        else:
            with open(out, "w", encoding="utf-8") as f:
                if out.endswith(".txt"):
                    f.write(profiler.output_text(unicode=True, show_all=False, short_mode=False))
                else:
                    f.write(profiler.output_html())


if __name__ == "__main__":
    main()
