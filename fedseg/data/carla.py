"""Load CARLA-format camera folders: discovery, eager validation, a torch Dataset, a fleet split.

Layouts accepted (the CARLA collector's and the public Lyft-Udacity CARLA set's):

* ``<root>/<vehicle or split>/CameraRGB/*.png`` + ``CameraSeg/*.png``, e.g. ``root/dataA..dataE``;
* ``<root>/CameraRGB`` + ``<root>/CameraSeg``: one vehicle, named after ``root``.

A frame is a pair of same-named files. ``CameraSeg`` holds the tag id in the red channel (green
and blue are ignored). A folder named ``heldout``, ``val`` or ``test`` is the held-out set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from fedseg.data.frames import Frame
from fedseg.data.normalize import normalize
from fedseg.data.partition import partition_frames
from fedseg.errors import DataError
from fedseg.labels import TAGSETS, LabelMap, TagSet, get_tagset

RGB_DIR = "CameraRGB"
SEG_DIR = "CameraSeg"
HELDOUT_NAMES = ("heldout", "val", "test")  # in priority order when several exist
INPUT_VARIANTS = ("rgb", "seg")


def _is_camera_folder(folder: Path) -> bool:
    return (folder / RGB_DIR).is_dir() or (folder / SEG_DIR).is_dir()


def _png_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"}


def _pair_frames(folder: Path, source: str) -> list[Frame]:
    """The frames of one camera folder, sorted by file name (CARLA names frames by number)."""
    rgb_dir, seg_dir = folder / RGB_DIR, folder / SEG_DIR
    for have, missing in ((rgb_dir, seg_dir), (seg_dir, rgb_dir)):
        if not missing.is_dir():
            raise DataError(f"{missing}: folder missing; {have} needs a {missing.name} twin folder")
    rgb_names, seg_names = _png_names(rgb_dir), _png_names(seg_dir)
    if not rgb_names and not seg_names:
        raise DataError(f"{folder}: no frames ({RGB_DIR}/ and {SEG_DIR}/ hold no .png files)")
    for names, here, twins, there in (
        (rgb_names, rgb_dir, seg_names, seg_dir),
        (seg_names, seg_dir, rgb_names, rgb_dir),
    ):
        lonely = sorted(names - twins)
        if lonely:
            more = f" ({len(lonely) - 1} more unpaired, e.g. {', '.join(lonely[1:4])})" if lonely[1:] else ""
            raise DataError(f"{here / lonely[0]}: unpaired frame, no {lonely[0]} in {there}{more}")
    return [Frame(rgb_dir / name, seg_dir / name, source) for name in sorted(rgb_names)]


def discover(root: Path) -> dict[str, list[Frame]]:
    """Find every camera folder under ``root``: source name -> frames sorted by file name.

    Lists and pairs files without opening them (``validate`` does that); raises ``DataError`` for a
    missing root, no camera folders, a missing twin folder, an empty folder or an unpaired file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root does not exist or is not a folder")
    if _is_camera_folder(root):
        return {root.resolve().name: _pair_frames(root, root.resolve().name)}
    sources = {
        sub.name: _pair_frames(sub, sub.name)
        for sub in sorted(root.iterdir())
        if sub.is_dir() and not sub.name.startswith(".") and _is_camera_folder(sub)
    }
    if not sources:
        raise DataError(
            f"{root}: no frames found; expected <root>/<vehicle>/{RGB_DIR}/*.png + {SEG_DIR}/*.png "
            f"or <root>/{RGB_DIR} + <root>/{SEG_DIR}"
        )
    return sources


