"""`perfex-webhooks worker` under a profiler: the bench's profiling hook (nothing in app/ knows it).

    PERFEX_BENCH_PROFILE=/tmp/worker.txt python -m bench.profile_worker worker

By the file name:
- `.prof`: cProfile timed with the main thread's CPU clock (time.thread_time), so time spent
  waiting for the CPU or the GIL is not counted: what the event loop's own work costs. Read it
  with `python -m pstats FILE` (sort tottime / cumtime).
- `.pyisession`, `.txt`, other: pyinstrument sampling the main thread every 1 ms (wall clock):
  the raw session (`pyinstrument --load FILE -r text -p show_all=true`), a text tree, or HTML.
Either is written when the worker stops (SIGTERM).
"""

from __future__ import annotations

import os
import sys


def _cli() -> None:
    from app.cli import main as cli

    cli.main(args=sys.argv[1:], prog_name="perfex-webhooks")


def main() -> None:
    out = os.environ["PERFEX_BENCH_PROFILE"]
    if out.endswith(".prof"):
        import cProfile
        import time

        prof = cProfile.Profile(timer=time.thread_time)
        prof.enable()
        try:
            _cli()
        finally:
            prof.disable()
            prof.dump_stats(out)
        return

    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    try:
        _cli()
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
