"""Split a fleet's frames among federated clients.

Every scheme takes the frames grouped by source folder (one vehicle, town or split each) and
returns one frame list per client; each frame goes to exactly one client, and the split is a pure
function of the inputs and the seed, so every simulated client can rebuild its own share.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedseg.data.frames import Frame


def _by_vehicle(
    sources: dict[str, list[Frame]], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[Frame]]:
    """One source folder per client: the natural, non-IID split of a real fleet."""
    if num_clients != len(sources):
        raise ValueError(
            f"partition='vehicle' gives each client one source folder, but {len(sources)} folders were "
            f"found ({', '.join(sources)}) and num_clients={num_clients}; set num_clients={len(sources)} "
            f"or use partition=iid or partition=dirichlet"
        )
    return [list(frames) for frames in sources.values()]


def _iid(
    sources: dict[str, list[Frame]], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[Frame]]:
    """Pool all frames, shuffle, and cut into near-equal parts (sizes differ by at most one)."""
    pool = [frame for frames in sources.values() for frame in frames]
    order = rng.permutation(len(pool))
    return [[pool[i] for i in part] for part in np.array_split(order, num_clients)]


def _dirichlet(
    sources: dict[str, list[Frame]], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[Frame]]:
    """Domain skew: client k draws a source mix ``p_k ~ Dir(alpha)`` and gets each source's
    frames in proportion to its weight for that source.

    The usual label-skew Dirichlet (Hsu et al., 2019) draws per-*class* proportions, which fits
    classification where a sample has one label. A segmentation frame holds a dozen classes, so
    skewing by label is ill-defined; what differs between real vehicles is the domain (town,
    weather, time of day, camera pose), so we skew the *source* mix instead. Small ``alpha``: each
    client sees mostly one source; large ``alpha``: every client sees every source about equally.

    Source ``s``'s frames (shuffled) are cut among clients with shares ``p_k[s] / sum_j p_j[s]``,
    rounded by largest remainder, so all frames are used exactly once; a client left empty then
    takes one frame from the largest client.
    """
    proportions = rng.dirichlet(np.full(len(sources), alpha), size=num_clients)  # (clients, sources)
    clients: list[list[Frame]] = [[] for _ in range(num_clients)]
    for s, frames in enumerate(sources.values()):
        shuffled = [frames[i] for i in rng.permutation(len(frames))]
        counts = _largest_remainder(proportions[:, s], len(shuffled))
        start = 0
        for k, count in enumerate(counts):
            clients[k].extend(shuffled[start : start + count])
            start += count
    _fill_empty(clients)
    return clients


def _largest_remainder(weights: np.ndarray, total: int) -> list[int]:
    """Integer counts summing to ``total`` in proportion to ``weights``."""
    if not np.isfinite(weights).all() or weights.sum() <= 0:
        # Tiny alphas can underflow every client's weight for a source to 0: share it evenly.
        weights = np.ones_like(weights)
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(int)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return [int(c) for c in counts]


def _fill_empty(clients: list[list[Frame]]) -> None:
    """Give every empty client one frame from the currently largest client (first on ties)."""
    for client in clients:
        if not client:
            donor = max(clients, key=len)
            client.append(donor.pop())


PartitionFn = Callable[[dict[str, list[Frame]], int, float, np.random.Generator], list[list[Frame]]]
PARTITIONS: dict[str, PartitionFn] = {
    "vehicle": _by_vehicle,
    "iid": _iid,
    "dirichlet": _dirichlet,
}


def partition_frames(
    sources: dict[str, list[Frame]],
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[list[Frame]]:
    """Split ``sources`` (source name -> frames) into ``num_clients`` frame lists.

    ``scheme`` is a key of ``PARTITIONS``; ``alpha`` is the Dirichlet concentration (``dirichlet``
    only). Sources are taken in name order, so the result depends only on the inputs and ``seed``.
    """
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition {scheme!r}; valid: {sorted(PARTITIONS)}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"partition='dirichlet' needs alpha > 0, got {alpha}")
    total = sum(len(frames) for frames in sources.values())
    if total < num_clients:
        raise ValueError(f"cannot give {num_clients} clients one frame each: only {total} frames found")
    ordered = {name: list(sources[name]) for name in sorted(sources)}
    return PARTITIONS[scheme](ordered, num_clients, alpha, np.random.default_rng(seed))
