"""The search space: backbone x decoder width x encoder depth x input resolution, one candidate each.

A light encoder saves MACs that smp's default UNet decoder (256-128-64-32-16 channels, the last at
full resolution) spends anyway, so the decoder's width is searched too, as a scale on the registry's
``decoder_channels``; so are the encoder's depth (fewer stages drop the deepest, widest ones) and the
input resolution the vehicle feeds the model. Precision (fp32 or INT8) is chosen beside them
(``search.precision``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from fedseg.models import get_backbone


@dataclass(frozen=True)
class Architecture:
    """One candidate network: what :func:`fedseg.models.build_model` builds and the input it is fed."""

    name: str  # the backbone, plus each dimension the search varies (``mobilenet_v2 dec0.5 d4 96x128``)
    backbone: str
    decoder_scale: float
    decoder_channels: tuple[int, ...]
    encoder_depth: int
    image_size: tuple[int, int]  # deployment (H, W): latency and memory are measured at it

    def is_registry_default(self) -> bool:
        """Whether this is the backbone exactly as registered (searched.yaml then needs no overrides)."""
        spec = get_backbone(self.backbone)
        return self.decoder_channels == spec.decoder_channels and self.encoder_depth == spec.encoder_depth


def scaled_decoder(backbone: str, scale: float, depth: int) -> tuple[int, ...]:
    """The registry's decoder channels for ``depth`` stages (the high-resolution end), times ``scale``.

    Each width is rounded and kept >= 4, so GroupNorm (DP) and every kernel still have channels.
    """
    channels = get_backbone(backbone).decoder_channels[-depth:]
    return tuple(max(4, round(c * scale)) for c in channels)


def _label(value: float) -> str:
    return f"{value:g}"


def search_space(backbones: Sequence[str], *, decoder_scales: Sequence[float],
                 encoder_depths: Sequence[int | None], image_sizes: Sequence[Sequence[int]]
                 ) -> tuple[list[Architecture], list[str]]:
    """Every combination, backbone-major, and a note per combination left out (and why).

    A depth deeper than the backbone's registered one is left out (its decoder has no widths for
    it); a resolution that ``2**depth`` does not divide is left out (the UNet's skips would not
    line up). Names show only the dimensions with more than one value, so a search of one decoder,
    depth and resolution names its candidates by backbone alone, as before.
    """
    varies = (len(decoder_scales) > 1, len(encoder_depths) > 1, len(image_sizes) > 1)
    kept: list[Architecture] = []
    skipped: list[str] = []
    for backbone, scale, depth_or_none, size in itertools.product(
            backbones, decoder_scales, encoder_depths, image_sizes):
        registered = get_backbone(backbone).encoder_depth
        depth = registered if depth_or_none is None else int(depth_or_none)
        height, width = int(size[0]), int(size[1])
        parts = [backbone]
        parts += [f"dec{_label(scale)}"] if varies[0] else []
        parts += [f"d{depth}"] if varies[1] else []
        parts += [f"{height}x{width}"] if varies[2] else []
        name = " ".join(parts)
        if depth > registered:
            skipped.append(f"{name}: encoder depth {depth} > {backbone}'s {registered}")
            continue
        if height % 2**depth or width % 2**depth:
            skipped.append(f"{name}: {height}x{width} is not divisible by 2**{depth}")
            continue
        if any(a.name == name for a in kept):  # e.g. depth null and 5 on a depth-5 backbone
            continue
        kept.append(Architecture(name, backbone, float(scale), scaled_decoder(backbone, scale, depth),
                                 depth, (height, width)))
    return kept, skipped
