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


def test_a_chunked_attack_equals_one_batch(tiny):
    """Chunks by a memory budget (and the last one padded, as on CUDA) change no image."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(7, 3, 32, 32, generator=g)
    feats = [0, 5, 3, 3, 9, 1, 2]
    whole = attack.feature_attack(tiny, x, feats, steps=3, step_size=2.0)
    for chunk, pad in ((3, False), (3, True), (1, False), (7, True), (20, True)):
        out = attack.feature_attack(tiny, x, feats, steps=3, step_size=2.0, chunk=chunk, pad=pad)
        assert out.shape == whole.shape
        torch.testing.assert_close(out, whole, atol=1e-6, rtol=1e-5)


def test_the_memory_estimate_counts_every_layers_output(tiny):
    """A hand count for a one-layer model: its output is 8 x 16 x 16 floats per image."""

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.relu = torch.nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(x))

    per_image = attack.bytes_per_image(One(), crop=32)
    assert per_image == 2 * 2 * (8 * 16 * 16 * 4)  # conv and relu outputs, kept and their gradients
    assert attack.bytes_per_image(tiny, 64) > attack.bytes_per_image(tiny, 32) > 0
    assert attack.rows_per_chunk(10 * per_image, per_image, most=64) == 10
    assert attack.rows_per_chunk(10 * per_image, per_image, most=4) == 4
    assert attack.rows_per_chunk(per_image // 2, per_image, most=64) == 1