def _read_rgb(path: Path) -> np.ndarray:
    """Decode a PNG as (H, W, 3) uint8 RGB (alpha dropped); a broken file names itself."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split())  # PIL messages may span lines; DataError is one line
        raise DataError(f"{path}: cannot read as an image ({type(e).__name__}: {reason})") from e


def _read_tags(path: Path, tagset: TagSet) -> np.ndarray:
    """The (H, W) uint8 tag ids of a CameraSeg PNG (its red channel), checked against ``tagset``."""
    tags = np.ascontiguousarray(_read_rgb(path)[..., 0])
    if tags.max(initial=0) >= tagset.num_tags:
        bad = np.unique(tags[tags >= tagset.num_tags])
        fits = [name for name, ts in TAGSETS.items() if bad.max() < ts.num_tags]
        hint = f"; is this {' or '.join(fits)} data?" if fits else ""
        raise DataError(
            f"{path}: tag ids {bad[:10].tolist()} outside tag set {tagset.name!r} "
            f"(valid ids 0..{tagset.num_tags - 1}){hint}"
        )
    return tags


def _check_sizes(frame: Frame, rgb_shape: tuple[int, ...], seg_shape: tuple[int, ...]) -> None:
    if rgb_shape[:2] != seg_shape[:2]:
        raise DataError(
            f"{frame.seg}: label size {seg_shape[1]}x{seg_shape[0]} does not match "
            f"RGB {frame.rgb.name} size {rgb_shape[1]}x{rgb_shape[0]} (WxH)"
        )


def _load_pair(frame: Frame, tagset: TagSet) -> tuple[np.ndarray, np.ndarray]:
    """Decode and check one frame: (H, W, 3) uint8 RGB and (H, W) uint8 tag ids."""
    rgb = _read_rgb(frame.rgb)
    tags = _read_tags(frame.seg, tagset)
    _check_sizes(frame, rgb.shape, tags.shape)
    return rgb, tags


def validate(frames: Sequence[Frame], tagset: str, *, progress: bool = False) -> None:
    """Decode every file of ``frames`` and check it, so bad data fails before training starts.

    Raises ``DataError`` on the first unreadable PNG, RGB/label size mismatch or tag id outside
    ``tagset``; ``progress`` shows a tqdm bar (decoding thousands of 800x600 frames takes a while).
    """
    ts = get_tagset(tagset)
    for frame in tqdm(frames, desc="validating frames", unit="frame", disable=not progress):
        _load_pair(frame, ts)


def _resize(
    image: np.ndarray | None, tags: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray]:
    """Resize to (H, W): bilinear for the image, nearest for tags (never invent a tag id)."""
    height, width = size
    if tags.shape == (height, width):
        return image, tags
    tags = np.array(Image.fromarray(tags).resize((width, height), Image.Resampling.NEAREST))
    if image is not None:
        image = np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    return image, tags


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """CARLA frames as ``(image, mask)``: float32 (3, H, W) ImageNet-normalised, int64 (H, W).

    ``input_variant`` ``"rgb"`` feeds the RGB camera; ``"seg"`` feeds the semantic camera rendered
    in its CityScapes palette (the paper's SEG variant; the RGB file is then not read). Mask values
    are ``label_map`` classes, ``IGNORE_INDEX`` where the map drops a tag. ``image_size`` (H, W)
    resizes; for ``"seg"`` the palette is applied after the nearest resize, so colours stay exact.
    ``cache`` keeps the decoded uint8 arrays in memory: 4 bytes a pixel, 1.9 MB an 800x600 frame.
    """

    def __init__(
        self,
        frames: Sequence[Frame],
        label_map: LabelMap,
        *,
        input_variant: str = "rgb",
        image_size: tuple[int, int] | None = None,
        cache: bool = True,
    ) -> None:
        if input_variant not in INPUT_VARIANTS:
            raise DataError(f"unknown input_variant {input_variant!r}; valid: {list(INPUT_VARIANTS)}")
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ValueError(f"image_size must be (height, width) > 0, got {image_size}")
        self.frames = list(frames)
        self.label_map = label_map
        self.input_variant = input_variant
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.cache = cache
        self._tagset = get_tagset(label_map.tagset)
        self._cached: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.frames)

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 input image and (H, W) uint8 class mask of frame ``index``."""
        frame = self.frames[index]
        if self.input_variant == "rgb":
            image: np.ndarray | None
            image, tags = _load_pair(frame, self._tagset)
        else:
            image, tags = None, _read_tags(frame.seg, self._tagset)
        if self.image_size is not None:
            image, tags = _resize(image, tags, self.image_size)
        if image is None:  # "seg": the semantic camera's own colour rendering
            image = self._tagset.palette()[tags]
        return image, self.label_map(tags)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = range(len(self))[index]  # IndexError out of range; one cache key per frame
        arrays = self._cached.get(index)
        if arrays is None:
            arrays = self._decode(index)
            if self.cache:
                self._cached[index] = arrays
        image, mask = arrays
        return normalize(image), torch.from_numpy(mask).long()


@dataclass(frozen=True)
class Fleet:
    """Client frame lists (one per federated client) and the held-out evaluation frames."""

    clients: list[list[Frame]]
    heldout: list[Frame]


def _split_tail(
    sources: dict[str, list[Frame]], fraction: float
) -> tuple[dict[str, list[Frame]], list[Frame]]:
    """Hold out the last ``fraction`` (by file name, i.e. time) of every source, at least 1 frame.

    The tail, not a random pick: consecutive CARLA frames are near duplicates, so randomly held-out
    frames would have twins in training and overstate accuracy. A one-frame source keeps its frame.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    train: dict[str, list[Frame]] = {}
    heldout: list[Frame] = []
    for name, frames in sources.items():
        count = 0 if fraction == 0 else min(len(frames) - 1, max(1, int(fraction * len(frames) + 1e-9)))
        train[name] = frames[: len(frames) - count]
        heldout.extend(frames[len(frames) - count :])
    return train, heldout


def load_fleet(
    root: Path,
    *,
    num_clients: int,
    partition: str = "vehicle",
    alpha: float = 0.5,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    heldout_only: bool = False,
) -> Fleet:
    """Discover ``root``, set the held-out frames aside and split the rest among clients.

    If ``root`` has a folder named ``heldout``, ``val`` or ``test`` (first in that order), that
    folder is the held-out set; none of these folders is ever a client source (a test split must
    not be trained on). Otherwise the tail of every source is held out (see ``_split_tail``).
    ``partition``, ``alpha`` and ``seed`` go to ``partition_frames``. Files are not opened: call
    ``validate`` on the result to check them. A ``root`` holding only held-out folders is a
    ``DataError``, or with ``heldout_only`` (a server's data root) a fleet with no clients.
    """
    root = Path(root)
    sources = discover(root)
    train, heldout = split_heldout(root, sources, heldout_fraction)
    if not train and heldout_only:
        return Fleet(clients=[], heldout=heldout)
    if not train:
        raise DataError(f"{root}: only held-out folders ({', '.join(sources)}); no client data")
    clients = partition_frames(train, num_clients, partition, alpha=alpha, seed=seed)
    return Fleet(clients=clients, heldout=heldout)


def split_heldout(root: Path, sources: dict[str, list[Frame]],
                  fraction: float) -> tuple[dict[str, list[Frame]], list[Frame]]:
    """``discover(root)``'s sources without the held-out frames, and those frames.

    A folder named ``heldout``, ``val`` or ``test`` (the first in that order) is the held-out set
    and no such folder is a client source; without one, the tail of every source is held out. The
    sources come back empty when ``root`` holds only held-out folders (a server's data root may).
    """
    reserved = [] if _is_camera_folder(root) else [n for n in sources if n.lower() in HELDOUT_NAMES]
    if not reserved:
        return _split_tail(sources, fraction)
    chosen = min(reserved, key=lambda n: HELDOUT_NAMES.index(n.lower()))
    return {n: frames for n, frames in sources.items() if n not in reserved}, list(sources[chosen])
