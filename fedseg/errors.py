"""The errors a user can act on: each message is one line naming the file, key or value and what to do.

The entry points (``fedseg/sim/_cli.py``) print them as that one line, without a traceback: bad input
(``DataError``, ``CollectError``, ``NoBackboneFits``: ``ValueError`` subclasses) exits with status 2,
a run that cannot go on (``RunFailed``) with status 1. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. ``str(e)`` is one line naming the file (path) and what is wrong."""


class CollectError(ValueError):
    """A collection problem a user can act on (no server, wrong version, unknown town, lost server).

    ``str(e)`` is one line. A ``ValueError``, so the entry points print it without a traceback.
    """


class NoBackboneFits(ValueError):
    """No candidate meets the budget; the message names the closest ones and what they miss."""


class RunFailed(RuntimeError):
    """The run cannot go on (e.g. too few vehicles answered a round); entry points print it as one line."""
