"""The one typed configuration shared by every command and every Prefect flow.

A YAML file plus ``--set section.key=value`` overrides. Sections a command does not use are
optional; :func:`check` runs the pre-flight checks for the sections a command uses, before any
compute, and reports each failure as one line naming the key and its value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from salient import storage
from salient.errors import ConfigError, InputError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# PIL's own decompression-bomb limit (2 * PIL.Image.MAX_IMAGE_PIXELS): the most pixels an image may
# have, stored or after resizing; preprocess.max_pixels can only lower it.
MAX_PIXELS = 178_956_970

# Keys holding local paths or URIs; relative local paths in a file are taken relative to that file.
PATH_KEYS = (
    ("dataset", "root"),
    ("dataset", "class_metadata"),
    ("dataset", "groundtruth"),
    ("model", "checkpoint"),
    ("output",),
    ("annotations", "answers"),
)


# How a field enters the cache keys of the outputs it can change (see :func:`identity`). Every field
# counts by its value unless it says otherwise here.
OMIT = {"salient.key": "omit"}  # changes no output: how work is spread, where a directory is
BY_CONTENT = {"salient.key": "content"}  # a file: its content's SHA-256 counts, not its path


# Config files are small: deeper nesting than this is a mistake or an attack (a parser recursing on
# it would fail with a traceback).
MAX_DEPTH = 32
# A config is a few kilobytes of YAML.
MAX_CONFIG_BYTES = 2**20
# A robust ResNet-50 with its optimizer state is about 0.4 GB; 16 GiB holds any classifier Salient
# runs, and keeps /dev/zero or a wrong file from filling the memory.
MAX_CHECKPOINT_BYTES = 16 * 2**30
# The most characters of a value an error message shows.
SHOW_CHARS = 200
# Upper bounds of the numbers that size memory, work or waits: far above any real use, low enough
# that a value within them cannot ask for more memory than a machine has, or loop for ever.
MAX_SIDE = 13_377  # the longest side whose square stays within MAX_PIXELS
MAX_BATCH = 65_536  # images per batch, masks per shard, images per evaluation block
MAX_SHARD = 10_000_000  # images per shard
MAX_TOP_K = 10_000  # images kept per pair or per neuron, shown or masked per pair
MAX_FEATURES = 65_536  # features per class
MAX_STEPS = 100_000  # attack steps, noise trials, simulated workers, answers needed per pair
MAX_WORKERS = 4_096  # Ray workers, GPUs requested, CPUs or GPUs per worker, decoding threads
MAX_WAIT_S = 86_400.0  # seconds to wait for a cluster or for GPUs
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds
MAX_MEMORY_GB = 65_536.0  # memory one worker may take for one step


CREDENTIALS_HINT = (
    "holds a user name or password (scheme://user:password@...); remove them from the URI and give them "
    "to the store instead: for S3, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
)


def _no_credentials(value: Any) -> None:
    if any(isinstance(v, str) and storage.has_credentials(v) for v in (value if isinstance(value, list) else [value])):
        raise ValueError(CREDENTIALS_HINT)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_false(cls, value: Any) -> Any:
        # YAML reads yes/no/on/off/true/false as booleans, which pydantic would take as 1 and 0.
        if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
            raise ValueError("a true/false value (YAML reads yes, no, on, off, true and false as one); give a number or a text")
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be blank")
        _no_credentials(value)
        return value


class DatasetConfig(_Section):
    """Where the images are: an ImageFolder root ``<root>/<wnid>/<file>``."""

    # The root's place is no input: each image's relpath, size and version key every result made from it.
    root: str = Field(description="ImageFolder root URI: <root>/<wnid>/<file>", json_schema_extra=OMIT)
    class_metadata: str | None = Field(
        None, description="CSV of class names/definitions, like imagenet_class_metadata.csv", json_schema_extra=BY_CONTENT
    )
    groundtruth: str | None = Field(
        None, description="groundtruth.parquet of a synthetic world; default: one beside or above the root",
        json_schema_extra=BY_CONTENT,
    )


class ModelConfig(_Section):
    """The classifier whose neurons are studied."""

    checkpoint: str = Field(description="checkpoint URI (robustness or torchvision state dict)", json_schema_extra=BY_CONTENT)
    format: Literal["robustness", "torchvision", "auto"] = "auto"
    arch: str = Field("resnet50", description="torchvision classifier name, a Salient arch, or timm:<name>")


class PreprocessConfig(_Section):
    """Resize (shorter side, bilinear) then centre crop, in pixels."""

    resize: int = Field(256, gt=0, le=MAX_SIDE)
    crop: int = Field(224, gt=0, le=MAX_SIDE)
    max_pixels: int = Field(
        MAX_PIXELS, gt=0, le=MAX_PIXELS,
        description="images with more pixels, as stored or once resized, are refused before decoding and listed as failures",
    )
    decoder: Literal["pil", "torchvision", "nvjpeg"] = Field(
        "pil",
        description="pil (the reference), torchvision (libjpeg-turbo on the CPU) or nvjpeg (on the GPU); "
        "images a fast decoder cannot read fall back to pil",
    )

    @model_validator(mode="after")
    def _crop_fits(self) -> PreprocessConfig:
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        return self


class ComputeConfig(_Section):
    """How work is spread over Ray workers. Unset values are chosen for the machine at run time.

    Only ``precision`` and ``compile`` change results; the rest says where and how fast they are computed.
    """

    workers: int | None = Field(None, gt=0, le=MAX_WORKERS, description="number of worker actors; default: one per GPU, else one", json_schema_extra=OMIT)
    gpus_per_worker: float | None = Field(None, ge=0, le=MAX_WORKERS, description="GPUs per worker; default 1 with GPUs, 0 means CPU", json_schema_extra=OMIT)
    cpus_per_worker: float | None = Field(
        None, gt=0, le=MAX_WORKERS, description="CPUs per worker; default: all cores on a CPU-only machine", json_schema_extra=OMIT
    )
    batch_size: int = Field(64, gt=0, le=MAX_BATCH, json_schema_extra=OMIT)
    # Shards are keyed by their files, so how images are cut into shards changes no result.
    shard_size: int = Field(5000, gt=0, le=MAX_SHARD, description="images per shard", json_schema_extra=OMIT)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Compiled kernels may round differently, so the mode counts in the cache keys.
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = Field(
        "none", description="torch.compile mode of the workers' model (batches padded to batch_size); none: eager"
    )
    decode_threads: int | None = Field(
        None, gt=0, le=MAX_WORKERS, description="image decoding threads per worker; default: its CPUs", json_schema_extra=OMIT
    )
    ray_address: str | None = Field(
        None, description="existing Ray cluster (host:port, ray://host:port or auto); default: a private local Ray",
        json_schema_extra=OMIT,
    )
    ray_connect_timeout_s: float = Field(
        30.0, gt=0, le=MAX_WAIT_S, description="how long to wait for ray_address to accept a connection", json_schema_extra=OMIT
    )
    request_gpus: int | None = Field(
        None, gt=0, le=MAX_WORKERS,
        description="GPUs to ask an autoscaling Ray cluster for when a GPU stage starts (withdrawn when it ends); default: use the GPUs already there",
        json_schema_extra=OMIT,
    )
    scale_up_timeout_s: float = Field(
        900.0, gt=0, le=MAX_WAIT_S, description="how long a stage waits for compute.request_gpus to arrive before running on the GPUs there are",
        json_schema_extra=OMIT,
    )
    attack_memory_gb: float | None = Field(
        None, gt=0, le=MAX_MEMORY_GB,
        description="memory (GiB) discover's feature attack may take at once, which sets how many images it back-propagates "
        "through together; default: half the GPU's free memory, or half the host's available memory on a CPU",
        json_schema_extra=OMIT,
    )

    @field_validator("ray_address")
    @classmethod
    def _ray_address_form(cls, value: str | None) -> str | None:
        if value is None or value in ("auto", "local"):
            return value
        ray_client = value.startswith("ray://")
        hint = "use host:port (the head's GCS port, e.g. 10.0.0.5:6379), ray://host:port (Ray Client) or auto"
        if "://" in value and not ray_client:
            raise ValueError(f"unsupported scheme; {hint}")
        try:
            parts = urlsplit(value if ray_client else f"//{value}")
            port = parts.port
        except ValueError:
            raise ValueError(f"not a valid host:port; {hint}") from None
        if not parts.hostname or parts.path or parts.query or parts.fragment or (port is None and not ray_client):
            raise ValueError(f"not a valid host:port; {hint}")
        return value

    @model_validator(mode="after")
    def _gpu_request_needs_gpu_workers(self) -> ComputeConfig:
        if self.request_gpus is not None and self.gpus_per_worker == 0:
            raise ValueError(
                f"request_gpus ({self.request_gpus}) asks for GPUs but gpus_per_worker is 0 (CPU workers); "
                "unset request_gpus or give each worker a GPU"
            )
        return self


class ActivationsConfig(_Section):
    """How the penultimate features are stored (docs/design.md §3 ``activations``)."""

    dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="stored feature type; top images and importance are computed from the stored values "
        "(float16 halves the shards but ties images that float32 tells apart)",
    )


class AggregateConfig(_Section):
    """Feature importance, the (class, feature) pairs and the top images (docs/design.md §2)."""

    grouping: Literal["prediction", "label"] = Field("prediction", description="D(c): images predicted c (the paper's) or labelled c")
    features_per_class: int = Field(5, gt=0, le=MAX_FEATURES, description="F: top features per class, the pairs")
    top_k_class: int = Field(65, gt=0, le=MAX_TOP_K, description="K: top images of D(c) kept per pair")
    top_k_neuron: int = Field(100, gt=0, le=MAX_TOP_K, description="top images per neuron over the whole dataset")


class DiscoverConfig(_Section):
    """What annotators are shown per (class, feature) pair (docs/design.md §2)."""

    images_per_pair: int = Field(5, gt=0, le=MAX_TOP_K, description="top images shown per pair")
    attack_steps: int = Field(100, ge=0, le=MAX_STEPS, description="feature-attack steps")
    attack_step_size: float = Field(10.0, gt=0, description="L2 step size of the feature attack")
    base_url: str | None = Field(None, description="public URL prefix of the discover/ folder for task rows")


class AnnotationsConfig(_Section):
    """Human answers and the labelling rule."""

    answers: list[str] = Field(default_factory=list, description="answer CSVs in the paper's schema", json_schema_extra=BY_CONTENT)
    min_answers: int = Field(5, gt=0, le=MAX_STEPS, description="pairs with fewer answers are labelled insufficient")
    simulated_workers: int = Field(5, gt=0, le=MAX_STEPS, description="workers per pair of the simulated annotator")
    simulated_noise: float = Field(0.1, ge=0, le=1, description="chance a simulated worker answers at random")
    seed: int = Field(0, ge=0, le=MAX_SEED)


class GeneralizeConfig(_Section):
    """Soft masks for the top images of every labelled pair (docs/design.md §2, §3)."""

    images_per_pair: int = Field(65, gt=0, le=MAX_TOP_K, description="top images per pair that get a mask")
    candidates: Literal["label", "label_and_prediction", "prediction"] = Field(
        "label",
        description="which images may get a pair's masks: filed under its class (as in the paper's release), "
        "filed under and predicted as it, or predicted as it",
    )
    masks_per_shard: int = Field(256, gt=0, le=MAX_BATCH, description="masks per Zarr shard object (one writer each)")
    compression: Literal["zstd", "lz4"] = Field(
        "zstd",
        description="how each mask is compressed in the Zarr store: zstd (level 1) or lz4 (Blosc, level 9: twice "
        "as fast to write and to read, for half as many bytes again)",
    )


class EvalModelConfig(_Section):
    """A classifier to measure: any torchvision classifier, a Salient arch, or timm:<name>."""

    name: str = Field(description="the model's name in the tables, also the name of its chart file")
    checkpoint: str = Field(json_schema_extra=BY_CONTENT)
    arch: str = "resnet50"
    format: Literal["robustness", "torchvision", "auto"] = "auto"

    @field_validator("name")
    @classmethod
    def _name_is_a_file_name(cls, value: str) -> str:
        # Stricter than storage.safe_relpath, which the chart file name must pass.
        if not value or value.strip() != value or value.startswith((".", "~")) or any(c in value for c in "/\\:\x00"):
            raise ValueError(
                "must be usable as a file name: not empty, no '/', '\\' or ':', no leading '.' or '~', "
                "no surrounding spaces; e.g. resnet50_l2_eps3"
            )
        return value


class EvaluateConfig(_Section):
    """Sensitivity of classifiers to noise on core and spurious regions (docs/design.md §2)."""

    models: list[EvalModelConfig] = Field(default_factory=list)
    sigmas: list[float] = Field(default_factory=lambda: [0.25], description="noise levels")
    trials: int = Field(1, gt=0, le=MAX_STEPS, description="noise draws per image, averaged")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    mask_alignment: Literal["crop", "reference"] = Field(
        "crop", description="crop: masks as stored; reference: Resize/CenterCrop again, as the original release's loader does"
    )
    # The noise of an image depends on (seed, trial, image_id) alone, so blocks change no result.
    images_per_block: int = Field(128, gt=0, le=MAX_BATCH, description="images per work item on the actor pool", json_schema_extra=OMIT)

    @field_validator("sigmas")
    @classmethod
    def _sigmas_valid(cls, value: list[float]) -> list[float]:
        if not value or any(s < 0 for s in value):
            raise ValueError("give at least one sigma, none negative")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> EvaluateConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return self


class Config(BaseModel):
    """A whole Salient configuration. Every section is optional until a command needs it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    dataset: DatasetConfig | None = None
    model: ModelConfig | None = None
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    output: str | None = Field(None, description="output root URI")
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    activations: ActivationsConfig = Field(default_factory=ActivationsConfig)
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig)
    discover: DiscoverConfig = Field(default_factory=DiscoverConfig)
    annotations: AnnotationsConfig = Field(default_factory=AnnotationsConfig)
    generalize: GeneralizeConfig = Field(default_factory=GeneralizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("output")
    @classmethod
    def _output_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        _no_credentials(value)
        return value

    @model_validator(mode="after")
    def _output_apart_from_the_dataset(self) -> Config:
        if self.output is None or self.dataset is None:
            return self
        out, root = _comparable(self.output), _comparable(self.dataset.root)
        if _within(out, root) or _within(root, out):
            where = "is the dataset root" if out == root else "lies inside dataset.root" if _within(out, root) else "holds dataset.root"
            raise ValueError(
                f"output = {show(self.output)} {where} ({show(self.dataset.root)}): builds, caches and leases would be written among the images "
                "(and read back as a class folder); choose an output folder apart from the dataset"
            )
        return self


def _comparable(uri: str) -> str:
    """A URI in one spelling: local paths absolute and normalised, no trailing slash."""
    if storage.is_local(uri):
        return os.path.normpath(os.path.abspath(os.path.expanduser(uri.removeprefix("file://"))))
    return uri.rstrip("/")


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _loc(loc: Iterable[Any]) -> str:
    """A key's path as written, each part that is not plain printable text shown as its repr (a key
    may hold terminal escape codes) and cut to :data:`SHOW_CHARS`."""
    return ".".join(str(p) if str(p).isprintable() and len(str(p)) <= SHOW_CHARS else show(p) for p in loc)


def _value_at(raw: Any, loc: Sequence[Any]) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _format_errors(exc: ValidationError, raw: dict[str, Any]) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        key = _loc(loc) or "config"
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc)
            lines.append(f"{key} = {show(_value_at(raw, loc))}: unknown key; known keys here: {', '.join(known)}")
        elif err["type"] == "missing":
            lines.append(f"{key}: missing; set it in the config file or with --set {key}=...")
        elif not loc:  # a rule across sections: its message names the keys
            lines.append(err["msg"].removeprefix("Value error, "))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key} = {show(_value_at(raw, loc))}: {msg}")
    return lines


