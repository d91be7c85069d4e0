"""``python -m rayoodkd.train``: one distillation run on Ray Train, logged to MLflow.

With no arguments it runs the embedded demo: a LeNet-5 teacher trained on MNIST-5k (cached after the first
run), KD on font-rendered letters read through Ray Data, 2 Ray Train workers on a local Ray instance.
"""

from __future__ import annotations

import argparse
import sys

from rayoodkd.catalog import METHOD_NAMES, TOP_LEVEL_KEYS
from rayoodkd.cli import prog
from rayoodkd.config import ConfigError, preset_names, resolve_config, to_yaml
from rayoodkd.errors import CTRL_C, EXIT_CODE, RunInterrupted

EPILOG = """\
top-level keys: {keys}
sections: teacher.*, student.*, data.{{ood,web,labelled,val,test}}.*, eval.*, resources.*, debug.*,
          and one per method ({methods}).*
presets: {presets}

examples:
  python -m rayoodkd.train                                     # the embedded demo
  python -m rayoodkd.train --config mnist-kd-letters seed=1 max_steps=3000
  python -m rayoodkd.train --config my.yaml num_workers=4 use_gpu=true storage_path=s3://bucket/runs
  python -m rayoodkd.train --config demo --print-config
  ray job submit --working-dir . -- python -m rayoodkd.train --config demo num_workers=8 use_gpu=true
"""


def _parser() -> argparse.ArgumentParser:
    # The names come from rayoodkd.catalog, not from METHODS and the run-config model: those import torch,
    # and --help should answer at once (tests/test_packaging.py keeps the two in step).
    parser = argparse.ArgumentParser(
        prog=prog("train"),
        description="Distil a teacher into a student on Ray Train (DDP over N workers), logging to MLflow.",
        epilog=EPILOG.format(
            keys=", ".join(TOP_LEVEL_KEYS), methods=", ".join(METHOD_NAMES), presets=", ".join(preset_names())
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.batch_size=64"
    )
    parser.add_argument("--config", default="demo", help="a preset name or a YAML file (default: demo)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rayoodkd.teacher_io import TeacherFileError  # imports torch: not needed for --help

    try:
        cfg = resolve_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from rayoodkd.launch import RunFailed, launch

        try:
            summary = launch(cfg)
        except RunFailed as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except RunInterrupted as stop:
            print(stop, file=sys.stderr)
            return stop.exit_code
    except (ConfigError, FileNotFoundError, TeacherFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the run started
        print(CTRL_C, file=sys.stderr)
        return EXIT_CODE[CTRL_C]
    print(summary.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
