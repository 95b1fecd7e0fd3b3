"""The load generator behind ``rtchat bench``: N SSE streams, M paced POSTs, one JSON report.

Owns the command's life: parse the options, make room for the file
descriptors, run on uvloop when it is installed, print the report. The
parts: ``options`` (the command line), ``wire`` (HTTP/SSE parsing),
``clients`` (streams and publish connections), ``run`` (one run's sequence),
``report`` (the JSON and its statistics).

It must not know rtchat's internals: it speaks HTTP/1.1 and SSE only, so
``--sub-url``/``--pub-url`` point it at any SSE server (nchan, flask-sse) for
side-by-side numbers. Each message's text carries a token
``rtb:<run>:<room>:<seq>:<publish unix time>:`` that survives any JSON or raw
framing, so no server-specific parsing is needed.

Only the JSON report goes to stdout; progress goes to stderr. Exit 0 on a
completed run (losses are reported, not fatal), 2 on bad arguments.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from collections.abc import Sequence
from typing import Any

from rtchat.bench.options import build_parser, parse_args
from rtchat.bench.run import Bench
from rtchat.bench.wire import UsageError

# File descriptors kept free for the publisher pool, stdio and the loop itself.
_SPARE_FDS = 64


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE as far as allowed; ``UsageError`` if ``needed`` won't fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and needed > soft:
        raise UsageError(f"{needed} file descriptors are needed but the limit is {soft} "
                         "(raise it with ulimit -n, or use fewer --clients)")
    return soft


def main(argv: Sequence[str] | None = None) -> int:
    """``rtchat bench ARGS``: run one benchmark, print its JSON report; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(args)
        raise_fd_limit(opts.clients + opts.publishers + _SPARE_FDS)
    except UsageError as e:
        build_parser().print_usage(sys.stderr)
        print(f"rtchat bench: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    def log(line: str) -> None:
        if not opts.quiet:
            print(f"bench: {line}", file=sys.stderr, flush=True)

    async def go() -> dict[str, Any]:
        return await Bench(opts, log).run()

    try:
        try:
            import uvloop
        except ImportError:
            report = asyncio.run(go())
        else:
            report = uvloop.run(go())
    except KeyboardInterrupt:
        print("rtchat bench: interrupted", file=sys.stderr)
        return 130
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0
