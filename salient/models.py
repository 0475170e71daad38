"""Classifiers as Salient sees them: ``[0, 1]`` RGB images in, ``(logits, features, maps)`` out.

Checkpoints are read with ``torch.load(weights_only=True)`` only: a file that holds anything but
tensors, plain containers and numpy numbers (:data:`NUMPY_SAFE_GLOBALS`) is refused before any of
it runs. A model normalises its ``[0, 1]`` input itself, with the statistics its checkpoint says
(a ``robustness`` checkpoint's own normaliser) or else the ImageNet ones.
"""

from __future__ import annotations

import io
import pickle
import re
import threading
import zipfile
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from numpy._core import multiarray
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from salient import storage
from salient.config import MAX_CHECKPOINT_BYTES
from salient.errors import ConfigError, InputError

# ImageNet statistics, applied inside the wrapper so that masks and noise live in pixel space.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ROBUSTNESS_PREFIX = "module.model."
# Present in every MadryLab `robustness` checkpoint beside the classifier; not part of its weights.
ROBUSTNESS_IGNORED_PREFIXES = ("module.attacker.", "module.normalizer.")
# The normaliser a robustness model applies to its [0, 1] input (the attacker's copy is for attacks).
ROBUSTNESS_NORMALIZER = "module.normalizer."
ROBUSTNESS_ATTACK_NORMALIZER = "module.attacker.normalize."

# What numpy numbers and arrays of them unpickle through, beside the tensors torch allows: numpy
# scalars (e.g. a robustness checkpoint's ``nat_prec1``), numeric dtypes and arrays. Checkpoints
# written with numpy 1 name the reconstructors under ``numpy.core``. Object arrays stay refused
# (their dtype class is not listed).
_NUMERIC_DTYPES = sorted({type(np.dtype(c)) for c in "?" + np.typecodes["AllInteger"] + "efd"}, key=lambda t: t.__name__)
NUMPY_SAFE_GLOBALS: list = [
    np.dtype, *_NUMERIC_DTYPES, np.ndarray,
    multiarray.scalar, (multiarray.scalar, "numpy.core.multiarray.scalar"),
    multiarray._reconstruct, (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
]
# torch's allowlist is process-wide: loads that widen it take turns so that one load's exit
# cannot narrow it under another's feet.
_SAFE_LOAD = threading.Lock()

CheckpointFormat = Literal["robustness", "torchvision", "auto"]
CHECKPOINT_FORMATS: tuple[str, ...] = ("robustness", "torchvision", "auto")


class CheckpointError(InputError):
    """A checkpoint that cannot be used: unreadable, unsafe, or not matching the architecture."""


class ModelOutput(NamedTuple):
    """What a forward pass returns. ``features``/``maps`` are None for models without a last conv stage."""

    logits: Tensor
    features: Tensor | None
    maps: Tensor | None


class TinyResNet(nn.Module):
    """A small ResNet (BasicBlocks, output stride 8) for the demo world.

    It has the torchvision ResNet's attribute names, so every code path that handles ResNets
    handles it too. At a 64 px crop its last conv stage is 8x8.
    """

    widths = (16, 32, 64, 128)
    strides = (1, 2, 2, 1)

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, self.widths[0], kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        in_ch = self.widths[0]
        for i, (width, stride) in enumerate(zip(self.widths, self.strides), start=1):
            downsample = None
            if stride != 1 or in_ch != width:
                downsample = nn.Sequential(
                    nn.Conv2d(in_ch, width, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(width),
                )
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(in_ch, width, stride, downsample)))
            in_ch = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


LOCAL_ARCHS: dict[str, type[nn.Module]] = {"tiny_resnet": TinyResNet}


def is_resnet_like(net: nn.Module) -> bool:
    """True for networks with a ResNet's stem, four stages, global pooling and a final linear layer."""
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
    return all(hasattr(net, n) for n in names) and isinstance(net.fc, nn.Linear)


