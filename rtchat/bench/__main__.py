"""``python -m rtchat.bench ARGS``: the same as ``rtchat bench ARGS``."""

import sys

from rtchat.bench.cli import main

sys.exit(main())
