"""Checks a run passes in the driver before Ray or MLflow start, and the cluster check right after Ray does.

Everything that can be known from the config and the files it names is checked here, so a bad input ends
in one line naming the key (exit 2) instead of a worker traceback and an orphaned MLflow run: storage is
writable, the tracking server answers, every corpus (each member of a union) exists and is non-empty
(parquet: with the configured columns), the teacher is a readable rayoodkd teacher, and the student and the
method can be built for it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from rayoodkd.config import BaseRunConfig, ConfigError
from rayoodkd.data.config import Corpus, CorpusConfig
from rayoodkd.errors import first_line
from rayoodkd.methods.base import Stage
from rayoodkd.storage import filesystem

TRACKING_TIMEOUT_S = 5.0
RESERVED_STUDENT_KWARGS = ("num_classes", "in_channels", "image_size")


def check_storage(storage_path: str) -> None:
    """``storage_path`` can be created and written (a probe file is written and removed)."""
    _check_writable("storage_path", storage_path)


def check_output_dir(option: str, directory: Path) -> None:
    """``directory`` (a command's ``--output``) can be created and written: checked before the sweep or the
    comparison whose results it will hold, not after it."""
    _check_writable(option, str(directory))


def _check_writable(key: str, location: str) -> None:
    """``location`` (local or a URI) can be created and a probe file written in it and removed."""
    try:
        fs, root = filesystem(location)
        probe = f"{root.rstrip('/')}/.rayoodkd-write-probe-{uuid.uuid4().hex}"
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as stream:
            stream.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: cannot write to {location!r} ({first_line(error)})") from None


def check_tracking(tracking_uri: str, timeout_s: float = TRACKING_TIMEOUT_S) -> None:
    """An ``http(s)://`` tracking server answers within ``timeout_s`` (any HTTP status is an answer)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(
            f"tracking_uri: no MLflow server answers at {tracking_uri} within {timeout_s:.0f} s ({reason}); "
            "start it, or leave tracking_uri unset for a local store under storage_path"
        ) from None


def check_corpus(key: str, corpus: Corpus) -> None:
    """The corpus at ``key`` exists and holds images (parquet: with its image and label columns); in a
    union each member does (``data.ood.1.source: ...`` names the second), and its labelled members number
    their classes alike."""
    from rayoodkd.data.readers import class_names_of

    if isinstance(corpus, CorpusConfig):
        _check_member(key, corpus)
        return
    for index, member in enumerate(corpus):
        _check_member(f"{key}.{index}", member)
    try:
        class_names_of(corpus)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"{key}.{first_line(error)}") from None


def _check_member(key: str, corpus: CorpusConfig) -> None:
    from rayoodkd.data.builtin import HERSHEY_DIR, HERSHEY_MISSING
    from rayoodkd.data.readers import IMAGE_EXTENSIONS, filesystem_and_path, resolve_format

    try:
        fmt = resolve_format(corpus)
    except FileNotFoundError as error:
        raise ConfigError(f"{key}.{first_line(error)}") from None
    except ValueError as error:
        raise ConfigError(f"{key}.{first_line(error)}") from None
    if fmt == "builtin":
        if corpus.source == "hershey" and not Path(HERSHEY_DIR).is_dir():
            raise ConfigError(f"{key}.source: {HERSHEY_MISSING}")
        return
    fs, path = filesystem_and_path(corpus.source)
    if fmt == "image_folder":
        if fs.get_file_info(path).type == pafs.FileType.File:
            return
        files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if not any(f.is_file and f.base_name.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            raise ConfigError(
                f"{key}.source: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {corpus.source}"
            )
    elif fmt == "parquet":
        _check_parquet(key, corpus, fs, path)


def _check_parquet(key: str, corpus: CorpusConfig, fs: pafs.FileSystem, path: str) -> None:
    import pyarrow.parquet as pq

    from rayoodkd.data.readers import parquet_files

    try:
        files = parquet_files(fs, path)
        with fs.open_input_file(files[0]) as stream:
            names = pq.read_schema(stream).names
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{key}.source: {corpus.source} is not readable parquet ({first_line(error)})"
        ) from None
    if corpus.image_column not in names:
        raise ConfigError(
            f"{key}.image_column: column {corpus.image_column!r} is not in {corpus.source} (columns: "
            f"{', '.join(names)})"
        )
    default_label = CorpusConfig.model_fields["label_column"].default
    label = corpus.label_column
    if corpus.labelled and label is not None and label != default_label and label not in names:
        raise ConfigError(
            f"{key}.label_column: column {label!r} is not in {corpus.source} (columns: {', '.join(names)})"
        )
    for file in files:
        with fs.open_input_file(file) as stream:
            if pq.ParquetFile(stream).metadata.num_rows > 0:
                return
    raise ConfigError(f"{key}.source: {corpus.source} holds no rows")