class SalientModel(nn.Module):
    """An eval-mode classifier taking ``[0, 1]`` images, normalised inside with ``mean``/``std``
    (per RGB channel; the ImageNet statistics unless the checkpoint has its own).

    ``supports_discovery`` is True when the network has a last conv stage and a final linear layer
    (ResNets and the like): then ``features`` are the global-average-pooled ``maps`` of that stage
    (after its ReLU) and ``fc_weight`` is the final layer's weight. Other classifiers give logits only.
    """

    def __init__(
        self, net: nn.Module, arch: str, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.net = net
        self.arch = arch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.supports_discovery = is_resnet_like(net)
        self.eval()

    @property
    def num_classes(self) -> int:
        return _final_linear_weight(self.net.state_dict())[1].shape[0]

    @property
    def feature_dim(self) -> int:
        if not self.supports_discovery:
            raise ConfigError([f"arch {self.arch!r} has no penultimate conv features; use a ResNet-like arch"])
        return self.net.fc.in_features

    @property
    def fc_weight(self) -> Tensor:
        if not self.supports_discovery:
            raise ConfigError([f"arch {self.arch!r} has no final linear layer over conv features; use a ResNet-like arch"])
        return self.net.fc.weight.detach()

    def forward(self, x: Tensor) -> ModelOutput:
        """The outputs for ``[0, 1]`` images ``[N, 3, H, W]``."""
        return self.forward_normalized((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def forward_normalized(self, x: Tensor) -> ModelOutput:
        """The outputs for images already normalised with :attr:`mean` and :attr:`std`."""
        if not self.supports_discovery:
            return ModelOutput(self.net(x), None, None)
        n = self.net
        h = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        maps = n.layer4(n.layer3(n.layer2(n.layer1(h))))
        features = torch.flatten(n.avgpool(maps), 1)
        return ModelOutput(n.fc(features), features, maps)


def _fuse_conv_bn(module: nn.Module) -> None:
    """Fold eval-mode BatchNorms into the convolutions before them, in place (ResNet naming)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        _fuse_conv_bn(child)
    names = dict(module.named_children())
    for name, conv in names.items():
        bn_name = name.replace("conv", "bn") if name.startswith("conv") else None
        if isinstance(module, nn.Sequential) and name.isdigit():
            bn_name = str(int(name) + 1)
        bn = names.get(bn_name) if bn_name else None
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(module, name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Identity())


def prepare_for_inference(model: SalientModel, device: str = "cpu") -> SalientModel:
    """``model`` on ``device`` in channels-last layout with BatchNorm folded into the convolutions.

    Outputs equal the unfused model's up to float rounding.
    """
    model = model.eval()
    _fuse_conv_bn(model.net)
    return model.to(device=device, memory_format=torch.channels_last)


def load_for_worker(
    checkpoint: str, arch: str, format: CheckpointFormat = "auto", device: str | None = None,
    threads: int | None = None, need_discovery: bool = False,
) -> tuple[SalientModel, str]:
    """A worker's model, loaded once: on ``device`` (default: CUDA when there is one), prepared for
    inference where the arch allows it, with ``threads`` torch threads. Returns (model, device)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        torch.set_num_threads(threads)
    net = load(checkpoint, arch, format)
    if need_discovery and not net.supports_discovery:
        raise ConfigError([f"model.arch = {arch!r} has no last conv stage; this stage needs a ResNet-like CNN"])
    return (prepare_for_inference(net, device) if net.supports_discovery else net.to(device)), device


def build_arch(arch: str, num_classes: int) -> nn.Module:
    """An untrained network of the named architecture: a Salient arch, a torchvision classifier,
    or ``timm:<name>`` when timm is installed."""
    if arch in LOCAL_ARCHS:
        return LOCAL_ARCHS[arch](num_classes=num_classes)
    if arch.startswith("timm:"):
        try:
            import timm  # optional dependency
        except ImportError as exc:
            raise CheckpointError(f"model arch {arch!r} needs timm; install it with `pip install timm`") from exc
        return timm.create_model(arch.removeprefix("timm:"), pretrained=False, num_classes=num_classes)
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)
    if arch not in known:
        raise CheckpointError(
            f"unknown model arch {arch!r}: use a torchvision classifier name (e.g. resnet50, "
            f"convnext_tiny, vit_b_16), one of {sorted(LOCAL_ARCHS)}, or timm:<name>"
        )
    return tvm.get_model(arch, weights=None, num_classes=num_classes)


def known_arch(arch: str) -> bool:
    """Whether ``arch`` names an architecture this installation can build."""
    if arch in LOCAL_ARCHS:
        return True
    if arch.startswith("timm:"):
        try:
            import timm  # optional dependency
        except ImportError:
            return False
        return arch.removeprefix("timm:") in timm.list_models()
    import torchvision.models as tvm

    return arch in tvm.list_models(module=tvm)


RESAVE_HINT = "re-save the weights with torch.save(model.state_dict(), path)"


def _not_a_checkpoint(data: bytes) -> str | None:
    """Why ``data`` cannot be a PyTorch checkpoint, when that shows without unpickling anything."""
    if not data:
        return "is not a readable PyTorch file: it is empty (0 bytes); copy it again"
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return None  # the legacy (pre-1.6) format, or a damaged file: torch.load tells which
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return f"is not a readable PyTorch file: it is a TorchScript archive (torch.jit.save), which runs code when loaded; {RESAVE_HINT}"
    if not any(n.endswith("/data.pkl") for n in names):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"is not a readable PyTorch file: it is a zip archive of something else ({shown or 'no files'}); point at a file written by torch.save"
    return None


def checkpoint_bytes(checkpoint: str) -> bytes:
    """The bytes of the checkpoint at ``checkpoint`` (any fsspec URI): a regular file of at most
    :data:`salient.config.MAX_CHECKPOINT_BYTES`."""
    try:
        return storage.read_input_file(checkpoint, MAX_CHECKPOINT_BYTES)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {checkpoint!r} does not exist") from exc
    except InputError as exc:
        raise CheckpointError(f"checkpoint {checkpoint!r}: {exc}") from None


def read_checkpoint(checkpoint: str, data: bytes | None = None) -> Mapping[str, object]:
    """The checkpoint's top-level object, loaded with ``weights_only=True`` from any fsspec URI
    (or from ``data``, its bytes when they were read already)."""
    if data is None:
        data = checkpoint_bytes(checkpoint)
    problem = _not_a_checkpoint(data)
    if problem is not None:
        raise CheckpointError(f"checkpoint {checkpoint!r} {problem}")
    try:
        with _SAFE_LOAD, torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint!r} holds pickled objects other than tensors, plain containers and "
            f"numpy numbers and was refused ({_refusal(exc)}); nothing in it was run; {RESAVE_HINT}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint!r} is not a readable PyTorch file ({type(exc).__name__}: "
            f"{str(exc)[:160]}); it may be truncated ({len(data):,} bytes here) or another kind of file: "
            f"copy it again, or {RESAVE_HINT}"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {checkpoint!r} holds a {type(obj).__name__}, not a state dict or a dict holding one"
        )
    return obj


