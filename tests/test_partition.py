"""Partition schemes and the fleet's held-out split, with hand-computed sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedseg.data.carla import Frame, load_fleet
from fedseg.data.partition import PARTITIONS, _largest_remainder, partition_frames


def make_sources(sizes: dict[str, int]) -> dict[str, list[Frame]]:
    """Frames that only carry names: partitioning never opens files."""
    return {
        source: [
            Frame(Path(f"{source}/rgb/{i:03d}.png"), Path(f"{source}/seg/{i:03d}.png"), source)
            for i in range(n)
        ]
        for source, n in sizes.items()
    }


def make_tree(root: Path, sizes: dict[str, int]) -> None:
    """Empty .png files in the CARLA layout: enough for discovery, which does not decode."""
    for source, n in sizes.items():
        for camera in ("CameraRGB", "CameraSeg"):
            (root / source / camera).mkdir(parents=True)
            for i in range(n):
                (root / source / camera / f"{i:03d}.png").touch()


def flatten(clients: list[list[Frame]]) -> list[Frame]:
    return [frame for client in clients for frame in client]


def source_entropy(client: list[Frame]) -> float:
    counts = np.array(list(Counter(f.source for f in client).values()), dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_registry_and_unknown_scheme() -> None:
    assert sorted(PARTITIONS) == ["dirichlet", "iid", "vehicle"]
    with pytest.raises(ValueError, match=r"'by_town'.*\['dirichlet', 'iid', 'vehicle'\]"):
        partition_frames(make_sources({"a": 3}), 1, "by_town")


def test_iid_near_equal_sizes_each_frame_once_and_seeded() -> None:
    # Prepare: 10 frames over two sources
    sources = make_sources({"a": 6, "b": 4})
    # Execute
    clients = partition_frames(sources, 3, "iid", seed=0)
    # Assert: 10 = 4 + 3 + 3
    assert [len(c) for c in clients] == [4, 3, 3]
    assert sorted(flatten(clients), key=str) == sorted(flatten(list(sources.values())), key=str)
    assert partition_frames(sources, 3, "iid", seed=0) == clients
    assert partition_frames(sources, 3, "iid", seed=1) != clients


def test_vehicle_one_source_per_client_in_name_order() -> None:
    # Prepare: dict given out of name order
    sources = make_sources({"dataC": 1, "dataA": 2, "dataB": 3})
    # Execute
    clients = partition_frames(sources, 3, "vehicle")
    # Assert
    assert clients == [sources["dataA"], sources["dataB"], sources["dataC"]]


def test_vehicle_count_mismatch_says_how_many_folders() -> None:
    with pytest.raises(ValueError, match="3 folders") as err:
        partition_frames(make_sources({"a": 2, "b": 2, "c": 2}), 2, "vehicle")
    assert "num_clients=2" in str(err.value) and "iid" in str(err.value) and "dirichlet" in str(err.value)


def test_more_clients_than_frames() -> None:
    with pytest.raises(ValueError, match="only 2 frames"):
        partition_frames(make_sources({"a": 2}), 3, "iid")


def test_largest_remainder_golden() -> None:
    # 7 * (0.5, 0.3, 0.2) = (3.5, 2.1, 1.4) -> floors (3, 2, 1); the one left goes to .5
    assert _largest_remainder(np.array([0.5, 0.3, 0.2]), 7) == [4, 2, 1]
    assert _largest_remainder(np.array([0.0, 0.0]), 3) == [2, 1]  # all-zero weights: even split


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_uses_every_frame_once_and_is_seeded(seed: int) -> None:
    # Prepare
    sources = make_sources({"a": 25, "b": 25, "c": 25, "d": 25})
    # Execute
    clients = partition_frames(sources, 5, "dirichlet", alpha=0.5, seed=seed)
    # Assert
    assert len(clients) == 5 and all(clients)
    assert Counter(flatten(clients)) == Counter(flatten(list(sources.values())))
    assert partition_frames(sources, 5, "dirichlet", alpha=0.5, seed=seed) == clients


def test_dirichlet_never_leaves_a_client_empty() -> None:
    # Prepare: tiny alpha and nearly as many clients as frames invite empty clients
    sources = make_sources({"a": 3, "b": 3, "c": 3})
    for seed in range(10):
        # Execute
        clients = partition_frames(sources, 8, "dirichlet", alpha=0.01, seed=seed)
        # Assert
        assert all(clients) and len(flatten(clients)) == 9 == len(set(flatten(clients)))


def test_small_alpha_skews_sources_more_than_large_alpha() -> None:
    # Prepare
    sources = make_sources({"a": 25, "b": 25, "c": 25, "d": 25})

    def mean_entropy(alpha: float, seed: int) -> float:
        clients = partition_frames(sources, 5, "dirichlet", alpha=alpha, seed=seed)
        return float(np.mean([source_entropy(c) for c in clients]))

    # Execute
    skewed = [mean_entropy(0.05, seed) for seed in range(10)]
    mixed = [mean_entropy(100.0, seed) for seed in range(10)]
    # Assert: large alpha is close to the uniform mix's log(4) = 1.386; small alpha far below
    assert all(s < m for s, m in zip(skewed, mixed))
    assert np.mean(mixed) > 1.3 and np.mean(skewed) < 0.8


def test_heldout_folder_is_the_heldout_set(tmp_path: Path) -> None:
    # Prepare
    make_tree(tmp_path, {"dataA": 3, "dataB": 2, "heldout": 4})
    # Execute
    fleet = load_fleet(tmp_path, num_clients=2)
    # Assert
    assert [len(c) for c in fleet.clients] == [3, 2]
    assert [f.source for f in fleet.clients[0]] == ["dataA"] * 3
    assert len(fleet.heldout) == 4 and {f.source for f in fleet.heldout} == {"heldout"}


def test_val_wins_over_test_and_neither_is_trained_on(tmp_path: Path) -> None:
    # Prepare
    make_tree(tmp_path, {"dataA": 3, "test": 2, "val": 1})
    # Execute
    fleet = load_fleet(tmp_path, num_clients=1)
    # Assert
    assert [f.source for f in fleet.heldout] == ["val"]
    assert {f.source for f in flatten(fleet.clients)} == {"dataA"}


def test_heldout_fraction_takes_the_tail_of_every_source(tmp_path: Path) -> None:
    # Prepare: 0.2 * 10 = 2 frames from dataA; 0.2 * 4 = 0.8 -> at least 1 from dataB
    make_tree(tmp_path, {"dataA": 10, "dataB": 4})
    # Execute
    fleet = load_fleet(tmp_path, num_clients=3, partition="iid", heldout_fraction=0.2, seed=3)
    # Assert
    assert [(f.source, f.rgb.name) for f in fleet.heldout] == [
        ("dataA", "008.png"),
        ("dataA", "009.png"),
        ("dataB", "003.png"),
    ]
    assert [len(c) for c in fleet.clients] == [4, 4, 3]  # 11 training frames
    assert not set(flatten(fleet.clients)) & set(fleet.heldout)


def test_one_vehicle_root_named_test_is_not_heldout(tmp_path: Path) -> None:
    # Prepare: the root itself is a camera folder that happens to be called "test"
    make_tree(tmp_path, {"test": 5})
    # Execute
    fleet = load_fleet(tmp_path / "test", num_clients=1)
    # Assert: 0.1 * 5 = 0.5 -> one frame held out, four train
    assert [len(c) for c in fleet.clients] == [4]
    assert [f.rgb.name for f in fleet.heldout] == ["004.png"]
