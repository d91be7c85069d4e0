"""The shared optimizer and schedule config (``<method>.optim.<player>``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayoodkd.config import ConfigError, resolve_config
from rayoodkd.methods.optim import OptimizerConfig


def test_a_partial_player_section_keeps_the_methods_defaults_for_that_player() -> None:
    cfg = resolve_config("demo", ["method=mosaickd", "mosaickd.optim.discriminator.lr=2e-4"])
    discriminator = cfg.mosaickd.optim.discriminator
    assert (discriminator.name, discriminator.lr, discriminator.betas) == ("adam", 2e-4, (0.5, 0.999))
    assert discriminator.schedule == "cosine"
    assert cfg.mosaickd.optim.generator.lr == 1e-3  # an untouched player keeps everything


def test_every_method_names_its_players_optimizers_alike() -> None:
    cfg = resolve_config("demo")
    for method in ("kd_ood", "kd_id", "mosaickd", "dfq", "dfad", "tadfkd", "deepinv", "kd3", "dfnd", "augkd"):
        players = type(getattr(cfg, method).optim).model_fields
        assert "student" in players, method
        for player in players:
            assert isinstance(getattr(getattr(cfg, method).optim, player), OptimizerConfig)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mosaickd.optim.student.lrr=1", "unknown key 'mosaickd.optim.student.lrr'; allowed keys under "),
        (
            "mosaickd.optim.critic.lr=1",
            "unknown key 'mosaickd.optim.critic'; allowed keys under 'mosaickd.optim'",
        ),
        ("mosaickd.optim.student.name=rmsprop", "invalid value for 'mosaickd.optim.student.name'"),
        ("mosaickd.optim.student.schedule=multistep", "schedule=multistep needs milestones"),
    ],
)
def test_bad_optimizer_keys_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_config("demo", [override])


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
    return lrs


def test_cosine_and_multistep_follow_pytorchs_schedulers() -> None:
    weight = nn.Parameter(torch.zeros(1))
    cosine = OptimizerConfig(lr=0.1, schedule="cosine", eta_min=2e-3)
    ours = _lrs(cosine.build([weight], 20)[1], 20)
    reference_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_optimizer, T_max=20, eta_min=2e-3)
    assert ours == pytest.approx(_lrs(reference, 20), rel=1e-9)

    multistep = OptimizerConfig(lr=0.1, schedule="multistep", milestones=(0.25, 0.5), gamma=0.1)
    reference_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = torch.optim.lr_scheduler.MultiStepLR(reference_optimizer, [5, 10], gamma=0.1)
    assert _lrs(multistep.build([weight], 20)[1], 20) == pytest.approx(_lrs(reference, 20), rel=1e-9)
    assert [multistep.lr_at(epoch, 20) for epoch in (4, 5, 10)] == pytest.approx([0.1, 0.01, 0.001])


def test_a_resumed_schedule_anneals_over_the_budget_of_the_resumed_run() -> None:
    """A run relaunched with a larger max_steps continues its cosine over the new budget, not the old one."""
    config = OptimizerConfig(lr=0.1, schedule="cosine")
    optimizer, scheduler = config.build([nn.Parameter(torch.zeros(1))], 100)
    _lrs(scheduler, 50)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    resumed_optimizer, resumed = config.build([nn.Parameter(torch.zeros(1))], 200)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    resumed_lrs = _lrs(resumed, 150)
    assert resumed_lrs[49] == pytest.approx(config.lr_at(100, 200))  # halfway through the new budget
    assert resumed_lrs[-1] == pytest.approx(0.0, abs=1e-12)
