"""Small builders shared by several test modules (plain functions: also usable in spawned processes)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rayoodkd.config import BaseRunConfig, resolve_config
from rayoodkd.engine.loop import run_worker
from rayoodkd.engine.session import LocalSession
from rayoodkd.methods.base import Method, RunContext


def small_context(world_size: int = 1, rank: int = 0, batch_size: int = 128) -> RunContext:
    """A CPU run context for 1×8×8 images of 10 classes (mean 0.5, std 0.25)."""
    return RunContext(
        device=torch.device("cpu"),
        rank=rank,
        world_size=world_size,
        generator=torch.Generator().manual_seed(0),
        num_classes=10,
        image_size=8,
        channels=1,
        mean=(0.5,),
        std=(0.25,),
        max_steps=1,
        batch_size=batch_size,
    )


def ray_run_config(tmp_path: Path, teacher: Path, *overrides: str) -> BaseRunConfig:
    """The demo preset with ``teacher``, storage and cache under ``tmp_path``, and ``overrides``."""
    return resolve_config(
        "demo",
        [
            f"teacher.checkpoint={teacher}",
            f"storage_path={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
    )


def digit_blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random 1×28×28 images in [0, 1] with random labels of 10 classes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def run_in_process(
    run_dir: Path, teacher: Path, overrides: list[str], labelled: int, evaluated: int, resume: bool = False
) -> LocalSession:
    """The demo preset with ``teacher`` and ``overrides``, run in this process on ``labelled`` random
    labelled images (val and test: ``evaluated`` each), checkpointing under ``run_dir``."""
    session = LocalSession(
        streams={"labelled": digit_blobs(labelled, 1)},
        eval_sets={"val": digit_blobs(evaluated, 3), "test": digit_blobs(evaluated, 4)},
        checkpoint_root=run_dir,
        resume_from=run_dir if resume else None,
    )
    cfg = resolve_config("demo", [f"teacher.checkpoint={teacher}", *overrides])
    run_worker({"config": cfg.model_dump(mode="json"), "teacher_path": str(teacher)}, session)
    return session


def logged_images(client: object, run_id: str, key: str) -> dict[int, str]:
    """``{step: artifact path}`` of the images a run logged under ``key`` with ``MlflowClient.log_image``."""
    prefix = f"images/{key}+step+"
    found = {}
    for artifact in client.list_artifacts(run_id, "images"):
        if artifact.path.startswith(prefix) and artifact.path.endswith(".png"):
            found[int(artifact.path[len(prefix) :].split("+")[0])] = artifact.path
    return found


def step_metrics(method: Method, data: object) -> dict[str, float]:
    """One ``train_step`` with its metrics as floats; a tensor metric must be a detached 0-d tensor (the
    engine sums them on the device)."""
    metrics = method.train_step(data)  # type: ignore[arg-type]
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            assert value.dim() == 0 and not value.requires_grad, f"{key}: {value!r}"
    return {key: float(value) for key, value in metrics.items()}


def signal_once_ready(
    argv: list[str], ready: Callable[[], bool], signum: int, timeout_s: float = 240
) -> tuple[int, str, list[str]]:
    """Run the command ``argv`` in its own process (its own Ray instance), send it ``signum`` once ``ready()``
    holds, and return its exit code, its stderr and the command lines of the processes it had started by
    then. The command and every process it started are killed if it does not end, so that nothing goes on
    training after a failed test."""
    import psutil

    process = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    started: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while not ready() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
        assert process.poll() is None, process.communicate()[1][-2000:]
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a short-lived helper process may end meanwhile
                started.append(" ".join(child.cmdline()))
        os.kill(process.pid, signum)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            driver = psutil.Process(process.pid)
            for member in [*driver.children(recursive=True), driver]:
                with contextlib.suppress(psutil.Error):
                    member.kill()
            process.communicate()
    return process.returncode, err, started