def _printable(text: str) -> str:
    """``text`` on one line, with terminal escape codes removed and other control characters shown
    as escapes (names in a refused file are the file's, not ours)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in " ".join(text.split()))


def _refusal(exc: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused (e.g. ``Unsupported global: GLOBAL os.system ...``),
    without torch's advice to widen its allowlist or to load without it."""
    # torch wraps the unpickler's own error, which names what was refused, in that advice
    inner = exc.__context__ if isinstance(exc.__context__, pickle.UnpicklingError) else exc
    text = str(inner)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation of torch.load", 1)[0]
    text = text.split(" Please use `torch.serialization", 1)[0]
    return (_printable(text).strip().rstrip(".") or type(exc).__name__)[:200]


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _inner_state(obj: Mapping[str, object]) -> Mapping[str, Tensor]:
    """The state dict a checkpoint's top-level object is or holds under ``model`` / ``state_dict``."""
    if _is_state_dict(obj):
        return obj  # type: ignore[return-value]
    for key in ("model", "state_dict"):
        if _is_state_dict(obj.get(key)):
            return obj[key]  # type: ignore[return-value]
    keys = ", ".join(sorted(map(str, obj))[:6])
    raise CheckpointError(
        f"checkpoint has no state dict (top-level keys: {keys}); expected a state dict or a dict "
        "with one under 'model' or 'state_dict'"
    )


