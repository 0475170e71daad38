"""The feature attack ("amplified feature", docs/design.md §2): what a neuron responds to, made visible.

100 steps of x <- clip(x + 10 * g / ||g||_2, 0, 1), g the gradient of the penultimate feature r_j
with respect to the image, the L2 norm taken per image, starting from the top images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from salient.models import SalientModel


def feature_attack(model: SalientModel, images: Tensor, features: Tensor | list[int], steps: int = 100, step_size: float = 10.0) -> Tensor:
    """Amplify feature ``features[i]`` in ``images[i]`` (``[N, 3, H, W]`` in [0, 1]); images are independent.

    The model must be in eval mode (BatchNorm on running statistics) so that one image's gradient
    does not depend on the others in the batch.
    """
    if model.training:
        raise ValueError("the feature attack needs the model in eval mode")
    idx = torch.as_tensor(features, device=images.device)
    rows = torch.arange(len(idx), device=images.device)
    x = images.detach().clone()
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            objective = model(x).features[rows, idx].sum()
            (grad,) = torch.autograd.grad(objective, x)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x = (x.detach() + step_size * grad / norm).clamp_(0.0, 1.0)
    return x.detach()
