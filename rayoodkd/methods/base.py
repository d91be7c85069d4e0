"""The Method contract: a method is pure PyTorch math; the engine owns everything else.

A method builds its players (student, generator, discriminator, ...) and their optimizers in ``__init__``
and implements one outer iteration of its algorithm in :meth:`Method.train_step`; a method with phases
(AuG-KD's three modules, DFQ then fine-tuning) declares them as :class:`Stage` objects. It never touches Ray,
DDP, checkpoints or MLflow: the engine wraps the trainable players in DDP (by replacing the attributes named
by :meth:`Method.players`), checkpoints players, optimizers, schedulers and :meth:`Method.extra_state`, and
logs whatever ``train_step`` returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn
from torch.distributed import ReduceOp

if TYPE_CHECKING:
    from rayoodkd.engine.evaluation import EvalSet

Metrics = dict[str, Tensor | float]
"""What a step returns: scalar metrics by name, as detached 0-d tensors or plain numbers."""


class MethodConfig(BaseModel):
    """Base of every method's hyper-parameter section (unknown keys are errors).

    A nested section given in part keeps the defaults of the keys it does not name: the method's own
    defaults (MosaicKD's generator optimizer is Adam), not those of the nested model's class."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _keep_nested_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, info in cls.model_fields.items():
            default = info.get_default(call_default_factory=True)
            if isinstance(default, BaseModel) and isinstance(data.get(name), dict):
                merged[name] = {**default.model_dump(), **data[name]}
        return merged


class Streams(Protocol):
    """What ``train_step`` draws real data from: ``next("ood")`` gives the next batch of that stream.

    A batch is ``{"image": float tensor [N, C, H, W] normalised (the teacher's statistics unless
    ``data.transforms.<stream>.normalizer`` says otherwise), "unit": the same augmented images in [0, 1],
    "label": int64 tensor [N] (-1 when unlabelled)}``, on the worker's device; ``augment=False`` skips the
    stream's augmentation (e.g. MosaicKD's discriminator view of the OOD set). ``scan`` visits this rank's
    whole share of a stream once (with a stable ``row_id``); ``use_selection`` makes chosen scanned rows
    what ``next`` trains on until the next selection.
    """

    def next(self, stream: str, augment: bool = True) -> dict[str, Tensor]: ...

    def scan(
        self, stream: str, batch_size: int = 512, row_ids: bool = False, augment: bool = False
    ) -> Iterator[dict[str, Tensor]]: ...

    def use_selection(self, stream: str, unit: Tensor, labels: Tensor, epoch: int) -> int: ...


@dataclass(frozen=True)
class Stage:
    """One phase of a method: its budget, the players it trains, and how its result is selected.

    A stage lasts ``steps`` steps, or ``epochs`` epochs of a per-epoch selection: at the start of each of
    its epochs the engine calls :meth:`Method.begin_epoch`, which scans a stream and hands the engine the
    rows to train on (``Streams.use_selection``); the epoch lasts as many steps as the smallest rank's
    selection fills.

    The engine runs a method's stages in order. Only the players named in ``trains`` (all when ``None``) are
    wrapped in DDP during the stage; the others stay frozen as they are. At every evaluation the stage's
    ``select`` metric (an evaluation metric such as ``val/top1`` or one of the stage's ``train_step``
    metrics, averaged since the last log) is compared; with ``reload_best`` the snapshot of every player at
    the best evaluation is reloaded when the stage ends. A stage is evaluated every ``eval.every`` steps, or,
    with ``eval_every_epochs``, at the end of every that many of its epochs (a selection per epoch, as the
    official AuG-KD code does), and always at its end. Metrics of a method with several stages are logged
    under ``<stage name>/``.
    """

    name: str
    steps: int = 0
    trains: tuple[str, ...] | None = None
    select: str = "val/top1"
    mode: Literal["max", "min"] = "max"
    reload_best: bool = False
    epochs: int | None = None
    eval_every_epochs: int | None = None

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps <= 0):
            raise ValueError(f"stage {self.name!r}: give its budget as steps > 0 or as epochs, not both")
        if self.eval_every_epochs is not None and (self.epochs is None or self.eval_every_epochs < 1):
            raise ValueError(f"stage {self.name!r}: eval_every_epochs needs an epochs budget and >= 1")

    def done(self, stage_step: int, stage_epoch: int) -> bool:
        """Whether the stage's budget is spent after ``stage_step`` steps in ``stage_epoch`` full epochs."""
        return stage_step >= self.steps if self.epochs is None else stage_epoch >= self.epochs

    def better(self, score: float, best: float | None) -> bool:
        """Whether ``score`` improves on ``best`` in this stage's ``mode``."""
        if best is None:
            return True
        return score > best if self.mode == "max" else score < best