def corpora(cfg: BaseRunConfig) -> dict[str, Corpus]:
    """Every corpus the run reads: the streams its method consumes, then ``val`` and ``test``."""
    from rayoodkd.methods import METHODS

    found: dict[str, Corpus] = {}
    for name in [*sorted(METHODS.get(cfg.method).consumes), "val", "test"]:
        corpus = getattr(cfg.data, name)
        if corpus is None and name in ("val", "test"):
            raise ConfigError(
                f"data.{name}: not set; the student is selected on data.val and scored on data.test "
                f"(e.g. data.{name}.source=mnist5k data.{name}.split={name})"
            )
        if corpus is None:
            raise ConfigError(
                f"data.{name}: method {cfg.method!r} consumes the {name!r} stream; set data.{name}.source"
            )
        found[f"data.{name}"] = corpus
    return found


def check_models(cfg: BaseRunConfig, teacher_path: Path) -> list[str]:
    """The student and the method build for this teacher on the CPU, as every worker will build them;
    returns notes for the console (see :func:`check_stages`)."""
    from rayoodkd.engine.loop import build_method, build_student, run_context
    from rayoodkd.teacher_io import load_teacher

    teacher, info = load_teacher(teacher_path)
    for stream, transform in cfg.data.transforms.items():
        if transform.normalizer is not None and len(transform.normalizer[0]) != info.channels:
            raise ConfigError(
                f"data.transforms.{stream}.normalizer: needs {info.channels} value(s) per channel list "
                f"(the teacher takes {info.channels}-channel images)"
            )
    for reserved in RESERVED_STUDENT_KWARGS:
        if reserved in cfg.student.kwargs:
            raise ConfigError(
                f"student.kwargs.{reserved}: set from the teacher (num_classes {info.num_classes}, "
                f"in_channels {info.channels}, image_size {info.image_size}); remove it"
            )
    try:
        student = build_student(cfg, info, torch.device("cpu"))
    except ValueError as error:
        raise ConfigError(f"student.arch: {first_line(error)}") from None
    except TypeError as error:
        raise ConfigError(f"student.kwargs: {first_line(error)}") from None
    try:
        generator = torch.Generator().manual_seed(cfg.seed)
        method = build_method(cfg, teacher, student, run_context(cfg, info, torch.device("cpu"), generator))
    except (ValueError, TypeError, RuntimeError) as error:
        message = first_line(error)
        raise ConfigError(message if message.startswith(cfg.method) else f"{cfg.method}: {message}") from None
    return check_stages(cfg, method.stages(), info.content_hash, method.players())


def method_stages(cfg: BaseRunConfig, teacher_path: Path) -> list[Stage]:
    """The stages of ``cfg``'s method, built on the CPU for this teacher."""
    from rayoodkd.engine.loop import build_method, build_student, run_context
    from rayoodkd.teacher_io import load_teacher

    teacher, info = load_teacher(teacher_path)
    cpu = torch.device("cpu")
    ctx = run_context(cfg, info, cpu, torch.Generator().manual_seed(cfg.seed))
    return build_method(cfg, teacher, build_student(cfg, info, cpu), ctx).stages()


def check_stages(
    cfg: BaseRunConfig,
    stages: list[Stage],
    teacher_hash: str,
    players: dict[str, torch.nn.Module] | None = None,
) -> list[str]:
    """``stop_after`` names a stage; ``init_from`` holds the end of the stage before its start stage, trained
    with this teacher, its players fit ``players`` (this run's, when given), and it starts before
    ``stop_after``. A run that resumes from its own checkpoints no longer needs its ``init_from``. Returns
    notes for the console: the method keys in which this run differs from the one it starts from."""
    from rayoodkd.engine.checkpoint import checkpoint_dirs, stage_start
    from rayoodkd.storage import ray_storage_path

    names = [stage.name for stage in stages]
    if cfg.stop_after is not None and cfg.stop_after not in names:
        raise ConfigError(
            f"stop_after: {cfg.method!r} has no stage {cfg.stop_after!r}; allowed: {', '.join(names)}"
        )
    if cfg.init_from is None:
        return []
    if cfg.stop_after is not None and names.index(cfg.stop_after) < names.index(cfg.init_from.stage):
        raise ConfigError(
            f"stop_after: {cfg.stop_after!r} comes before init_from.stage {cfg.init_from.stage!r}"
        )
    if cfg.run_name and checkpoint_dirs(f"{ray_storage_path(cfg.storage_path).rstrip('/')}/{cfg.run_name}"):
        return []
    start = stage_start(cfg.init_from.checkpoint, stages, cfg.init_from.stage, cfg.method)
    if start.teacher_hash != teacher_hash:
        raise ConfigError(
            f"init_from.checkpoint: {start.directory} was trained with another teacher than this run's"
        )
    for name, player in (players or {}).items():
        try:
            player.load_state_dict(start.players[name])
        except (KeyError, RuntimeError) as error:
            raise ConfigError(
                f"init_from.checkpoint: its {name} does not fit this run's (a different architecture or "
                f"size): {first_line(error)}"
            ) from None
    source = start.config.get(cfg.method, {})
    mine = cfg.method_config().model_dump(mode="json")
    changed = [f"{cfg.method}.{key}" for key in sorted(mine) if source.get(key) != mine[key]]
    if not changed:
        return []
    return [
        f"init_from: starting at stage {cfg.init_from.stage!r} of {start.directory}; differs in "
        f"{', '.join(changed)} (only what acts from {cfg.init_from.stage!r} on takes effect)"
    ]