def extract_state_dict(obj: Mapping[str, object], format: CheckpointFormat = "auto") -> dict[str, Tensor]:
    """The classifier's plain state dict from a checkpoint's top-level object.

    ``robustness``: a dict with ``model`` (or ``state_dict``) whose classifier sits under
    ``module.model.``; ``module.attacker.*`` and ``module.normalizer.*`` are left out (the
    normaliser is read by :func:`normalization_of`).
    ``torchvision``: a plain state dict, or a dict holding one under ``state_dict`` / ``model``.
    ``auto``: whichever fits.
    """
    if format not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}: use one of {', '.join(CHECKPOINT_FORMATS)}")
    inner = _inner_state(obj)
    is_robustness = any(k.startswith(ROBUSTNESS_PREFIX) for k in inner)
    if format == "robustness" and not is_robustness:
        raise CheckpointError(
            f"checkpoint is not in the robustness format: no key starts with {ROBUSTNESS_PREFIX!r} "
            f"(e.g. {', '.join(list(inner)[:3])}); set model.format to torchvision or auto"
        )
    if format == "torchvision" and is_robustness:
        raise CheckpointError(
            "checkpoint is in the robustness format (keys under 'module.model.'); set model.format to robustness or auto"
        )
    if is_robustness:
        state: dict[str, Tensor] = {}
        stray: list[str] = []
        for key, value in inner.items():
            if key.startswith(ROBUSTNESS_PREFIX):
                state[key.removeprefix(ROBUSTNESS_PREFIX)] = value  # type: ignore[assignment]
            elif not key.startswith(ROBUSTNESS_IGNORED_PREFIXES):
                stray.append(key)
        if stray:
            raise CheckpointError(
                f"robustness checkpoint has {len(stray)} keys outside module.model/attacker/normalizer "
                f"(e.g. {', '.join(stray[:3])})"
            )
        return state
    state = dict(inner)  # type: ignore[arg-type]
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


Statistics = tuple[tuple[float, ...], tuple[float, ...]]


def _normalizer(inner: Mapping[str, Tensor], prefix: str) -> Statistics | None:
    """The (mean, std) of the robustness normaliser stored under ``prefix``, if there is one."""
    mean, std = inner.get(prefix + "new_mean"), inner.get(prefix + "new_std")
    if mean is None and std is None:
        return None
    fix = "fix it, or delete the normaliser's keys to use the ImageNet statistics"
    if mean is None or std is None:
        raise CheckpointError(f"robustness checkpoint has only one of {prefix}new_mean and {prefix}new_std; {fix}")
    if mean.numel() != 3 or std.numel() != 3:
        raise CheckpointError(
            f"robustness checkpoint's {prefix}new_mean/new_std have {mean.numel()}/{std.numel()} values, "
            f"not one per RGB channel; {fix}"
        )
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all()) and bool((std > 0).all())):
        raise CheckpointError(
            f"robustness checkpoint's {prefix}new_mean/new_std are not finite with a positive std "
            f"(mean {mean.flatten().tolist()}, std {std.flatten().tolist()}); {fix}"
        )
    return tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())


def normalization_of(obj: Mapping[str, object]) -> Statistics:
    """The per-channel (mean, std) the checkpoint's classifier expects its ``[0, 1]`` input
    normalised with: a robustness checkpoint's own normaliser (``module.normalizer.new_mean`` /
    ``new_std``, which the library applies before the classifier) when it has one, else ImageNet's.

    A checkpoint whose attack normaliser (``module.attacker.normalize.*``) disagrees with it is refused.
    """
    inner = _inner_state(obj)
    if not any(k.startswith(ROBUSTNESS_PREFIX) for k in inner):
        return IMAGENET_MEAN, IMAGENET_STD
    own, attack = _normalizer(inner, ROBUSTNESS_NORMALIZER), _normalizer(inner, ROBUSTNESS_ATTACK_NORMALIZER)
    if own is not None and attack is not None and own != attack:
        raise CheckpointError(
            f"robustness checkpoint has two normalisers that disagree ({ROBUSTNESS_NORMALIZER}new_mean/new_std "
            f"{list(own[0])}/{list(own[1])}, {ROBUSTNESS_ATTACK_NORMALIZER}new_mean/new_std {list(attack[0])}/"
            f"{list(attack[1])}); make them equal, or delete both to use the ImageNet statistics"
        )
    return own or attack or (IMAGENET_MEAN, IMAGENET_STD)


