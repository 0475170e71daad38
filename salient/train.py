"""Train and score the small demo classifier of the embedded world, deterministically, on the CPU.

The classifier is trained through :class:`salient.models.SalientModel`, so it sees ``[0, 1]`` images
and normalises them itself, exactly as every later stage that loads its checkpoint does.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor, nn

from salient import images, models, plan, storage
from salient.errors import InputError

DEMO_EPOCHS = 30
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 256
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4


def image_folder(root: str) -> list[tuple[str, int]]:
    """``(relpath, label)`` of every image under an ImageFolder ``root`` (any fsspec URI), in ImageFolder order."""
    table = plan.list_images(root).table
    if table.num_rows == 0:
        raise InputError(f"image folder {root!r} holds no images in <class>/<file> folders")
    return list(zip(table.column("relpath").to_pylist(), table.column("label").to_pylist()))


def load_images(root: str, items: list[tuple[str, int]]) -> tuple[Tensor, Tensor]:
    """The images (``uint8`` N x 3 x H x W, RGB, as stored) and labels of ``items`` under ``root``."""
    arrays = [np.asarray(images.decode(storage.read_bytes(storage.under(root, rel)))) for rel, _ in items]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise InputError(f"images under {root!r} differ in size ({sorted(shapes)[:3]}); give images of one size")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return batch, torch.tensor([label for _, label in items])


def _to_float(pixels: Tensor) -> Tensor:
    return pixels.float().div_(255.0)


def train_demo(data: str, out: str, rho_free: bool = False, epochs: int | None = None, seed: int = 0) -> dict:
    """Train ``tiny_resnet`` on a world's ``train`` split (``train_free`` when ``rho_free``) and save it.

    The checkpoint is written to ``out`` (any fsspec URI) in the robustness format; ``epochs``
    defaults to :data:`DEMO_EPOCHS`. The same arguments give the same weights for a given torch
    build and thread count. Returns ``checkpoint``, ``split``, ``epochs``, ``seconds``, ``images``
    and ``train_accuracy`` (of the final model, in eval mode, without augmentation).
    """
    epochs = DEMO_EPOCHS if epochs is None else epochs
    if epochs < 1:
        raise InputError(f"epochs={epochs}: train for at least one epoch")
    world_json = storage.join(data, "world.json")
    if not storage.exists(world_json):
        raise InputError(f"{data!r} holds no world.json; write a world there first with `salient synth --out {data}`")
    params = storage.read_json(world_json)["params"]
    size, num_classes = int(params["size"]), int(params["classes"])
    split = "train_free" if rho_free else "train"
    root = storage.join(data, split)
    items = image_folder(root)
    pixels, labels = load_images(root, items)
    if pixels.shape[-2:] != (size, size):
        raise InputError(f"images under {root!r} are {tuple(pixels.shape[-2:])}, world.json says {size}x{size}")

    start = time.perf_counter()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = models.SalientModel(models.TinyResNet(num_classes), "tiny_resnet")
            _fit(model, pixels, labels, epochs, torch.Generator().manual_seed(seed))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    models.save_checkpoint(model, out, "robustness", epochs)
    seconds = time.perf_counter() - start
    predictions = _predict(model, pixels)
    return {
        "checkpoint": out,
        "split": split,
        "epochs": epochs,
        "seconds": seconds,
        "images": len(items),
        "train_accuracy": float((predictions == labels).float().mean()),
    }


def _fit(model: models.SalientModel, pixels: Tensor, labels: Tensor, epochs: int, generator: torch.Generator) -> None:
    steps = epochs * -(-len(labels) // BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=generator).split(BATCH_SIZE):
            x = _to_float(pixels[idx])
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = loss_fn(model(x).logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def _predict(model: models.SalientModel, pixels: Tensor) -> Tensor:
    with torch.inference_mode():
        return torch.cat([model(_to_float(batch)).logits.argmax(1) for batch in pixels.split(EVAL_BATCH_SIZE)])


def accuracy(checkpoint: str, root: str, arch: str = "tiny_resnet") -> float:
    """Top-1 accuracy of ``checkpoint`` on the ImageFolder ``root`` (labels: sorted class folders)."""
    model = models.load(checkpoint, arch, "auto")
    items = image_folder(root)
    correct = 0
    for start in range(0, len(items), EVAL_BATCH_SIZE):
        pixels, labels = load_images(root, items[start : start + EVAL_BATCH_SIZE])
        correct += int((_predict(model, pixels) == labels).sum())
    return correct / len(items)
