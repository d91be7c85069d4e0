"""Typed run configuration: YAML presets, dotted ``key=value`` overrides, and one-line validation errors.

A run config is one pydantic model. Its top level holds the keys every run has (``method``, ``seed``,
``max_steps``, ``num_workers``, ``use_gpu``, ``tracking_uri``, ``storage_path``, ``summary_json``, ...), the
sections the engine reads (``teacher``, ``student``, ``data``, ``eval``, ``resources``, ``debug``) and one
section per registered method, named after it (``kd_ood.temperature=4``), validated by that method's own
``Config`` model.
"""

from __future__ import annotations

import copy
import typing
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from rayoodkd.data.config import Corpus, CorpusConfig

PRESET_PACKAGE = "rayoodkd.configs"
# The batch augmentations of rayoodkd.augment (defined here so that the config imports no torch).
AugmentMode = Literal["none", "crop", "crop_flip", "resized_crop_flip"]
SectionT = TypeVar("SectionT", bound=BaseModel)


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key and what is allowed."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherRecipe(Section):
    """How to train the teacher when no checkpoint is given (the result is cached by content)."""

    arch: str = "lenet5"
    train: Corpus = CorpusConfig(source="mnist5k", split="train")
    val: Corpus = CorpusConfig(source="mnist5k", split="val")
    test: Corpus = CorpusConfig(source="mnist5k", split="test")
    num_classes: int = Field(10, ge=2)
    image_size: int = Field(28, ge=8)
    channels: Literal[1, 3] = 1
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="sgd: momentum 0.9, Nesterov (MosaicKD train_scratch.py); adam (AuG-KD's teachers)"
    )
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    augment: AugmentMode = "crop"
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="smoothing of the training targets (a differently calibrated teacher)"
    )
    mean: tuple[float, ...] | None = Field(
        None, description="fixed normaliser mean per channel (e.g. ImageNet's); None: the training set's"
    )
    std: tuple[float, ...] | None = Field(None, description="fixed normaliser std per channel")
    seed: int = 0

    @model_validator(mode="after")
    def _normalizer(self) -> TeacherRecipe:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std: set both (a fixed normaliser) or neither")
        if self.mean is not None and not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"mean and std: need {self.channels} values each (channels={self.channels})")
        return self


class TeacherConfig(Section):
    """The frozen teacher: a checkpoint written by ``python -m rayoodkd.teacher``, or a recipe to make one."""

    checkpoint: str | None = None
    recipe: TeacherRecipe = TeacherRecipe()


class StudentConfig(Section):
    """The student architecture (any name in ``rayoodkd.models.CLASSIFIERS``) and its extra arguments."""

    arch: str = "lenet5_half"
    kwargs: dict[str, Any] = {}


STREAMS = ("ood", "web", "labelled")


class StreamTransform(Section):
    """How one stream's batches are augmented and normalised (unset keys follow ``data.augment`` and the
    teacher's normaliser)."""

    augment: AugmentMode | None = None
    normalizer: tuple[tuple[float, ...], tuple[float, ...]] | None = Field(
        None, description="(mean, std) per channel instead of the teacher's statistics"
    )

    @field_validator("normalizer")
    @classmethod
    def _pairs(cls, value: tuple[tuple[float, ...], tuple[float, ...]] | None) -> Any:
        if value is not None and (len(value[0]) != len(value[1]) or min(value[1]) <= 0):
            raise ValueError("need [mean, std] with one value per channel each and std > 0")
        return value


