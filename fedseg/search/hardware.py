"""Vehicle hardware budgets: the limits a backbone must meet, and the named profiles.

``HARDWARE_PROFILES`` is the registry; ``conf/hardware/<name>.yaml`` mirrors it entry by entry (same
name, same values) so that Hydra can compose ``hardware=<name>``, and
``tests/test_hardware_profiles.py`` keeps the two from drifting. ``fedseg-search`` reads the composed
``hardware`` block (command-line overrides included) into a :class:`HardwareBudget`.

Budgets are checked against measurements made on the machine that runs the search (batch 1,
``threads`` CPU threads, ``image_size``), not against FLOP estimates; to check them on the real box,
run the same search there.
"""

from __future__ import annotations

from dataclasses import dataclass

_LIMIT_NAMES = ("latency_ms", "memory_mb", "model_mb", "train_memory_mb")


@dataclass(frozen=True)
class HardwareBudget:
    """A vehicle computer's limits (``conf/hardware/*.yaml``); ``None`` leaves a limit unchecked."""

    name: str
    description: str = ""
    latency_ms: float | None = None  # per frame, batch 1, at image_size, checked against p95
    memory_mb: float | None = None  # peak inference memory
    model_mb: float | None = None  # model file size (of the precision deployed)
    train_memory_mb: float | None = None  # peak memory of one on-board training step
    threads: int = 2  # CPU threads inference gets on the vehicle
    image_size: tuple[int, int] = (192, 256)  # deployment (H, W)

    def __post_init__(self) -> None:
        for limit in _LIMIT_NAMES:
            value = getattr(self, limit)
            if value is not None and value <= 0:
                raise ValueError(f"hardware.{limit} must be > 0 or null, got {value} (profile {self.name!r})")
        if self.threads < 1:
            raise ValueError(f"hardware.threads must be >= 1, got {self.threads} (profile {self.name!r})")

    def limits(self) -> str:
        """The limits as one line, e.g. ``latency_ms<=250, memory_mb<=1024``."""
        parts = [f"{name}<={value:g}" for name, value in self.checked_limits()]
        return ", ".join(parts) or "no limits"

    def checked_limits(self) -> list[tuple[str, float]]:
        """``(limit name, value)`` for every limit that is set."""
        return [(n, float(getattr(self, n))) for n in _LIMIT_NAMES if getattr(self, n) is not None]


_MEASURED_HERE = ("Budgets are checked against measurements on the machine that runs the search; the edge "
                  "box can run the same search itself.")

HARDWARE_PROFILES: dict[str, HardwareBudget] = {
    # A vehicle's 2-core x86 edge computer (Atom/Celeron-class in-vehicle PC): the default budget.
    "edge_cpu_2core": HardwareBudget(
        "edge_cpu_2core",
        "2-core x86 edge CPU in the vehicle; 10 frames/s at 192x256 with half of a 1 GB RAM budget left "
        "for the rest of the stack; vehicles train on board (federated), so one training step must fit "
        f"too. {_MEASURED_HERE}",
        latency_ms=100, memory_mb=512, model_mb=50, train_memory_mb=2048, threads=2, image_size=(192, 256),
    ),
    # A 4-core ARM SoC (Cortex-A76-class, Raspberry-Pi-5-like).
    "arm_4core": HardwareBudget(
        "arm_4core",
        "4-core ARM-class SoC with 2 GB RAM shared with the rest of the stack; 5 frames/s at 192x256. "
        f"{_MEASURED_HERE}",
        latency_ms=200, memory_mb=256, model_mb=30, train_memory_mb=1024, threads=4, image_size=(192, 256),
    ),
    # A Jetson-Orin-Nano-like module, CPU path (fedseg measures on CPU).
    "jetson_like": HardwareBudget(
        "jetson_like",
        "Jetson-class embedded module (6 CPU cores, 8 GB shared RAM), CPU inference at 15 frames/s at "
        f"192x256. {_MEASURED_HERE}",
        latency_ms=66, memory_mb=1024, model_mb=100, train_memory_mb=4096, threads=6, image_size=(192, 256),
    ),
    # A development workstation or well-equipped vehicle computer, higher resolution.
    "workstation": HardwareBudget(
        "workstation",
        f"Workstation-class CPU (8 threads, 16 GB RAM) at 384x512. {_MEASURED_HERE}",
        latency_ms=250, memory_mb=4096, model_mb=500, train_memory_mb=None, threads=8, image_size=(384, 512),
    ),
}

