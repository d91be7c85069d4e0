"""The one training loop every method runs in, on each Ray Train worker or in a single process.

Per worker: load the frozen teacher, seed this rank, build the method from the registry, restore the latest
checkpoint (before DDP wrapping, so names carry no ``module.`` prefix), wrap the trainable players, then
loop ``method.train_step`` with periodic logging (rank 0 -> MLflow), evaluation of the deployable student on
the held-out in-domain set, and ``report`` with a checkpoint of everything needed to resume exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from rayoodkd.augment import unit_images
from rayoodkd.config import BaseRunConfig, build_config
from rayoodkd.console import Phases, format_duration
from rayoodkd.deploy import STUDENT, STUDENT_BEST_VAL, deployed, log_deployed
from rayoodkd.engine.checkpoint import (
    ResumePoint,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
    stage_start,
    state_dict_hash,
)
from rayoodkd.engine.evaluation import EvalSet, score
from rayoodkd.engine.metrics import MetricAccumulator
from rayoodkd.engine.session import RaySession, Session, scratch_dir
from rayoodkd.engine.streams import DeviceStreams
from rayoodkd.engine.teacher_inference import NOTHING_TO_FOLD, route_no_grad_forwards
from rayoodkd.engine.tracking import THROUGHPUT_KEY, Tracker, open_store_in_background
from rayoodkd.methods import METHODS, Method, PlayerOptions, RunContext, Stage, unwrap
from rayoodkd.models import build_classifier
from rayoodkd.storage import read_json, write_json
from rayoodkd.teacher_io import TeacherInfo, load_teacher

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

NONFINITE_MARKER = "rayoodkd_nonfinite.json"
FAULT_MARKER = "debug_fault_fired.json"
BOOKKEEPING = frozenset({THROUGHPUT_KEY, "data/corrupt_skipped"})  # never under a stage's name
# Reported to Ray Train with every evaluation, but in MLflow these are the run's state, not curves: tags.
RUN_STATE = (
    "ddp/replicas_identical",
    "ddp/allreduce_mb_per_step",
    "student/changed_from_init",
    "best_val/step",
    "resumed_from_step",
    "stage",
    "teacher/test_top1",
    "train_seconds",
    "data/corrupt_skipped",
    "step",
)


class InjectedFailure(RuntimeError):
    """Raised by ``debug.fail_at_step`` to exercise worker-failure recovery."""


class NonFiniteLoss(RuntimeError):
    """A loss the method logged, or a player's weights at an evaluation, went NaN or infinite: every rank
    stops rather than train on with it. The run directory remembers it, so Ray Train's retries of the same
    launch (an exact resume would reach it again) stop at once; a new launch (say with a lower learning
    rate) resumes as usual."""


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker=...)``)."""
    session = RaySession(loop_config["run_dir"], loop_config["stream_rows"], loop_config["eval_blocks"])
    run_worker(loop_config, session)


def _seed_rank(seed: int, rank: int, device: torch.device) -> torch.Generator:
    torch.manual_seed(seed * 1_000_003 + rank)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + 7919 * (rank + 1))
    return generator


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1 or not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def build_student(cfg: BaseRunConfig, info: TeacherInfo, device: torch.device) -> nn.Module:
    """The configured student, shaped for the teacher's classes, channels and input size."""
    return build_classifier(
        cfg.student.arch,
        num_classes=info.num_classes,
        in_channels=info.channels,
        image_size=info.image_size,
        **cfg.student.kwargs,
    ).to(device)


