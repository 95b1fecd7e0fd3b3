"""``rtchat bench``: the load generator, as a package of its parts (see ``cli``).

``main`` is the command; ``python -m rtchat.bench`` runs it too.
"""

from rtchat.bench.cli import main

__all__ = ["main"]
