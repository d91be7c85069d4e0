"""The distilled student as users deploy it, and how it reaches MLflow's model registry.

A :class:`DeployedClassifier` takes images as the user has them: float ``(N, C, H, W)`` in ``[0, 1]`` at the
teacher's input size; the teacher's normalisation is inside, so nothing about the teacher file is needed to
use it. Every finished run logs two of them with ``mlflow.pytorch.log_model``: ``student`` (the final
network) and ``student_best_val`` (the one selected on the validation split), each with a signature, an
input example and its description as metadata; ``registered_model_name`` also registers the selected one.

    import mlflow
    student = mlflow.pytorch.load_model("runs:/<run id>/student_best_val")
    logits = student(images)          # images: float (N, C, H, W) in [0, 1]

The pickled model refers to rayoodkd's network classes, so the loading environment needs ``rayoodkd``
installed (``pip_requirements`` says so); it needs neither the teacher nor the run's checkpoints.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

STUDENT = "student"
STUDENT_BEST_VAL = "student_best_val"


class DeployedClassifier(nn.Module):
    """``network`` behind the teacher's input normalisation: float images in [0, 1] -> logits."""

    def __init__(
        self,
        network: nn.Module,
        *,
        arch: str,
        num_classes: int,
        channels: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.network = network
        self.arch, self.num_classes, self.channels, self.image_size = arch, num_classes, channels, image_size
        self.normalization = {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.network((images - self.mean) / self.std)

    def describe(self) -> dict[str, Any]:
        """What a user needs to feed it (recorded as the MLflow model's metadata)."""
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "input_shape": [self.channels, self.image_size, self.image_size],
            "input_range": [0.0, 1.0],
            **self.normalization,
        }


def deployed(network: nn.Module, arch: str, info: Any) -> DeployedClassifier:
    """A CPU, eval-mode copy of ``network`` wrapped for deployment (``info``: the teacher's TeacherInfo)."""
    clone = copy.deepcopy(network).cpu().eval().requires_grad_(False)
    return DeployedClassifier(
        clone,
        arch=arch,
        num_classes=info.num_classes,
        channels=info.channels,
        image_size=info.image_size,
        mean=tuple(info.mean),
        std=tuple(info.std),
    ).eval()


def log_deployed(
    model: DeployedClassifier,
    *,
    tracking_uri: str,
    run_id: str,
    name: str,
    example: Tensor,
    step: int,
    metadata: dict[str, Any],
    registered_model_name: str | None = None,
) -> str:
    """Log ``model`` to the MLflow run as ``name`` (signature and input example from ``example``, images in
    [0, 1]); return its ``runs:/`` URI."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    from rayoodkd import __version__

    example = example.detach().float().cpu()
    with torch.no_grad():
        output = model(example)
    signature = infer_signature(example.numpy(), output.numpy())
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    # Created here so that it lands in the run's experiment (log_model alone would use the process's
    # current experiment), with the run's config as its params.
    for stale in client.search_logged_models([run.info.experiment_id], filter_string=f"name = '{name}'"):
        if stale.source_run_id == run_id:  # a relaunch with a larger budget: runs:/ID/NAME is the newest
            client.delete_logged_model(stale.model_id)
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        params=run.data.params,
        model_type="classifier",
    )
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        mlflow.pytorch.log_model(
            model,
            name=name,
            model_id=logged.model_id,
            run_id=run_id,
            step=step,
            signature=signature,
            input_example=example.numpy(),
            metadata={**model.describe(), **metadata},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"rayoodkd=={__version__}"],
            registered_model_name=registered_model_name,
            await_registration_for=0,
        )
    finally:
        mlflow.set_tracking_uri(previous)
    return f"runs:/{run_id}/{name}"