def show(value: Any) -> str:
    """``repr(value)`` as :func:`cut` shows it (values come from a config, which can hold no
    aliases: their repr is no larger than the config)."""
    return cut(repr(value))


def cut(text: str) -> str:
    """``text`` on one line, with the credentials of any URI in it hidden, cut to at most
    :data:`SHOW_CHARS` characters."""
    text = storage.redact(" ".join(text.splitlines()))
    return text if len(text) <= SHOW_CHARS else text[: SHOW_CHARS - 1] + "…"


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``: a few lines of them expand to gigabytes),
    without duplicate keys (the last one would win silently), and at most :data:`MAX_DEPTH` deep."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a config; write the value out", self.peek_event().start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the safe loader says so itself
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {show(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """YAML text as Python values, read by :class:`_ConfigLoader`; ``ConfigError`` (one line) if it
    is not valid YAML or breaks one of its rules."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 -- a SafeLoader
    except yaml.MarkedYAMLError as exc:
        where = f" (line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1})" if exc.problem_mark else ""
        raise ConfigError([f"{exc.problem or exc.context}{where}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([show(str(exc))]) from None


def _known_keys(loc: Sequence[Any]) -> list[str]:
    """The keys allowed beside the last part of ``loc`` (list positions in it are stepped over)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        nested = None if field is None else next(
            (c for c in (field.annotation, *get_args(field.annotation)) if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` as (path, value); the value is read as a YAML scalar/list."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected section.key=value"])
    key, _, value = text.partition("=")
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError([f"--set {text!r}: expected section.key=value"])
    try:
        parsed = read_yaml(value) if value.strip() else None
    except ConfigError:
        parsed = value  # not YAML, or YAML this loader refuses (an alias, a duplicate key, deep nesting): the text itself
    return path, parsed


def _set_in(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def _resolve(value: Any, base_dir: str) -> Any:
    if isinstance(value, str) and value.strip() and storage.is_local(value):  # a blank one is refused as it is
        local = value.removeprefix("file://")
        if not os.path.isabs(os.path.expanduser(local)):
            return os.path.normpath(os.path.join(base_dir, local))
    return value


def _resolve_paths(raw: dict[str, Any], base_dir: str) -> None:
    """Make relative local paths in ``raw`` relative to ``base_dir``."""
    evaluate = raw.get("evaluate")
    if isinstance(evaluate, dict) and isinstance(evaluate.get("models"), list):
        for entry in evaluate["models"]:
            if isinstance(entry, dict) and "checkpoint" in entry:
                entry["checkpoint"] = _resolve(entry["checkpoint"], base_dir)
    for path in PATH_KEYS:
        parent = raw if len(path) == 1 else raw.get(path[0])
        if not isinstance(parent, dict) or path[-1] not in parent:
            continue
        value = parent[path[-1]]
        if isinstance(value, list):
            parent[path[-1]] = [_resolve(v, base_dir) for v in value]
        else:
            parent[path[-1]] = _resolve(value, base_dir)


def load(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a config file (any fsspec URI; None for an empty one) and apply ``--set`` overrides.

    Relative local paths in the file are relative to the file; in overrides, to the working directory.
    """
    raw: dict[str, Any] = {}
    if path is not None and storage.has_credentials(path):
        raise ConfigError([f"config file {show(path)}: {CREDENTIALS_HINT}"])
    if path is not None:
        try:
            text = storage.read_input_file(path, MAX_CONFIG_BYTES).decode("utf-8")
        except FileNotFoundError:
            raise ConfigError([f"config file {path!r} does not exist"]) from None
        except InputError as exc:
            raise ConfigError([f"config file {path!r}: {exc}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"config file {path!r} is not UTF-8 text"]) from None
        try:
            loaded = read_yaml(text)
        except ConfigError as exc:
            raise ConfigError([f"config file {path!r} is not valid YAML: {exc.lines[0]}"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"config file {path!r} must hold a mapping of sections, not a {type(loaded).__name__}"])
        raw = loaded or {}
        if storage.is_local(path):
            _resolve_paths(raw, os.path.dirname(os.path.abspath(path.removeprefix("file://"))))
    over: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_in(over, key, value)
    _resolve_paths(over, os.getcwd())
    for key, value in _flatten(over):
        _set_in(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, raw)) from None


def _flatten(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[list[str], Any]]:
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flatten(v, prefix + (k,))
        else:
            yield [*prefix, k], v


def to_yaml(cfg: Config) -> str:
    """The config as YAML, without unset optional sections."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)


def identity(section: BaseModel, digest: Callable[[str], str]) -> Any:
    """What of a config section can change an output, for cache keys: every field but those marked
    ``OMIT``, nested sections likewise, with the files of ``BY_CONTENT`` fields as ``digest(uri)``."""
    out: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        how = (field.json_schema_extra or {}).get("salient.key") if isinstance(field.json_schema_extra, dict) else None
        if how == "omit":
            continue
        value = getattr(section, name)
        if how == "content":
            value = [digest(v) for v in value] if isinstance(value, list) else (None if value is None else digest(value))
        elif isinstance(value, BaseModel):
            value = identity(value, digest)
        elif isinstance(value, list):
            value = [identity(v, digest) if isinstance(v, BaseModel) else v for v in value]
        out[name] = value
    return out


SECTIONS = ("dataset", "model", "output")  # what the pre-flight checks, in this order