def run_context(
    cfg: BaseRunConfig,
    info: TeacherInfo,
    device: torch.device,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> RunContext:
    """What a method is told about where it runs (AMP: ``amp_dtype``; auto: bf16 on CPU, fp16 on CUDA)."""
    amp_dtype = None
    if cfg.amp:
        auto = torch.float16 if device.type == "cuda" else torch.bfloat16
        amp_dtype = auto if cfg.amp_dtype == "auto" else getattr(torch, cfg.amp_dtype)
    return RunContext(
        device=device,
        rank=rank,
        world_size=world_size,
        generator=generator,
        num_classes=info.num_classes,
        image_size=info.image_size,
        channels=info.channels,
        mean=info.mean,
        std=info.std,
        max_steps=cfg.max_steps,
        amp_dtype=amp_dtype,
        batch_size=cfg.data.batch_size,
        memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format,
    )


def prepare_modules(modules: list[nn.Module], cfg: BaseRunConfig) -> None:
    """Channels-last weights and ``torch.compile``, in place: the parameters stay the same objects (optimizers
    built on them keep working) and the state dict keeps its keys."""
    seen: set[int] = set()
    for module in modules:
        if id(module) in seen:
            continue
        seen.add(id(module))
        if cfg.channels_last:
            module.to(memory_format=torch.channels_last)
        if cfg.compile:
            module.compile()


def prepare_teacher(teacher: nn.Module, info: TeacherInfo, cfg: BaseRunConfig) -> str | None:
    """The frozen teacher made ready as configured, in place (``teacher_inference``, ``channels_last``,
    ``compile``); returns why a fused teacher was not possible, if it was asked for and was not."""
    if cfg.channels_last:
        teacher.to(memory_format=torch.channels_last)
    reason = None
    if cfg.teacher_inference == "fused":
        example_shape = (2, info.channels, info.image_size, info.image_size)
        reason = route_no_grad_forwards(teacher, example_shape, compile=cfg.compile)
        if reason is None:
            return None
    if cfg.compile:
        teacher.compile()
    return reason


def build_method(cfg: BaseRunConfig, teacher: nn.Module, student: nn.Module, ctx: RunContext) -> Method:
    """The configured method around ``teacher`` and ``student``; its stages checked."""
    method = METHODS.get(cfg.method)(teacher, student, cfg.method_config(), ctx)
    if method.stages()[-1].reload_best:
        raise ValueError(
            f"{cfg.method}: the last stage cannot reload its best snapshot (the run's best-on-val student "
            "is already reported as test/top1_at_best_val)"
        )
    return method


def _broadcast(value: Any, world_size: int) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world_size == 1 or not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class Worker:
    """One rank of a run: the method, its data streams, evaluation, checkpoints and logging."""

    def __init__(self, loop_config: dict[str, Any], session: Session) -> None:
        self.startup = (loop_config.get("launched_at"), loop_config.get("driver_phases", {}), time.time())
        self.phases = Phases()
        self.cfg: BaseRunConfig = build_config(loop_config["config"])
        if self.cfg.resources.torch_threads:
            torch.set_num_threads(self.cfg.resources.torch_threads)
        self.session = session
        self.console_label = loop_config.get("console_label")
        self.rank, self.world_size, self.device = session.rank, session.world_size, session.device
        self.run_id, self.tracking_uri = loop_config.get("mlflow_run_id"), loop_config.get("tracking_uri")
        self.store_opened = (
            open_store_in_background(self.tracking_uri) if self.rank == 0 and self.run_id else None
        )
        self.teacher, self.teacher_info = load_teacher(loop_config["teacher_path"], self.device)
        self.generator = _seed_rank(self.cfg.seed, self.rank, self.device)
        self.ctx = run_context(
            self.cfg, self.teacher_info, self.device, self.generator, self.rank, self.world_size
        )
        self.ctx.stream_rows = dict(session.stream_rows)
        student = build_student(self.cfg, self.teacher_info, self.device)
        self.method = build_method(self.cfg, self.teacher, student, self.ctx)
        prepare_modules(list(self.method.players().values()), self.cfg)
        unfused = prepare_teacher(self.teacher, self.teacher_info, self.cfg)
        if unfused and unfused != NOTHING_TO_FOLD:
            self.say(f"teacher: runs as loaded, not fused (teacher_inference=fused): {unfused}")
        if self.ctx.amp_dtype == torch.float16:
            self.ctx.scalers.update({name: torch.amp.GradScaler("cuda") for name in self.method.optimizers()})
        self.streams = DeviceStreams(
            session.sources(self.method.consumes, self.cfg.data, self.cfg.seed),
            self.ctx,
            {stream: self.cfg.data.transform(stream) for stream in self.method.consumes},
            self.cfg.seed,
        )
        self.stages = self.method.stages()
        self.stage_index = self.stage_step = 0
        # Position in the current epoch of a stage budgeted in epochs (0 steps: the epoch has not begun).
        self.stage_epoch = self.epoch_step = self.epoch_steps = 0
        self.epoch_metrics: dict[str, float] = {}
        self.stage_best: dict[str, Any] | None = None
        self.step = 0
        # The best val top1 with its tie-breakers (Method.best_val_order).
        self.best_val_key: tuple[float, ...] = (-1.0,)
        self.best_step = 0
        self.best_student: dict[str, torch.Tensor] | None = None
        self.train_seconds = self.epoch_train_seconds = 0.0
        self.images_seen = 0.0
        self.resumed_from = 0
        self.last_val: float | None = None
        self.stage_clock = (time.perf_counter(), 0.0)  # (when, stage fraction then): the ETA's origin
        # Rank 0 picks the checkpoint, so that every rank restores the same step.
        point = session.resume_point() if self.rank == 0 else ResumePoint()
        directory = _broadcast(point.directory, self.world_size)
        state = point.state if self.rank == 0 or directory is None else load_state(directory)
        self.skipped_checkpoints = [skipped for skipped, _ in point.skipped]
        for skipped, reason in point.skipped:
            self.say(f"resume: skipped checkpoint {skipped}: {reason}")
        if directory and point.skipped:
            self.say(f"resume: resuming from {directory}")
        if state is not None:
            self._restore(state)
        elif self.cfg.init_from is not None:
            self._start_from(self.cfg.init_from.checkpoint, self.cfg.init_from.stage)
        self.initial_student_hash = self._student_hash() if state is None else state["initial_student_hash"]
        self.traffic_mark = (self.step, session.allreduce_bytes)  # (step, bytes) at the last report
        self.phases.lap("setup")
        self.val = self._eval_set("val")
        self.test = self._eval_set("test")
        self.phases.lap("eval sets")
        self.teacher_test_top1 = self.evaluate_on("test", self.teacher)["top1"]
        self.phases.lap("teacher test")
        self.fault_marker = f"{session.run_dir}/{FAULT_MARKER}"
        self.fired_faults = (read_json(self.fault_marker) or {}).get("fired", [])
        self.launched_at = loop_config.get("launched_at")
        self.nonfinite_marker = f"{session.run_dir}/{NONFINITE_MARKER}"
        stopped = read_json(self.nonfinite_marker) or {}
        if self.launched_at is not None and stopped.get("launched_at") == self.launched_at:
            raise NonFiniteLoss(stopped["message"])
        self.tracker: Tracker | None = None
        self.monitor: SystemMetricsMonitor | None = None
        self.startup_tags: dict[str, str] = {}
        # Steps an earlier attempt logged after its last checkpoint are re-run but not logged twice; training
        # and evaluation metrics are tracked apart (an attempt can die between the two at one step).
        self.logged_through = self.evaluated_through = 0

    def _open_tracker(self, *, monitor: bool = True) -> Tracker | None:
        """Rank 0's MLflow run, joined at its first write rather than before the first step: the thread that
        imports MLflow and opens the store (``open_store_in_background``) then runs alongside the first steps,
        on the cores the other ranks would leave idle while waiting for rank 0 at the first all-reduce.
        ``monitor``: start the system-metrics monitor too (not for a run that has already failed)."""
        if self.store_opened is None:
            return self.tracker
        store, self.store_opened = self.store_opened, None
        store.result()
        tracker = Tracker(self.tracking_uri, self.run_id)
        facts = self.method.facts() | {
            "eval.val_rows": self.val.rows,
            "eval.test_rows": self.test.rows,
            "eval.streamed": ",".join(n for n, s in (("val", self.val), ("test", self.test)) if s.streamed)
            or "none",
        }
        tracker.log_params({f"derived.{key}": value for key, value in facts.items()})
        self.logged_through = tracker.last_logged_step(THROUGHPUT_KEY)
        self.evaluated_through = tracker.last_logged_step("val/top1")
        tags = self.startup_tags
        if self.skipped_checkpoints:
            tags = tags | {"resume.skipped_checkpoints": "; ".join(self.skipped_checkpoints)}
        if tags:
            tracker.set_tags(tags)
        if monitor and self.cfg.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(
                tracker.run_id, tracking_uri=self.tracking_uri, resume_logging=True
            )
            self.monitor.start()
        self.tracker = tracker
        return tracker

    def _eval_set(self, name: str) -> EvalSet:
        def prepare(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.ctx.normalize(unit_images(images.to(self.device))), labels.to(self.device)

        return EvalSet(
            self.session.eval_share(name, self.cfg.eval.batch_size),
            prepare,
            cache_bytes=self.cfg.eval.cache_mb * 2**20,
            device=self.device,
            world_size=self.world_size,
        )

    def _restore(self, state: dict[str, Any]) -> None:
        for name, player in self.method.players().items():
            player.load_state_dict(state["players"][name])
        for name, optimizer in self.method.optimizers().items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.method.schedulers().items():
            scheduler.load_state_dict(state["schedulers"][name])
        for name, scaler in self.ctx.scalers.items():
            if name in state.get("scalers", {}):
                scaler.load_state_dict(state["scalers"][name])
        ranks = state["ranks"]
        own = ranks[self.rank] if len(ranks) == self.world_size else ranks[0]
        self.method.load_extra_state(own.get("method", state.get("method", {})))
        self.step = self.resumed_from = int(state["step"])
        self.stage_index = int(state.get("stage", 0))
        self.stage_step = int(state.get("stage_step", self.step))
        self.stage_epoch = int(state.get("stage_epoch", 0))
        self.epoch_step = int(state.get("epoch_step", 0))
        self.epoch_steps = int(state.get("epoch_steps", 0))
        self.stage_best = state.get("stage_best")
        self.best_step = int(state["best_step"])
        # A checkpoint from before tie-breakers: a tie on top1 keeps its best, as it did then.
        self.best_val_key = tuple(state.get("best_val_key", (float(state["best_val"]), math.inf)))
        self.best_student = state["best_student"]
        self.train_seconds, self.images_seen = float(state["train_seconds"]), float(state["images_seen"])
        self.epoch_metrics = dict(state.get("epoch_metrics", {}))
        if len(ranks) == self.world_size:
            set_rng_state(ranks[self.rank]["rng"], self.generator)
            self.streams.load_state_dict(ranks[self.rank]["streams"])
        else:
            self.generator.manual_seed(self.cfg.seed * 1_000_003 + 7919 * (self.rank + 1) + self.step)
            self.epoch_step = self.epoch_steps = 0  # per-rank selections do not carry over: select afresh

    def _start_from(self, source: str, stage: str) -> None:
        """``init_from``: begin at ``stage`` with the players another run had at the end of the stage
        before it."""
        start = stage_start(source, self.stages, stage, self.cfg.method)
        for name, player in self.method.players().items():
            player.load_state_dict(start.players[name])
        self.stage_index = [s.name for s in self.stages].index(stage)
        self.say(f"init_from: starting at stage {stage!r} from {start.directory}")

    def say(self, text: str) -> None:
        """One line on the run's console, from rank 0."""
        if self.rank == 0:
            label = f"{self.console_label}: " if self.console_label else ""
            # Not print(): Ray Train workers send print through Train's logger too (twice on the console).
            sys.stdout.write(f"{self.session.console_prefix}{label}{text}\n")
            sys.stdout.flush()

    def _payload(self) -> dict[str, Any]:
        own = {
            "rng": rng_state(self.generator),
            "streams": self.streams.state_dict(),
            "method": self.method.extra_state(),
        }
        ranks = _gather(own, self.world_size)
        return {
            "step": self.step,
            "stage": self.stage_index,
            "stage_step": self.stage_step,
            "stage_epoch": self.stage_epoch,
            "stage_done": self._stage_done(self.stages[self.stage_index]),
            "epoch_step": self.epoch_step,
            "epoch_steps": self.epoch_steps,
            "epoch_metrics": self.epoch_metrics,
            "stage_best": self.stage_best,
            "players": {name: unwrap(p).state_dict() for name, p in self.method.players().items()},
            "optimizers": {name: o.state_dict() for name, o in self.method.optimizers().items()},
            "schedulers": {name: s.state_dict() for name, s in self.method.schedulers().items()},
            "scalers": {name: s.state_dict() for name, s in self.ctx.scalers.items()},
            "best_val": self.best_val,
            "best_val_key": list(self.best_val_key),
            "best_step": self.best_step,
            "best_student": self.best_student,
            "train_seconds": self.train_seconds,
            "images_seen": self.images_seen,
            "ranks": ranks,
            "config": self.cfg.model_dump(mode="json"),
            "teacher_hash": self.teacher_info.content_hash,
            "initial_student_hash": self.initial_student_hash,
            "versions": {"torch": str(torch.__version__), "rayoodkd": _version()},
        }

    def _student_hash(self) -> str:
        return state_dict_hash(self.method.deployable_student().state_dict())

    def _log(self, pending: MetricAccumulator) -> dict[str, float]:
        metrics = pending.flush()
        # With fp16 a GradScaler skips the steps whose forward overflowed; with fp32/bf16 nothing would.
        checked = self.ctx.amp_dtype != torch.float16
        nonfinite = [k for k, v in metrics.items() if k.startswith("loss/") and not math.isfinite(v)]
        nonfinite = nonfinite if checked else []
        local = [metrics.pop("images", 0.0), float(self.streams.corrupt_skipped), float(len(nonfinite))]
        images, corrupt, nonfinite_count = self.ctx.all_reduce(
            torch.tensor(local, dtype=torch.float64, device=self.device)
        ).tolist()
        if nonfinite_count:  # every rank sees the sum: they leave together
            names = ", ".join(self._gathered(nonfinite))
            self._stop_nonfinite(f"{names} not finite (NaN or inf in the mean since the last log)")
        self.images_seen += images
        bookkeeping = {
            "data/corrupt_skipped": corrupt,
            THROUGHPUT_KEY: self.images_seen / max(self.train_seconds, 1e-9),
        }
        tracker = self._open_tracker()
        if tracker is not None and self.step > self.logged_through:
            tracker.log_metrics(
                {**self._in_stage(metrics), THROUGHPUT_KEY: bookkeeping[THROUGHPUT_KEY]}, self.step
            )
        return {**metrics, **bookkeeping}

    def _stage_fraction(self) -> float:
        stage = self.stages[self.stage_index]
        if stage.epochs is None:
            return self.stage_step / stage.steps
        within = self.epoch_step / self.epoch_steps if self.epoch_steps else 0.0
        return (self.stage_epoch + within) / stage.epochs

    def _progress(self, metrics: dict[str, float]) -> None:
        """The console's progress line: where the run is, its losses, the latest val top-1, img/s, ETA."""
        if self.rank != 0:
            return
        stage = self.stages[self.stage_index]
        if stage.epochs is None:
            where = f"step {self.stage_step}/{stage.steps}"
        else:
            epoch = min(self.stage_epoch + (self.epoch_steps > 0), stage.epochs)
            where = f"epoch {epoch}/{stage.epochs} (step {self.step})"
        if len(self.stages) > 1:
            where = f"{stage.name} [{self.stage_index + 1}/{len(self.stages)}] {where}"
        fraction = self._stage_fraction()
        first = {"loss/total": 0, "loss/kd": 1}  # the student's objective leads; then the method's order
        losses = sorted((k for k in metrics if k.startswith("loss/")), key=lambda k: first.get(k, 2))[:4]
        if len(losses) == 2 and losses[0] == "loss/total":
            total, term = metrics[losses[0]], metrics[losses[1]]
            if total == term or (math.isnan(total) and math.isnan(term)):
                losses = losses[1:]  # a method with one loss term: its total repeats it
        parts = [f"{where} {100 * fraction:3.0f}%"]
        parts += [f"{key.removeprefix('loss/')} {metrics[key]:.4g}" for key in losses]
        if self.last_val is not None:  # a new stage has no best of its own until its first evaluation
            best = f" (best {self.best_val:.2f} @{self.best_step})" if self.best_step > 0 else ""
            parts.append(f"val {self.last_val:.2f}{best}")
        if THROUGHPUT_KEY in metrics:
            parts.append(f"{metrics[THROUGHPUT_KEY]:,.0f} img/s")
        clock_time, clock_fraction = self.stage_clock
        rate = (fraction - clock_fraction) / max(time.perf_counter() - clock_time, 1e-9)
        if 0 < fraction < 1 and rate > 0:
            label = "ETA" if len(self.stages) == 1 else "stage ETA"
            parts.append(f"{label} {format_duration((1 - fraction) / rate)}")
        self.say("  ".join(parts))

    def _in_stage(self, metrics: dict[str, float]) -> dict[str, float]:
        """``train_step`` metrics under the current stage's name, for a method with several stages."""
        if len(self.stages) == 1:
            return metrics
        prefix = self.stages[self.stage_index].name
        return {key if key in BOOKKEEPING else f"{prefix}/{key}": value for key, value in metrics.items()}

    def evaluate_on(self, name: str, model: nn.Module) -> dict[str, float]:
        return score(
            model,
            self.val if name == "val" else self.test,
            device=self.device,
            teacher=self.teacher,
            world_size=self.world_size,
            topk=self.cfg.eval.topk,
        )

    def _gathered(self, names: list[str]) -> list[str]:
        """The union of every rank's ``names`` (called by all ranks together)."""
        if self.world_size == 1 or not dist.is_initialized():
            return sorted(names)
        everyone: list[list[str]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(everyone, names)
        return sorted({name for rank_names in everyone for name in rank_names})

    def _stop_nonfinite(self, what: str) -> None:
        """Stop every rank (they all call this at the same step), remembering why for this launch."""
        stage = self.stages[min(self.stage_index, len(self.stages) - 1)].name
        message = (
            f"step {self.step} (stage {stage}): {what}; stopped rather than train on with it "
            f"(the checkpoints before it are kept: relaunch, e.g. with a lower learning rate, to resume)"
        )
        if self.rank == 0 and self.launched_at is not None:
            write_json(self.nonfinite_marker, {"launched_at": self.launched_at, "message": message})
        raise NonFiniteLoss(message)

    def _check_weights_finite(self) -> None:
        """Before an evaluation is reported and checkpointed: a NaN update can leave the losses finite."""
        players = self.method.players()
        finite = [
            torch.stack([p.isfinite().all() for p in module.parameters()]).all()
            if any(True for _ in module.parameters())
            else torch.tensor(True, device=self.device)
            for module in players.values()
        ]
        bad = self.ctx.all_reduce((~torch.stack(finite).to(self.device)).to(torch.float64)).tolist()
        if any(bad):
            names = ", ".join(name for name, count in zip(players, bad, strict=True) if count)
            self._stop_nonfinite(f"the weights of {names} are not finite")

    @property
    def best_val(self) -> float:
        """The best val top1 so far in the stage (-1 before its first evaluation)."""
        return self.best_val_key[0]

    def _report(self, metrics: dict[str, float], final: bool) -> dict[str, float]:
        self._check_weights_finite()
        student = self.method.deployable_student()
        if self.world_size > 1 and dist.is_initialized():
            # DDP gives every rank rank 0's buffers (BN running statistics) at its next forward anyway; doing
            # it now makes the evaluated, selected and checkpointed student the same on every rank.
            for buffer in student.buffers():
                dist.broadcast(buffer, src=0)
        val = self.evaluate_on("val", student)
        self.last_val = val["top1"]
        if type(self.method).validate is not Method.validate:
            val.update(_broadcast(self.method.validate(self.val), self.world_size))
        key = tuple(val[name] for name in self.method.best_val_order if name in val)
        if key > self.best_val_key:
            self.best_val_key, self.best_step = key, self.step
            self.best_student = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        self._select(metrics, val)
        student_hash = self._student_hash()
        report = {
            **self._in_stage(metrics),
            "ddp/replicas_identical": float(len(set(_gather(student_hash, self.world_size))) == 1),
            "student/changed_from_init": float(student_hash != self.initial_student_hash),
            "step": self.step,
            **{f"val/{key}": value for key, value in val.items()},
            "best_val/top1": self.best_val,
            "best_val/step": self.best_step,
            "resumed_from_step": self.resumed_from,
            **({"stage": float(self.stage_index)} if len(self.stages) > 1 else {}),
            "teacher/test_top1": self.teacher_test_top1,
            "train_seconds": self.train_seconds,
            **self._traffic(),
        }
        if final:
            report.update(self._final_metrics(student))
        samples = self.method.samples()
        tracker = self._open_tracker()
        if tracker is not None and self.step > self.evaluated_through:
            logged = self._in_stage(metrics)
            series = {k: v for k, v in report.items() if k not in logged and k not in RUN_STATE}
            tracker.log_metrics(series, self.step)
            tracker.set_tags(self._state_tags(report))
            if samples is not None:
                tracker.log_image_grid(samples[:64], "samples", self.step)
        report.update(self._in_stage(self.epoch_metrics))  # logged once, at the epoch's start
        payload = self._payload()
        if self.rank == 0:
            with scratch_dir() as directory:
                save_state(directory, payload)
                self.session.report(report, directory, self.step)
        else:
            self.session.report(report, None, self.step)
        return report

    def _report_startup(self) -> None:
        """Where the time from the command to the end of this attempt's first step went (rank 0): printed now,
        and tagged on the MLflow run when the run is opened at its first write (``_open_tracker``)."""
        launched_at, driver, worker_started = self.startup
        if self.rank != 0 or launched_at is None:
            return
        self.phases.lap("first step")
        total = time.time() - launched_at
        workers = worker_started - launched_at - sum(driver.values())
        parts = [*(f"{k} {v:.1f}" for k, v in driver.items()), f"workers {workers:.1f}"]
        parts += [f"{k} {v:.1f}" for k, v in self.phases.seconds.items()]
        self.say(f"first step {total:.1f} s after launch: {', '.join(parts)}")
        phases = {**driver, "workers": workers, **self.phases.seconds}
        self.startup_tags = {"startup/total_s": f"{total:.2f}"} | {
            f"startup/{name.replace(' ', '_')}_s": f"{v:.2f}" for name, v in phases.items()
        }

    def _traffic(self) -> dict[str, float]:
        """The gradient megabytes each rank all-reduced per step since the last report (none without DDP)."""
        step, sent = self.traffic_mark
        self.traffic_mark = (self.step, self.session.allreduce_bytes)
        if self.world_size == 1 or self.step == step:
            return {}
        return {"ddp/allreduce_mb_per_step": (self.session.allreduce_bytes - sent) / (self.step - step) / 1e6}

    def _state_tags(self, report: dict[str, float]) -> dict[str, str]:
        tags = {key: f"{report[key]:g}" for key in RUN_STATE if key in report}
        for key in ("ddp/replicas_identical", "student/changed_from_init"):
            tags[key] = "true" if report[key] == 1.0 else "false"
        tags["stage"] = self.stages[self.stage_index].name
        return tags

    def _select(self, metrics: dict[str, float], val: dict[str, float]) -> None:
        """Keep a snapshot of every player at the stage's best evaluation (for ``reload_best``)."""
        stage = self.stages[self.stage_index]
        score = {**metrics, **{f"val/{key}": value for key, value in val.items()}}.get(stage.select)
        if not stage.reload_best or score is None:
            return
        if stage.better(score, None if self.stage_best is None else self.stage_best["score"]):
            players = {
                name: {k: v.detach().cpu().clone() for k, v in unwrap(p).state_dict().items()}
                for name, p in self.method.players().items()
            }
            self.stage_best = {"score": float(score), "step": self.step, "players": players}

    def _enter(self, index: int) -> None:
        """Start (or resume inside) stage ``index``: DDP-wrap the players it trains, unwrap the others."""
        if index != self.stage_index:
            self.stage_index, self.stage_step, self.stage_best = index, 0, None
            self.stage_epoch = self.epoch_step = self.epoch_steps = 0
            self.epoch_metrics = {}
            self.streams.clear_selections()
            self.best_val_key, self.best_step, self.best_student = (-1.0,), 0, None
        stage = self.stages[index]
        self.stage_clock = (time.perf_counter(), self._stage_fraction())
        self.ctx.stage, self.ctx.stage_step, self.ctx.stage_epoch = (
            stage.name,
            self.stage_step,
            self.stage_epoch,
        )
        trained = set(self.method.players() if stage.trains is None else stage.trains)
        options = self.method.player_options()
        for name, player in self.method.players().items():
            module = unwrap(player)
            if name in trained:
                module = self.session.distribute(module, options.get(name, PlayerOptions()))
            setattr(self.method, name, module)

    def _leave(self) -> None:
        """End the current stage: reload its selected snapshot when the stage asks for it."""
        if self.stages[self.stage_index].reload_best and self.stage_best is not None:
            for name, player in self.method.players().items():
                unwrap(player).load_state_dict(self.stage_best["players"][name])

    def _best_student(self, student: nn.Module) -> nn.Module:
        if self.best_student is None:
            return student
        best = copy.deepcopy(student)
        best.load_state_dict(self.best_student)
        return best

    def _final_metrics(self, student: nn.Module) -> dict[str, float]:
        test = self.evaluate_on("test", student)
        result = {f"test/{key}": value for key, value in test.items()}
        if self.best_student is not None:
            at_best = self.evaluate_on("test", self._best_student(student))
            result.update({f"test/{k}_at_best_val": v for k, v in at_best.items() if k.startswith("top")})
        return result

    def _log_deployable(self, report: dict[str, float]) -> None:
        """Rank 0, end of the run: the final and the best-on-val student as self-contained MLflow models
        (once per run: a relaunch of a finished run does not log them again)."""
        tracker = self._open_tracker()
        if tracker is None or tracker.tags().get("rayoodkd.students_logged_at") == str(self.step):
            return
        student = self.method.deployable_student()
        info = self.teacher_info
        normalised = self.val.example
        if normalised is None:  # this rank's share of the val split is empty
            normalised = torch.zeros(1, info.channels, info.image_size, info.image_size, device=self.device)
        example = self.ctx.denormalize(normalised).clamp(0, 1)
        test_at_best = report.get("test/top1_at_best_val", report["test/top1"])
        choices = {
            STUDENT: (student, {"selected": "final", "step": self.step, "test_top1": report["test/top1"]}),
            STUDENT_BEST_VAL: (
                self._best_student(student),
                {
                    "selected": "best val/top1",
                    "step": self.best_step,
                    "val_top1": self.best_val,
                    "test_top1": test_at_best,
                },
            ),
        }
        for name, (network, selection) in choices.items():
            uri = log_deployed(
                deployed(network, self.cfg.student.arch, self.teacher_info),
                tracking_uri=tracker.tracking_uri,
                run_id=tracker.run_id,
                name=name,
                example=example,
                step=self.step,
                metadata={"method": self.cfg.method, **selection},
                registered_model_name=self.cfg.registered_model_name if name == STUDENT_BEST_VAL else None,
            )
            self.say(f"model: {name} logged to MLflow ({uri})")
        tracker.set_tags({"rayoodkd.students_logged_at": str(self.step)})

    def _inject_faults(self) -> None:
        """``debug.fail_at_step`` / ``kill_at_step``: each (kind, step) fires once per run directory (a
        marker file remembers it), so the attempt that resumes after it trains on."""
        debug = self.cfg.debug
        if self.step == debug.kill_at_step and self._arm("kill_at_step") and self.rank == self.world_size - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step == debug.fail_at_step and self._arm("fail_at_step"):
            raise InjectedFailure(f"debug.fail_at_step={self.step}: injected worker failure")

    def _arm(self, kind: str) -> bool:
        """Whether fault ``kind`` at this step has not fired yet; if so, record (rank 0 and the killed last
        rank write the marker) that it fires now."""
        fault = f"{kind}={self.step}"
        if fault in self.fired_faults:
            return False
        self.fired_faults = [*self.fired_faults, fault]
        if self.rank in (0, self.world_size - 1):
            write_json(self.fault_marker, {"fired": self.fired_faults})
        return True

    def _stage_done(self, stage: Stage) -> bool:
        return stage.done(self.stage_step, self.stage_epoch)

    def _begin_epoch(self, stage: Stage, pending: MetricAccumulator) -> None:
        """Ask the method for the epoch's selection (and how many steps it fills on every rank)."""
        self.ctx.stage_epoch = self.stage_epoch
        started = time.perf_counter()
        self.epoch_steps, self.epoch_metrics = self.method.begin_epoch(self.streams, self.stage_epoch)
        self.epoch_metrics["time/begin_epoch_s"] = time.perf_counter() - started
        self.epoch_train_seconds = 0.0
        if self.epoch_steps < 1:
            raise RuntimeError(
                f"{self.cfg.method}: epoch {self.stage_epoch} of stage {stage.name!r} selected less than one "
                f"batch (data.batch_size {self.cfg.data.batch_size}) on some rank"
            )
        pending.add(self.epoch_metrics)

    def run(self) -> None:
        try:
            self._train()
        except Exception:
            # A run that fails before its first log still gets its derived params and startup tags on its
            # MLflow page; a store that cannot be opened must not hide that failure.
            with contextlib.suppress(Exception):
                self._open_tracker(monitor=False)
            raise
        finally:
            self.streams.close()
            if self.monitor is not None:
                self.monitor.finish()

    def _train(self) -> None:
        cfg = self.cfg
        pending = MetricAccumulator()
        metrics: dict[str, float] = {}
        trained = False
        names = [stage.name for stage in self.stages]
        last = names.index(cfg.stop_after) if cfg.stop_after else len(self.stages) - 1
        for index in range(self.stage_index, last + 1):
            self._enter(index)
            stage = self.stages[index]
            while not self._stage_done(stage):
                by_epoch = stage.epochs is not None
                if by_epoch and self.epoch_steps == 0:
                    self._begin_epoch(stage, pending)
                self.step += 1
                self.stage_step += 1
                self.epoch_step += by_epoch
                self.ctx.stage_step = self.stage_step
                self._inject_faults()
                started = time.perf_counter()
                pending.add(self.method.train_step(self.streams))
                self.train_seconds += time.perf_counter() - started
                self.epoch_train_seconds += time.perf_counter() - started
                if not trained:  # the first-step lap ends after the step, outside its timing
                    self._report_startup()
                trained = True
                epoch_end = by_epoch and self.epoch_step == self.epoch_steps
                if epoch_end:
                    pending.add({"time/epoch_train_s": self.epoch_train_seconds})
                    self.stage_epoch, self.epoch_step, self.epoch_steps = self.stage_epoch + 1, 0, 0
                stage_end = self._stage_done(stage)
                if stage.eval_every_epochs is None:
                    evaluate = self.step % cfg.eval.every == 0 or stage_end
                else:
                    evaluate = stage_end or (epoch_end and self.stage_epoch % stage.eval_every_epochs == 0)
                if self.step % cfg.log_every == 0 or evaluate:
                    metrics = self._log(pending)
                final = stage_end and index == last
                if evaluate:
                    report = self._report(metrics, final=final)
                if self.step % cfg.log_every == 0 or evaluate:
                    self._progress(metrics)
                if final:  # the final checkpoint is safe: a failure here loses nothing; a relaunch logs them
                    self._log_deployable(report)
            self._leave()
        if not trained:  # relaunched after the end: report the final figures again
            report = self._report({THROUGHPUT_KEY: self.images_seen / max(self.train_seconds, 1e-9)}, True)
            self._log_deployable(report)


def run_worker(loop_config: dict[str, Any], session: Session) -> None:
    """Run one worker of a training run described by ``loop_config`` (see ``rayoodkd.launch``)."""
    threads = torch.get_num_threads()
    try:
        Worker(loop_config, session).run()
    finally:
        torch.set_num_threads(threads)  # resources.torch_threads is the run's, not the process's


def _version() -> str:
    from rayoodkd import __version__

    return __version__