class DataConfig(Section):
    """The streams a method may consume, and the sets the student is judged on.

    ``ood`` is unlabelled out-of-domain data, ``web`` webly collected data, ``labelled`` labelled training
    images (in-domain for ``kd_id``, the student domain's small labelled split for DFQ+ and AuG-KD). ``val``
    selects the best student; ``test`` is the held-out set reported as the final accuracy. Both must be set
    (the demo preset sets MNIST-5k's splits): a run never evaluates on a set it was not given. Each is one
    corpus or a union of several (a list of corpora; see ``rayoodkd.data.config.Corpus``).
    ``transforms.<stream>`` overrides the augmentation and normaliser of one stream.
    """

    ood: Corpus | None = None
    web: Corpus | None = None
    labelled: Corpus | None = None
    val: Corpus | None = None
    test: Corpus | None = None
    batch_size: int = Field(128, ge=1, description="images per worker per batch")
    shuffle_buffer: int = Field(2048, ge=0)
    augment: AugmentMode = "crop"
    transforms: dict[str, StreamTransform] = Field(default_factory=dict)
    prefetch_batches: int = Field(2, ge=0)
    materialize: bool = Field(
        True,
        description="decode each corpus once into Ray's object store as uint8 pixels (C·H·W bytes an "
        "image: ImageNet-32's 1.28 M images take 3.9 GB); false decodes again every epoch",
    )
    cache_dir: str | None = None
    decoded_cache_mb: int = Field(
        4096,
        ge=0,
        description="keep each materialised corpus's decoded pixels on local disk (under cache_dir) up to "
        "this size, so a later launch with the same corpus skips reading and decoding it; 0 turns it off",
    )

    @field_validator("transforms")
    @classmethod
    def _known_streams(cls, value: dict[str, StreamTransform]) -> dict[str, StreamTransform]:
        unknown = sorted(set(value) - set(STREAMS))
        if unknown:
            raise ValueError(f"unknown stream {unknown[0]!r}; allowed: {', '.join(STREAMS)}")
        return value

    def transform(self, stream: str) -> StreamTransform:
        """The stream's transform with ``data.augment`` filled in."""
        own = self.transforms.get(stream, StreamTransform())
        return own.model_copy(update={"augment": own.augment or self.augment})


class EvalConfig(Section):
    """Evaluation of the deployable student on ``data.val`` (and ``data.test`` at the end)."""

    every: int = Field(250, ge=1, description="steps between evaluations, reports and checkpoints")
    batch_size: int = Field(512, ge=1)
    cache_mb: float = Field(
        2048,
        ge=0,
        description="each worker keeps its share of data.val and of data.test in memory (normalised "
        "float32, on its device) when every worker's share of that split fits in this many MB; otherwise the "
        "split is streamed through Ray Data at every evaluation, still split across the workers (0: always "
        "stream)",
    )
    topk: tuple[int, ...] = Field(
        (1, 5), description="accuracies reported as val/top{k} and test/top{k} (top1 always; AuG-KD: 1, 3, 5)"
    )

    @field_validator("topk")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or min(value) < 1:
            raise ValueError("need one or more k >= 1")
        return tuple(sorted({1, *value}))


class ResourcesConfig(Section):
    """What each Ray Train worker reserves. Keep CPUs free for Ray Data (spec/ray.md P7)."""

    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch's intra-op threads in each worker (in the driver with num_workers=0); unset, a "
        "worker keeps OMP_NUM_THREADS: Ray sets it to the worker's whole CPUs (1 for a fraction) unless "
        "the environment that started Ray set it",
    )
    wait_for_workers_s: float = Field(
        300.0,
        ge=0,
        description="how long to wait for a cluster with an autoscaler to offer the requested workers; a "
        "cluster that cannot grow is refused at once",
    )


class DebugConfig(Section):
    """Fault injection, for the failure-recovery tests and for trying FailureConfig by hand."""

    fail_at_step: int | None = Field(None, ge=1, description="every rank raises here, once per run")
    kill_at_step: int | None = Field(
        None, ge=1, description="the last rank's process is SIGKILLed here (a lost worker), once per run"
    )


class InitFrom(Section):
    """Start a multi-stage method at a later stage from another run's players (e.g. every trial of a sweep
    over stage 3 from one shared run of stages 1-2): ``checkpoint`` is that run's directory (or one of its
    ``step_*`` checkpoints) and must hold the end of the stage before ``stage``; its players are taken as
    that stage left them (its selected snapshot when it reloads its best). Optimizers start fresh."""

    checkpoint: str = Field(min_length=1)
    stage: str = Field(min_length=1, description="the stage this run starts at")


