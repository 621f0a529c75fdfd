"""Shared test set-up."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import torch
from absl import logging as absl_logging

# dp-accounting (Flower's DP accountant) imports absl, whose log handler keeps the sys.stderr of the
# moment it was imported: under pytest, the capture stream. When an entry point run in-process
# configures logging (Hydra's dictConfig), the old handlers are closed, and absl closes its stream
# unless it *is* the current sys.stderr; inside a capsys test it is not, so pytest's own stderr
# would be closed mid-session. Give absl a stream of its own.
absl_logging.get_absl_handler().python_handler.stream = open(os.devnull, "w")  # noqa: SIM115


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Each test's own torch work on one thread (put back after it).

    The tests' models are tiny, so more threads gain nothing, and under pytest-xdist on two cores,
    beside other workers' runs, torch's threads spin-wait on each other: under ``-n 3`` the distillation
    test took 501 s on two threads and 70 s on one, and a briefly trained UNet trained about 10x faster
    on one thread (measured). Processes a test starts (fedseg-sim, a SuperNode) set their own.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """Put the logging set-up back after each test.

    Entry points run in-process (Hydra's ``main``) configure logging with handlers bound to the
    test's captured stdout/stderr; a later log record must not go to a stream pytest has closed.
    """
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in ("fedseg", "flwr", "py.warnings")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    logging.captureWarnings(False)
