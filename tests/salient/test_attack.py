import pytest
import torch

from salient import attack, models


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = models.TinyResNet(num_classes=3)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    return models.SalientModel(net, "tiny_resnet").eval()


def _reference(model, x0, j, steps, step):
    """One image at a time: x <- clip(x + step * g / ||g||_2, 0, 1), g = d r_j / d x."""
    x = x0.clone()
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        r = model(x[None]).features[0, j]
        (g,) = torch.autograd.grad(r, x)
        x = torch.clamp(x + step * g / g.norm(), 0, 1)
    return x.detach()


def test_batched_attack_equals_per_image_reference(tiny):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        top = tiny(x).features.argsort(dim=1, descending=True)
    feats = [int(top[0, 0]), int(top[1, 1]), int(top[2, 0])]  # active features: their gradient is not zero
    out = attack.feature_attack(tiny, x, feats, steps=4, step_size=2.0)
    for i, j in enumerate(feats):
        torch.testing.assert_close(out[i], _reference(tiny, x[i], j, 4, 2.0), atol=1e-5, rtol=1e-4)
    assert out.min() >= 0 and out.max() <= 1


def test_one_step_moves_exactly_step_size_and_raises_the_feature(tiny):
    x = 0.25 + 0.5 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = tiny(x).features
    j = [int(before[0].argmax()), int(before[1].argmax())]
    out = attack.feature_attack(tiny, x, j, steps=1, step_size=0.1)
    moved = (out - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(moved, torch.full((2,), 0.1), atol=1e-5, rtol=0)
    with torch.no_grad():
        after = tiny(out).features
    assert after[0, j[0]] > before[0, j[0]] and after[1, j[1]] > before[1, j[1]]


def test_needs_eval_mode(tiny):
    tiny.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            attack.feature_attack(tiny, torch.rand(1, 3, 16, 16), [0], steps=1)
    finally:
        tiny.eval()
