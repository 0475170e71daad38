"""The pre-flight: every check of a command's config and inputs, before any compute, run once.

Each failure is one line naming the key and its value; all of them are raised together as a
:class:`~salient.errors.ConfigError`. The pre-flight reads each checkpoint once: the same bytes
are hashed (the SHA-256 that cache keys use) and loaded (to check the architecture), and both are
kept in the :class:`Preflight` it returns, which the run uses instead of reading them again.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, PrivateAttr

from salient import storage
from salient.config import IMAGE_EXTENSIONS, MAX_CHECKPOINT_BYTES, SECTIONS, Config, cut, show
from salient.errors import LINK_LOOP, ConfigError

if TYPE_CHECKING:
    from salient.models import SalientModel
    from salient.stage import Stage


class Preflight(BaseModel):
    """What the pre-flight read, for the run that follows: the SHA-256 of every input file it
    hashed (by URI) and, in this process only, the models it loaded."""

    stages: list[str] = []
    digests: dict[str, str] = {}
    _models: dict[tuple[str, str, str], SalientModel] = PrivateAttr(default_factory=dict)

    def digest(self, uri: str) -> str:
        """The SHA-256 of the file at ``uri``, read once per run."""
        if uri not in self.digests:
            self.digests[uri] = storage.sha256(uri)
        return self.digests[uri]

    def model(self, checkpoint: str, arch: str, format: str) -> SalientModel:
        """The classifier in ``checkpoint``, read and hashed once per run."""
        from salient import models

        key = (checkpoint, arch, format)
        if key not in self._models:
            data = models.checkpoint_bytes(checkpoint)
            self.digests.setdefault(checkpoint, hashlib.sha256(data).hexdigest())
            self._models[key] = models.load(checkpoint, arch, format, data=data)  # type: ignore[arg-type]
        return self._models[key]


def _require(cfg: Config, sections: Iterable[str]) -> list[str]:
    hints = {"dataset": "dataset.root", "model": "model.checkpoint", "output": "output"}
    return [
        f"{s}: missing; this command needs {hints[s]} (set it in the config or with --set {hints[s]}=...)"
        for s in sections
        if s in hints and getattr(cfg, s) is None
    ]


def check_dataset(cfg: Config, max_folders: int = 8) -> list[str]:
    """The dataset root exists and holds class folders with images; optional files exist."""
    assert cfg.dataset is not None
    root = cfg.dataset.root
    problems = []
    try:
        fs, path = storage.url_to_fs(root)
        if not fs.isdir(path):
            return [f"dataset.root = {root!r}: does not exist or is not a directory; point it at an ImageFolder root (<root>/<wnid>/<image>)"]
        folders = sorted(e["name"] for e in fs.ls(path, detail=True) if e["type"] == "directory")
    except Exception as exc:  # noqa: BLE001 -- any filesystem error is reported as this key's problem
        return [f"dataset.root = {root!r}: cannot be listed ({type(exc).__name__}: {exc})"]
    if not folders:
        problems.append(f"dataset.root = {root!r}: has no class folders; expected <root>/<wnid>/<image>")
    else:
        with_images = 0
        for folder in folders[:max_folders]:
            if any(str(n).lower().endswith(IMAGE_EXTENSIONS) for n in fs.ls(folder, detail=False)):
                with_images += 1
        if with_images == 0:
            problems.append(
                f"dataset.root = {root!r}: class folders hold no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "expected <root>/<wnid>/<image>"
            )
    for key in ("class_metadata", "groundtruth"):
        value = getattr(cfg.dataset, key)
        if value is not None and not storage.exists(value):
            problems.append(f"dataset.{key} = {value!r}: does not exist")
    if cfg.dataset.class_metadata is not None and storage.exists(cfg.dataset.class_metadata):
        from salient import metadata

        try:
            metadata.read_class_metadata(cfg.dataset.class_metadata)
        except ValueError as exc:
            problems.append(f"dataset.class_metadata = {cfg.dataset.class_metadata!r}: {exc}")
    return problems


def _checkpoint_problem(checkpoint: str) -> str | None:
    """Why the checkpoint cannot be read, when its listing shows it: found before the model code
    (torch: seconds of start-up) is imported."""
    try:
        problem = storage.input_file_problem(checkpoint, MAX_CHECKPOINT_BYTES)
    except FileNotFoundError:
        return None  # said by the loader, with what to do
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        problem = LINK_LOOP
    return None if problem is None else f"checkpoint {checkpoint!r}: {problem}"


def check_model(cfg: Config, found: Preflight, need_discovery: bool = False) -> list[str]:
    """The architecture is known and the checkpoint loads for it."""
    assert cfg.model is not None
    m = cfg.model
    problem = _checkpoint_problem(m.checkpoint)
    if problem is not None:
        return [f"model.checkpoint = {m.checkpoint!r}: {problem}"]
    from salient import models

    if not models.known_arch(m.arch):
        return [
            f"model.arch = {m.arch!r}: unknown; use a torchvision classifier name (e.g. resnet50), "
            f"one of {sorted(models.LOCAL_ARCHS)}, or timm:<name> with timm installed"
        ]
    try:
        model = found.model(m.checkpoint, m.arch, m.format)
    except models.CheckpointError as exc:
        return [f"model.checkpoint = {m.checkpoint!r}: {exc}"]
    if need_discovery and not model.supports_discovery:
        return [f"model.arch = {m.arch!r}: has no last conv stage and final linear layer; discovery needs a ResNet-like CNN"]
    return []


def check_eval_models(cfg: Config, found: Preflight) -> list[str]:
    """Every ``evaluate.models`` entry names a known arch and its checkpoint loads for it."""
    problems = [] if cfg.evaluate.models else ["evaluate.models: empty; list the classifiers to measure ({name, arch, checkpoint, format})"]
    for i, m in enumerate(cfg.evaluate.models):
        problem = _checkpoint_problem(m.checkpoint)
        if problem is not None:
            problems.append(f"evaluate.models.{i}.checkpoint = {m.checkpoint!r}: {problem}")
            continue
        from salient import models

        if not models.known_arch(m.arch):
            problems.append(f"evaluate.models.{i}.arch = {m.arch!r}: unknown; use a torchvision classifier name or timm:<name>")
            continue
        try:
            found.model(m.checkpoint, m.arch, m.format)
        except models.CheckpointError as exc:
            problems.append(f"evaluate.models.{i}.checkpoint = {m.checkpoint!r}: {exc}")
    return problems


def check_output(cfg: Config) -> list[str]:
    """The output root can be written."""
    assert cfg.output is not None
    try:
        storage.check_writable(cfg.output)
    except Exception as exc:  # noqa: BLE001 -- report any storage failure against the key
        return [f"output = {show(cfg.output)}: not writable ({type(exc).__name__}: {cut(str(exc))})"]
    return []


def _sections(cfg: Config, sections: Sequence[str], found: Preflight, need_discovery: bool) -> list[str]:
    problems = _require(cfg, sections)
    if not problems:
        if "dataset" in sections:
            problems += check_dataset(cfg)
        if "model" in sections:
            problems += check_model(cfg, found, need_discovery)
        if "output" in sections:
            problems += check_output(cfg)
    return problems


def check(cfg: Config, sections: Iterable[str]) -> Preflight:
    """The checks of ``sections`` (some of dataset, model, output) only; ``ConfigError`` lists every failure."""
    found = Preflight()
    problems = _sections(cfg, [s for s in SECTIONS if s in set(sections)], found, need_discovery=False)
    if problems:
        raise ConfigError(problems)
    return found


def for_stages(cfg: Config, stages: Sequence[Stage]) -> Preflight:
    """The checks of every section the ``stages`` use and each stage's own, run once;
    ``ConfigError`` lists every failure."""
    found = Preflight(stages=[s.name for s in stages])
    needed = {sec for s in stages for sec in s.requires}
    problems = _sections(cfg, [s for s in SECTIONS if s in needed], found, any(s.needs_discovery for s in stages))
    if not problems:
        for stage in stages:
            problems += stage.check(cfg, found)
    if problems:
        raise ConfigError(problems)
    return found


def present_sections(cfg: Config) -> list[str]:
    """The checkable sections that this config sets."""
    return [s for s in SECTIONS if getattr(cfg, s) is not None]