def preflight(
    cfg: BaseRunConfig, log: Any = print, before_teacher_training: Callable[[], None] | None = None
) -> tuple[Path, str]:
    """Check everything a run needs before MLflow starts, and before Ray unless a teacher must be trained;
    return the teacher file and tracking URI.

    A teacher recipe without a cached result is trained here, after the other checks and
    ``before_teacher_training`` (the command starts Ray its own way: the recipe reads its corpora through Ray
    Data).
    """
    from rayoodkd.engine.tracking import default_tracking_uri
    from rayoodkd.teacher import ensure_teacher

    check_storage(cfg.storage_path)
    try:
        tracking_uri = cfg.tracking_uri or default_tracking_uri(cfg.storage_path)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_tracking(tracking_uri)
    for key, corpus in corpora(cfg).items():
        check_corpus(key, corpus)
    if not cfg.teacher.checkpoint:
        for split in ("train", "val", "test"):
            check_corpus(f"teacher.recipe.{split}", getattr(cfg.teacher.recipe, split))
    teacher_path = ensure_teacher(cfg.teacher, cfg.data.cache_dir, log, before_teacher_training)
    for note in check_models(cfg, teacher_path):
        log(note)
    return teacher_path, tracking_uri


def autoscaler_present() -> bool:
    """Whether the connected cluster runs an autoscaler that may add nodes (what ``ray status`` reads)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = json.loads(status).get("autoscaler_report") if status is not None else None
        if report:
            # A cluster started by hand (`ray start`, `ray.init`) runs a read-only autoscaler that names
            # every node's type after the node itself; one launched from a cluster config has named types.
            mapping = report.get("node_type_mapping") or {}
            if report.get("pending_launches") or report.get("pending_nodes"):
                return True
            if any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items()):
                return True
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        return bool(is_autoscaler_v2(fetch_from_server=True))
    except Exception:  # no autoscaler state to read: a fixed cluster
        return False


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{value:g} {name}" for name, value in sorted(resources.items()))


def check_cluster_fits(cfg: BaseRunConfig, log: Any = print, poll_s: float = 5.0) -> None:
    """The connected Ray cluster can hold ``num_workers`` workers of the configured size.

    A cluster that cannot grow is refused at once; with an autoscaler the driver waits, saying so, for at
    most ``resources.wait_for_workers_s``.
    """
    import ray

    if cfg.num_workers == 0:
        return
    need = {"CPU": cfg.num_workers * cfg.resources.cpus_per_worker}
    if cfg.use_gpu:
        need["GPU"] = cfg.num_workers * cfg.resources.gpus_per_worker
    started = time.monotonic()
    deadline = started + cfg.resources.wait_for_workers_s
    last_message = -float("inf")
    while True:
        total = ray.cluster_resources()
        has = {name: float(total.get(name, 0.0)) for name in need}
        if all(has[name] + 1e-9 >= value for name, value in need.items()):
            return
        can_grow = autoscaler_present()
        now = time.monotonic()
        if not can_grow or now >= deadline:
            waited = f" after waiting {now - started:.0f} s for the autoscaler" if can_grow else ""
            raise ConfigError(
                f"num_workers={cfg.num_workers}: needs {_describe(need)} (resources.cpus_per_worker="
                f"{cfg.resources.cpus_per_worker:g}{', gpus_per_worker=' if cfg.use_gpu else ''}"
                f"{cfg.resources.gpus_per_worker if cfg.use_gpu else ''}), but the Ray cluster has "
                f"{_describe(has)}{waited}; lower num_workers or the per-worker resources, or add nodes"
            )
        if now - last_message >= 30:
            log(
                f"waiting for the cluster to offer {_describe(need)} (it has {_describe(has)}; an autoscaler "
                f"may add nodes); giving up in {deadline - now:.0f} s (resources.wait_for_workers_s)"
            )
            last_message = now
        time.sleep(poll_s)
