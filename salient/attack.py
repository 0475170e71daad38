"""The feature attack ("amplified feature", docs/design.md §2): what a neuron responds to, made visible.

100 steps of x <- clip(x + 10 * g / ||g||_2, 0, 1), g the gradient of the penultimate feature r_j
with respect to the image, the L2 norm taken per image, starting from the top images.

Back-propagating through many images at once takes much memory (about 35 GB for 256 ResNet-50
images at 224 px in fp32), so the rows run in chunks sized by a memory budget
(:func:`rows_per_chunk`); images are independent, so chunks change no result.
"""

from __future__ import annotations

import torch
from torch import Tensor

from salient.models import SalientModel


def feature_attack(
    model: SalientModel, images: Tensor, features: Tensor | list[int], steps: int = 100, step_size: float = 10.0,
    chunk: int | None = None, pad: bool = False,
) -> Tensor:
    """Amplify feature ``features[i]`` in ``images[i]`` (``[N, 3, H, W]`` in [0, 1]); images are independent.

    ``chunk``: rows attacked at once (default: all). ``pad``: the last chunk padded to ``chunk`` rows,
    so that every call has one input shape (``cudnn.benchmark`` tunes once per shape).
    The model must be in eval mode (BatchNorm on running statistics) so that one image's gradient
    does not depend on the others in the batch.
    """
    if model.training:
        raise ValueError("the feature attack needs the model in eval mode")
    idx = torch.as_tensor(features, device=images.device)
    n = len(images)
    chunk = n if chunk is None else max(1, chunk)
    if chunk >= n and not pad:
        return _attack(model, images, idx, steps, step_size)
    parts = []
    for start in range(0, n, chunk):
        x, j = images[start : start + chunk], idx[start : start + chunk]
        m = len(x)
        if pad and m < chunk:
            x = torch.cat([x, x[:1].expand(chunk - m, *x.shape[1:])])
            j = torch.cat([j, j[:1].expand(chunk - m)])
        parts.append(_attack(model, x, j, steps, step_size)[:m])
    return torch.cat(parts)


def _attack(model: SalientModel, images: Tensor, idx: Tensor, steps: int, step_size: float) -> Tensor:
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


def bytes_per_image(model: SalientModel, crop: int, device: str | torch.device = "cpu") -> int:
    """An estimate of the memory one image takes in the attack: twice the outputs of every module
    in one forward pass (what autograd keeps for the backward pass, and the gradients it makes),
    in float32."""
    sizes: list[int] = []

    def count(module: torch.nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, Tensor):
            sizes.append(output.numel() * 4)

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros((1, 3, crop, crop), device=device))
    finally:
        for h in hooks:
            h.remove()
    return 2 * sum(sizes)


def rows_per_chunk(budget_bytes: int, per_image: int, most: int) -> int:
    """How many images to attack at once within ``budget_bytes``: at least one, at most ``most``."""
    return max(1, min(most, budget_bytes // max(1, per_image)))