def _final_linear_weight(state: Mapping[str, Tensor]) -> tuple[str, Tensor]:
    for key in reversed(list(state)):
        if key.endswith(".weight") and state[key].ndim == 2:
            return key, state[key]
    raise CheckpointError("checkpoint has no final linear layer (no 2-D '.weight' tensor) to read the number of classes from")


def num_classes_of(state: Mapping[str, Tensor]) -> int:
    """The number of classes, read from the final linear layer's weight."""
    return int(_final_linear_weight(state)[1].shape[0])


def _fit(net: nn.Module, state: Mapping[str, Tensor], arch: str) -> None:
    expected = net.state_dict()
    # Older checkpoints lack BatchNorm's step counter; it does not affect inference.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} keys of the wrong shape (e.g. {'; '.join(wrong_shape[:2])})")
    if problems:
        raise CheckpointError(f"checkpoint does not fit model.arch {arch!r}: " + ", ".join(problems) + "; check model.arch")
    net.load_state_dict(state, strict=False)


def load(checkpoint: str, arch: str = "resnet50", format: CheckpointFormat = "auto", data: bytes | None = None) -> SalientModel:
    """Load a classifier checkpoint (any fsspec URI, or ``data``, its bytes when they were read
    already) as an eval-mode :class:`SalientModel` on the CPU, normalising as the checkpoint says
    (:func:`normalization_of`)."""
    obj = read_checkpoint(checkpoint, data)
    state = extract_state_dict(obj, format)
    mean, std = normalization_of(obj)
    net = build_arch(arch, num_classes_of(state))
    _fit(net, state, arch)
    return SalientModel(net, arch, mean, std)


def robustness_checkpoint(
    net: nn.Module, epoch: int = 0, optimizer: Mapping[str, object] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
) -> dict[str, object]:
    """A checkpoint dict laid out like the MadryLab ``robustness`` library's, whose normaliser holds
    ``mean`` and ``std``."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    model: dict[str, Tensor] = {}
    for prefix in (ROBUSTNESS_PREFIX, "module.attacker.model."):
        model.update({prefix + k: v for k, v in state.items()})
    for prefix in (ROBUSTNESS_NORMALIZER, ROBUSTNESS_ATTACK_NORMALIZER):
        model[prefix + "new_mean"] = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        model[prefix + "new_std"] = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return {"model": model, "epoch": epoch, "optimizer": dict(optimizer or {}), "schedule": None}


def save_checkpoint(net: nn.Module, uri: str, format: Literal["robustness", "torchvision"] = "robustness", epoch: int = 0) -> None:
    """Write ``net``'s weights atomically to ``uri`` in the given checkpoint format; a
    :class:`SalientModel`'s statistics go into a robustness checkpoint's normaliser (a torchvision
    state dict has no place for them: only ImageNet-normalised models can be saved so)."""
    imagenet = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    mean, std = imagenet
    if isinstance(net, SalientModel):
        mean, std, net = net.mean.detach().cpu().flatten(), net.std.detach().cpu().flatten(), net.net
    if format == "torchvision" and not (torch.equal(mean, imagenet[0]) and torch.equal(std, imagenet[1])):
        raise ValueError("a torchvision state dict cannot carry non-ImageNet statistics; save it in the robustness format")
    obj = robustness_checkpoint(net, epoch, mean=mean.tolist(), std=std.tolist()) if format == "robustness" else net.state_dict()
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


def write_random_checkpoint(
    uri: str, arch: str, num_classes: int, seed: int = 0, format: Literal["robustness", "torchvision"] = "robustness",
) -> str:
    """A random-weight ``arch`` for ``num_classes`` written to ``uri``, with BatchNorm statistics that
    are not the identity (so that folding them into the convolutions is exercised); returns ``uri``."""
    torch.manual_seed(seed)
    net = build_arch(arch, num_classes)
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    save_checkpoint(net.eval(), uri, format)
    return uri
