"""The checkout's Flower ServerApp entry for ``flwr run .``; the code is :mod:`fedseg.server`."""