@dataclass(frozen=True)
class PlayerOptions:
    """How the engine wraps one player in DDP while a stage trains it (frozen players are never wrapped)."""

    find_unused_parameters: bool = False
    sync_batchnorm: bool = False

    def prepare(self, module: nn.Module, world_size: int, device: torch.device) -> nn.Module:
        """``module`` with SyncBatchNorm when asked for and useful (several CUDA ranks); its parameters are
        the same objects, so optimizers built on them keep working."""
        if self.sync_batchnorm and world_size > 1 and device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return module


@dataclass
class RunContext:
    """What the engine tells a method about where it runs."""

    device: torch.device
    rank: int
    world_size: int
    generator: torch.Generator
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_steps: int
    amp_dtype: torch.dtype | None = None
    scalers: dict[str, torch.amp.GradScaler] = field(default_factory=dict)
    stage: str = "train"
    stage_step: int = 0
    stage_epoch: int = 0
    batch_size: int = 128
    stream_rows: dict[str, int] = field(default_factory=dict)
    memory_format: torch.memory_format = torch.contiguous_format

    def normalize(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> the teacher's input space."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    def denormalize(self, images: Tensor) -> Tensor:
        """The teacher's input space -> images in [0, 1] (the inverse of :meth:`normalize`)."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return images * std + mean

    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed precision for forward passes when ``amp=true`` (bf16 on CPU, fp16 on CUDA)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def steps_per_epoch(self, stream: str) -> int:
        """Batches of ``stream`` in one epoch on each rank: every rank holds an equal share of its rows
        (Ray Data's equal split) and drops the last partial batch, so ranks agree on it."""
        if stream not in self.stream_rows:
            raise KeyError(
                f"stream {stream!r} has no known size; sized: {', '.join(self.stream_rows) or 'none'}"
            )
        return max(self.stream_rows[stream] // self.world_size // self.batch_size, 1)

    def epoch(self, stream: str) -> int:
        """The 0-based epoch of ``stream`` the current step of the stage belongs to (AuG-KD's f(epoch))."""
        return max(self.stage_step - 1, 0) // self.steps_per_epoch(stream)

    def all_reduce(self, tensor: Tensor, op: Literal["sum", "min", "max"] = "sum") -> Tensor:
        """``tensor`` reduced over all ranks (e.g. the sum of per-class counts), on every rank."""
        total = tensor.clone()
        if self.world_size > 1 and torch.distributed.is_initialized():
            ops = {"sum": ReduceOp.SUM, "min": ReduceOp.MIN, "max": ReduceOp.MAX}
            torch.distributed.all_reduce(total, op=ops[op])
        return total

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` (same shape on all ranks), on every rank."""
        result = tensor.clone()
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.broadcast(result, src=0)
        return result

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (same shape on all ranks) stacked in rank order, on every rank."""
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return tensor.unsqueeze(0).clone()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def randn(self, *shape: int) -> Tensor:
        """Gaussian noise from this rank's generator (ranks draw different z; resumption is exact)."""
        return torch.randn(*shape, generator=self.generator, device=self.device)

    def no_sync(self, *modules: nn.Module) -> AbstractContextManager[Any]:
        """Skip DDP's gradient all-reduce for ``modules`` (e.g. D and S while backpropagating G's loss:
        their gradients are zeroed before their own steps anyway)."""
        stack = ExitStack()
        for module in modules:
            if hasattr(module, "no_sync"):
                stack.enter_context(module.no_sync())
        return stack

    def step(self, loss: Tensor, optimizer: torch.optim.Optimizer, name: str) -> None:
        """zero_grad -> backward -> step for one player, through a GradScaler when fp16 AMP is on."""
        optimizer.zero_grad(set_to_none=True)
        scaler = self.scalers.get(name)
        if scaler is None:
            loss.backward()
            optimizer.step()
            return
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


class Method(ABC):
    """One distillation algorithm. Subclasses set ``name``, ``consumes`` and ``Config``."""

    name: ClassVar[str]
    consumes: ClassVar[frozenset[str]] = frozenset()
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # The validation accuracies that rank evaluations for the best student, top1 first: a tie on one goes to
    # the better next one (those eval.topk does not measure are skipped); an exact tie keeps the earlier.
    best_val_order: ClassVar[tuple[str, ...]] = ("top1",)

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: MethodConfig, ctx: RunContext) -> None:
        self.teacher = teacher
        self.student = student
        self.cfg = cfg
        self.ctx = ctx

    @abstractmethod
    def players(self) -> dict[str, nn.Module]:
        """Trainable players by attribute name; the engine may replace those attributes with DDP wrappers."""

    def player_options(self) -> dict[str, PlayerOptions]:
        """DDP options per player name (default for any player not named: :class:`PlayerOptions`)."""
        return {}

    @abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer by player name."""

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Learning-rate schedulers, stepped by the method itself."""
        return {}

    def stages(self) -> list[Stage]:
        """The method's phases in order (``ctx.stage`` names the current one); one implicit stage of
        ``max_steps`` by default."""
        return [Stage("train", self.ctx.max_steps)]

    def begin_epoch(self, data: Streams, epoch: int) -> tuple[int, dict[str, float]]:
        """Start epoch ``epoch`` of a stage budgeted in epochs: choose its rows (``data.scan``,
        ``data.use_selection``) and return (the epoch's steps as ``use_selection`` gave them, metrics)."""
        raise TypeError(f"{self.name}: a stage budgeted in epochs needs {type(self).__name__}.begin_epoch")

    @abstractmethod
    def train_step(self, data: Streams) -> Metrics:
        """One outer iteration -> scalar metrics; ``images`` counts the images the student learnt from.

        Return losses as detached 0-d tensors (``loss.detach()``), not ``loss.item()``: the engine sums them
        where they live and reads them once per log, so a step never waits for the device."""

    def validate(self, val: EvalSet) -> dict[str, float]:
        """Method-specific figures, logged as ``val/<name>`` at every evaluation and selectable by a stage
        (AuG-KD selects its generator and its AnchorNet on them). ``val`` is this rank's share of the
        ``data.val`` split (batches normalised like the teacher's input); ``val.mean(per_sample)`` is a mean
        over the whole split. Every rank calls it and rank 0's figures are used, so it must run the same
        collectives on every rank, on unwrapped players (:func:`unwrap`), with its own fixed-seed noise.
        Default: none."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond players/optimizers/schedulers (pools, selection indices...)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`extra_state`."""

    def deployable_student(self) -> nn.Module:
        """The network a user deploys (e.g. KD3: backbone + projector + the teacher's classifier)."""
        return unwrap(self.student)

    def samples(self) -> Tensor | None:
        """A batch in [0, 1] of what the method synthesises (for sample grids), or ``None``."""
        return None

    def facts(self) -> dict[str, float | int | str]:
        """What the method derives once from its config and models (e.g. MosaicKD's discriminator receptive
        field): logged as MLflow params ``derived.<key>``, not as a curve that never moves."""
        return {}


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD as coded in MosaicKD/CMI: τ²·KL(softmax(t/τ) ‖ softmax(s/τ)), batch mean (spec §1.4).

    The teacher's side enters as log-probabilities (``log_target``): where a very confident teacher's
    probability underflows to 0, the official form's gradient through the teacher (DFAD's and DFQ's
    generators) is 0·log 0 = NaN; this one is finite and otherwise the same."""
    log_p_student = torch.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = torch.log_softmax(teacher_logits / temperature, dim=1)
    kl = nn.functional.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2
