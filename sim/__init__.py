"""``python -m sim ARGS`` in a checkout is ``fedseg-sim ARGS``; the entry points are :mod:`fedseg.sim`."""
