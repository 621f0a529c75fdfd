"""The checkout's Flower ClientApp entry for ``flwr run .``; the code is :mod:`fedseg.clients`."""
