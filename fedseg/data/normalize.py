"""The one home of the input normalisation: uint8 camera image <-> normalised float tensor.

The encoders are ImageNet-pretrained, so inputs are normalised with ImageNet's statistics. The
dataset (``normalize``), the baselines and the plots (``denormalize``) all use these functions, so
they cannot drift apart.
"""

from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)  # float32, broadcast over (3, H, W)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 image -> (3, H, W) float32, scaled to [0, 1] then ImageNet-normalised."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (x - _MEAN) / _STD


def denormalize(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Undo ``normalize``: (3, H, W) float -> (H, W, 3) uint8.

    Exact on ``normalize``'s output: it divides uint8 values by 255 and normalises in float32, so
    rounding after the inverse recovers every value. Values outside [0, 255] are clipped.
    """
    x = torch.as_tensor(image).detach().cpu().float()
    raw = (x * _STD + _MEAN) * 255.0
    return raw.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
