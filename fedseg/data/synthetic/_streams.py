"""Independent random streams of one seed: every draw of the generator comes from one of these.

A stream is ``(seed, kind, *indices)``; giving each kind of draw its own stream keeps, e.g., the
towns unchanged when the number of frames per vehicle changes.
"""

from __future__ import annotations

import numpy as np

TOWN, WEATHER, FRAME, HELDOUT = range(4)  # stream kinds; changing them changes every pixel


def generator(seed: int, *path: int) -> np.random.Generator:
    """The random generator of stream ``(seed, *path)``."""
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))
