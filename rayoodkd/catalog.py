"""Names the command-line help lists, importable without torch, Ray or MLflow.

``rayoodkd train --help`` lists the methods and the top-level run-config keys from here instead of importing
every method (torch) to build the run-config model, so it answers at once. tests/test_packaging.py checks
both against ``rayoodkd.methods.METHODS.names()`` and ``rayoodkd.config.run_config_model()``: a method or key
added there fails that test until it is listed here too.
"""

from __future__ import annotations

# ``METHODS.names()``: every registered method, sorted.
METHOD_NAMES = (
    "augkd",
    "deepinv",
    "dfad",
    "dfnd",
    "dfq",
    "dfq_finetune",
    "kd3",
    "kd_id",
    "kd_ood",
    "mosaickd",
    "tadfkd",
)

# The sections the engine reads (``teacher.*``, ...); with the keys below and one section per method they
# are the run-config model's fields.
SECTIONS = ("teacher", "student", "data", "eval", "resources", "debug")

# The other top-level keys of a run config, in the model's order.
TOP_LEVEL_KEYS = (
    "method",
    "seed",
    "max_steps",
    "num_workers",
    "use_gpu",
    "amp",
    "amp_dtype",
    "channels_last",
    "compile",
    "teacher_inference",
    "backend",
    "tracking_uri",
    "experiment_name",
    "storage_path",
    "run_name",
    "registered_model_name",
    "summary_json",
    "max_failures",
    "checkpoints_to_keep",
    "log_every",
    "system_metrics",
    "ray_logs",
    "ray_dashboard",
    "init_from",
    "stop_after",
)
