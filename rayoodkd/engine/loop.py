"""The one training loop every method runs in, on each Ray Train worker or in a single process.

Per worker: load the frozen teacher, seed this rank, build the method from the registry, restore the latest
checkpoint (before DDP wrapping, so names carry no ``module.`` prefix), wrap the trainable players, then
loop ``method.train_step`` with periodic logging (rank 0 -> MLflow), evaluation of the deployable student on
the held-out in-domain set, and ``report`` with a checkpoint of everything needed to resume exactly.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rayoodkd.config import BaseRunConfig, build_config
from rayoodkd.engine.checkpoint import rng_state, save_state, set_rng_state, state_dict_hash
from rayoodkd.engine.evaluation import evaluate
from rayoodkd.engine.session import RaySession, Session, scratch_dir
from rayoodkd.engine.streams import DeviceStreams
from rayoodkd.engine.tracking import Tracker
from rayoodkd.methods import METHODS, Method, RunContext, unwrap
from rayoodkd.models import build_classifier
from rayoodkd.teacher import load_teacher


class InjectedFailure(RuntimeError):
    """Raised by ``debug.fail_at_step`` to exercise worker-failure recovery."""


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker=...)``)."""
    run_worker(loop_config, RaySession())


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


def _sum_across_ranks(values: list[float], device: torch.device, world_size: int) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class Worker:
    """One rank of a run: the method, its data streams, evaluation, checkpoints and logging."""

    def __init__(self, loop_config: dict[str, Any], session: Session) -> None:
        self.cfg: BaseRunConfig = build_config(loop_config["config"])
        self.session = session
        self.rank, self.world_size, self.device = session.rank, session.world_size, session.device
        self.teacher, self.teacher_info = load_teacher(loop_config["teacher_path"], self.device)
        self.generator = _seed_rank(self.cfg.seed, self.rank, self.device)
        self.ctx = self._context()
        student = build_classifier(
            self.cfg.student.arch,
            num_classes=self.teacher_info.num_classes,
            in_channels=self.teacher_info.channels,
            image_size=self.teacher_info.image_size,
            **self.cfg.student.kwargs,
        ).to(self.device)
        self.method: Method = METHODS.get(self.cfg.method)(
            self.teacher, student, self.cfg.method_config(), self.ctx
        )
        if self.ctx.amp_dtype == torch.float16:
            self.ctx.scalers.update({name: torch.amp.GradScaler("cuda") for name in self.method.optimizers()})
        self.streams = DeviceStreams(
            session.sources(self.method.consumes, self.cfg.data, self.cfg.seed),
            self.ctx,
            self.cfg.data.augment,
        )
        self.step = 0
        self.best_val = -1.0
        self.best_step = 0
        self.best_student: dict[str, torch.Tensor] | None = None
        self.train_seconds = 0.0
        self.images_seen = 0.0
        self.resumed_from = 0
        state = session.latest_state()
        if state is not None:
            self._restore(state)
        self.initial_student_hash = self._student_hash() if state is None else state["initial_student_hash"]
        for name, player in self.method.players().items():
            setattr(self.method, name, session.distribute(player, self.method_needs_unused_params()))
        self.val = self._eval_set("val")
        self.test = self._eval_set("test")
        self.teacher_test_top1 = self.evaluate_on("test", self.teacher)["top1"]
        run_id = loop_config.get("mlflow_run_id")
        self.tracker = Tracker(loop_config["tracking_uri"], run_id) if self.rank == 0 and run_id else None

    def method_needs_unused_params(self) -> bool:
        return bool(getattr(self.method, "find_unused_parameters", False))

    def _context(self) -> RunContext:
        info = self.teacher_info
        amp_dtype = None
        if self.cfg.amp:
            amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return RunContext(
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            generator=self.generator,
            num_classes=info.num_classes,
            image_size=info.image_size,
            channels=info.channels,
            mean=info.mean,
            std=info.std,
            max_steps=self.cfg.max_steps,
            amp_dtype=amp_dtype,
        )

    def _eval_set(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.session.eval_set(name)
        return self.ctx.normalize(images.to(self.device, torch.float32)), labels.to(self.device)

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
        self.method.load_extra_state(state["method"])
        self.step = self.resumed_from = int(state["step"])
        self.best_val, self.best_step = float(state["best_val"]), int(state["best_step"])
        self.best_student = state["best_student"]
        self.train_seconds, self.images_seen = float(state["train_seconds"]), float(state["images_seen"])
        ranks = state["ranks"]
        if len(ranks) == self.world_size:
            set_rng_state(ranks[self.rank]["rng"], self.generator)
            self.streams.load_state_dict(ranks[self.rank]["streams"])
        else:
            self.generator.manual_seed(self.cfg.seed * 1_000_003 + 7919 * (self.rank + 1) + self.step)

    def _payload(self) -> dict[str, Any]:
        ranks = _gather(
            {"rng": rng_state(self.generator), "streams": self.streams.state_dict()}, self.world_size
        )
        return {
            "step": self.step,
            "players": {name: unwrap(p).state_dict() for name, p in self.method.players().items()},
            "optimizers": {name: o.state_dict() for name, o in self.method.optimizers().items()},
            "schedulers": {name: s.state_dict() for name, s in self.method.schedulers().items()},
            "scalers": {name: s.state_dict() for name, s in self.ctx.scalers.items()},
            "method": self.method.extra_state(),
            "best_val": self.best_val,
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

    def _log(self, pending: dict[str, list[float]]) -> dict[str, float]:
        images, corrupt = _sum_across_ranks(
            [sum(pending.pop("images", [0.0])), float(self.streams.corrupt_skipped)],
            self.device,
            self.world_size,
        )
        self.images_seen += images
        metrics = {key: sum(values) / len(values) for key, values in pending.items() if values}
        metrics["data/corrupt_skipped"] = corrupt
        metrics["throughput/images_per_second"] = self.images_seen / max(self.train_seconds, 1e-9)
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, self.step)
        pending.clear()
        return metrics

    def evaluate_on(self, name: str, model: nn.Module) -> dict[str, float]:
        images, labels = self.val if name == "val" else self.test
        return evaluate(
            model,
            images,
            labels,
            teacher=self.teacher,
            batch_size=self.cfg.eval.batch_size,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
        )

    def _report(self, metrics: dict[str, float], final: bool) -> None:
        student = self.method.deployable_student()
        val = self.evaluate_on("val", student)
        if val["top1"] > self.best_val:
            self.best_val, self.best_step = val["top1"], self.step
            self.best_student = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        student_hash = self._student_hash()
        report = {
            **metrics,
            "ddp/replicas_identical": float(len(set(_gather(student_hash, self.world_size))) == 1),
            "student/changed_from_init": float(student_hash != self.initial_student_hash),
            "step": self.step,
            "val/top1": val["top1"],
            "val/top5": val["top5"],
            "val/agreement": val["agreement"],
            "best_val/top1": self.best_val,
            "best_val/step": self.best_step,
            "resumed_from_step": self.resumed_from,
            "teacher/test_top1": self.teacher_test_top1,
            "train_seconds": self.train_seconds,
        }
        if final:
            report.update(self._final_metrics(student))
        samples = self.method.samples()
        if self.tracker is not None:
            self.tracker.log_metrics({k: v for k, v in report.items() if k not in metrics}, self.step)
            if samples is not None:
                self.tracker.log_image_grid(samples[:64], f"samples/step_{self.step:07d}.png")
        payload = self._payload()
        if self.rank == 0:
            with scratch_dir() as directory:
                save_state(directory, payload)
                self.session.report(report, directory, self.step)
        else:
            self.session.report(report, None, self.step)

    def _final_metrics(self, student: nn.Module) -> dict[str, float]:
        test = self.evaluate_on("test", student)
        result = {"test/top1": test["top1"], "test/top5": test["top5"], "test/agreement": test["agreement"]}
        if self.best_student is not None:
            best = copy.deepcopy(student)
            best.load_state_dict(self.best_student)
            result["test/top1_at_best_val"] = self.evaluate_on("test", best)["top1"]
        return result

    def run(self) -> None:
        cfg = self.cfg
        fresh_attempt = self.resumed_from == 0
        pending: dict[str, list[float]] = {}
        metrics: dict[str, float] = {}
        while self.step < cfg.max_steps:
            self.step += 1
            if fresh_attempt and cfg.debug.fail_at_step == self.step:
                raise InjectedFailure(f"debug.fail_at_step={self.step}: injected worker failure")
            started = time.perf_counter()
            for key, value in self.method.train_step(self.streams).items():
                pending.setdefault(key, []).append(value)
            self.train_seconds += time.perf_counter() - started
            final = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or self.step % cfg.eval.every == 0 or final:
                metrics = self._log(pending)
            if self.step % cfg.eval.every == 0 or final:
                self._report(metrics, final)
        if self.resumed_from >= cfg.max_steps:
            self._report(
                {"throughput/images_per_second": self.images_seen / max(self.train_seconds, 1e-9)}, True
            )


def run_worker(loop_config: dict[str, Any], session: Session) -> None:
    """Run one worker of a training run described by ``loop_config`` (see ``rayoodkd.launch``)."""
    Worker(loop_config, session).run()


def _version() -> str:
    from rayoodkd import __version__

    return __version__