class BaseRunConfig(Section):
    """The keys every run has; per-method sections are added by :func:`run_config_model`."""

    method: str = "kd_ood"
    seed: int = 0
    max_steps: int = Field(1500, ge=1)
    num_workers: int = Field(
        2, ge=0, description="Ray Train workers; 0 runs in the driver (Train local mode)"
    )
    use_gpu: bool = False
    amp: bool = False
    amp_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto", description="the autocast type with amp=true; auto: bfloat16 on CPU, float16 on CUDA"
    )
    channels_last: bool = Field(
        False, description="teacher, players and image batches in channels-last memory format (NHWC)"
    )
    compile: bool = Field(
        False, description="torch.compile the teacher and every player (false: eager, the fallback)"
    )
    teacher_inference: Literal["fused", "as_loaded"] = Field(
        "fused",
        description="fused: the teacher's no-grad forwards (KD targets, selection, evaluation) run a copy "
        "with BatchNorm folded into the convolutions and channels-last weights (compile=true: compiled with "
        "weight freezing); as_loaded: every forward runs the module as loaded",
    )
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    tracking_uri: str | None = None
    experiment_name: str = "rayoodkd"
    storage_path: str = "./runs"
    run_name: str | None = None
    registered_model_name: str | None = Field(
        None, description="also register the best-on-val student in the MLflow model registry under this name"
    )
    summary_json: str | None = None
    max_failures: int = Field(1, ge=-1)
    checkpoints_to_keep: int = Field(2, ge=1)
    log_every: int = Field(25, ge=1, description="steps between MLflow logs and console progress lines")
    system_metrics: bool = Field(
        True, description="log CPU, memory, disk, network (and GPU) use of rank 0's node to MLflow"
    )
    ray_logs: bool = Field(
        False, description="show Ray's own console output (Ray Data plans, Train reports, worker logs)"
    )
    ray_dashboard: bool | None = Field(
        None,
        description="Ray's dashboard in a Ray instance the command starts itself (a cluster keeps its own); "
        "null: off for one run (its processes take CPU from training), on for tune and compare (Ray Train "
        "frees a dead trial's resources through it; compare takes the first configuration's value)",
    )
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    resources: ResourcesConfig = ResourcesConfig()
    debug: DebugConfig = DebugConfig()
    init_from: InitFrom | None = None
    stop_after: str | None = Field(
        None, description="end the run after this stage (e.g. the shared stages of a sweep; null: the last)"
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from rayoodkd.methods import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; allowed: {', '.join(METHODS.names())}")
        return value

    @model_validator(mode="after")
    def _kill_needs_workers(self) -> BaseRunConfig:
        if self.debug.kill_at_step is not None and self.num_workers == 0:
            raise ValueError("debug.kill_at_step needs num_workers >= 1 (it would kill the driver itself)")
        return self

    def method_config(self) -> BaseModel:
        """The selected method's own section."""
        return getattr(self, self.method)


@cache
def run_config_model() -> type[BaseRunConfig]:
    """The full config model: the base keys plus one section per registered method."""
    from rayoodkd.methods import METHODS

    sections: dict[str, Any] = {}
    for name in METHODS.names():
        method_config = METHODS.get(name).Config
        sections[name] = (method_config, method_config())
    return create_model("RunConfig", __base__=BaseRunConfig, **sections)


def preset_names() -> list[str]:
    """Names of the presets shipped with the package (``--config NAME``)."""
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def _read_yaml(ref: str) -> dict[str, Any]:
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config: no such file {ref!r}")
        text = path.read_text()
    elif ref in preset_names():
        text = resources.files(PRESET_PACKAGE).joinpath(f"{ref}.yaml").read_text()
    else:
        raise ConfigError(
            f"--config: unknown preset {ref!r}; allowed: {', '.join(preset_names())} or a YAML path"
        )
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {ref}: the YAML must be a mapping of keys, got {type(data).__name__}")
    return data


def load_preset(ref: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset or YAML file as a plain dict, with ``extends`` resolved.

    ``extends: OTHER`` or ``extends: [FIRST, SECOND, ...]``: each parent is resolved first, then they are
    merged left to right, so a later parent's keys win, those it inherits too (two parents of one ancestor
    both carry its keys); this file's own keys win over all of them.
    """
    if ref in _chain:
        raise ConfigError(f"--config {ref}: 'extends' loops back to it ({' -> '.join((*_chain, ref))})")
    data = _read_yaml(ref)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not parents or not all(isinstance(p, str) for p in parents):
        raise ConfigError(
            f"--config {ref}: 'extends' must be a preset name or YAML path, or a non-empty list of them; "
            f"got {parents!r}"
        )
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = deep_merge(merged, load_preset(parent, (*_chain, ref)))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` merged into a copy of ``base``, recursing into nested mappings."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c) with ``c`` parsed as YAML (numbers, booleans, null, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {text!r}: expected KEY=VALUE with a dotted KEY, e.g. seed=1 or data.batch_size=64"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_dotted(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value`` in place, creating the missing mappings. In a list a part is
    an index (``data.ood.1.num_images``: a member of a union), else a :class:`ConfigError`."""
    node: dict[str, Any] | list[Any] = data
    for depth, part in enumerate(path):
        key: str | int = part
        if isinstance(node, list):
            parent = ".".join(path[:depth])
            if not part.isdigit():
                example = ".".join([parent, "0", *path[depth:]])
                raise ConfigError(
                    f"{parent}: a list of {len(node)}; name an item by its index, e.g. {example}"
                )
            if int(part) >= len(node):
                raise ConfigError(
                    f"{parent}.{part}: no such item; {parent} has {len(node)} (0 to {len(node) - 1})"
                )
            key = int(part)
        if depth == len(path) - 1:
            node[key] = value
            return
        child = node[key] if isinstance(node, list) else node.get(part)
        if not isinstance(child, dict | list):
            child = {}
            node[key] = child
        node = child


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with every ``key=value`` override applied."""
    result = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(result, path, value)
    return result


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds: ``X``, ``X | None``, ``list[X]``, ``Annotated[X, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _allowed_keys(model: Any, loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list (a member of a union): the same model
            continue
        field = model.model_fields.get(part)
        models = _models_in(field.annotation) if field is not None else []
        if not models:
            return []
        model = models[0]
    return sorted(model.model_fields)


def _describe(model: type[BaseModel], error: ValidationError, prefix: str) -> str:
    first = error.errors()[0]
    loc = first["loc"]  # field names, and list indices (``data.ood.1.source``: a member of a union)
    key = prefix + ".".join(map(str, loc)) if loc else prefix.rstrip(".") or "<root>"
    if first["type"] == "extra_forbidden":
        parent = prefix + ".".join(map(str, loc[:-1]))
        where = f" under {parent.rstrip('.')!r}" if parent.rstrip(".") else ""
        return f"unknown key {key!r}; allowed keys{where}: {', '.join(_allowed_keys(model, loc))}"
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid value for {key!r}: {message} (got {first.get('input')!r})"


def build_section(model: type[SectionT], data: dict[str, Any], prefix: str = "") -> SectionT:
    """Validate ``data`` as ``model``; on any problem raise :class:`ConfigError` naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(model, error, prefix)) from None


def build_config(data: dict[str, Any]) -> BaseRunConfig:
    """Validate a whole run config (see :func:`build_section`)."""
    return build_section(run_config_model(), data)


def resolve_config(config_ref: str | None = None, overrides: list[str] | None = None) -> BaseRunConfig:
    """The run config for ``--config REF`` (default: the ``demo`` preset) plus overrides."""
    data = load_preset(config_ref or "demo")
    return build_config(apply_overrides(data, overrides or []))


def to_yaml(config: BaseModel, *, only_method: bool = True) -> str:
    """The resolved config as YAML; with ``only_method`` the sections of other methods are left out."""
    data = config.model_dump(mode="json")
    if only_method and isinstance(config, BaseRunConfig):
        from rayoodkd.methods import METHODS

        data = {k: v for k, v in data.items() if k not in METHODS.names() or k == config.method}
    return yaml.safe_dump(data, sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params and tables)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
