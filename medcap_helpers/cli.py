"""``medcap`` command line: run the pipeline or show a profile's config.

    medcap run --profile smoke                      # the embedded default, CPU, minutes
    medcap run --profile full --out runs/blip-large --vram-budget-gb 4
    medcap run --profile smoke --stages 01-03 --set num_train_epochs=2
    medcap config --profile full
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medcap_helpers.config import PROFILES, MedcapConfig, field_names
from medcap_helpers.errors import ConfigError, MedcapError, StageFailed
from medcap_helpers.pipeline import run_pipeline
from medcap_helpers.summary import final_table_text


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with value read as a Python literal when it is one (``2``, ``None``, ``(4, 8)``)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in field_names():
        raise ConfigError(f"Unknown setting {key!r}. Known settings: {', '.join(field_names())}.")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def build_config(args: argparse.Namespace) -> MedcapConfig:
    overrides: dict[str, Any] = dict(parse_assignment(item) for item in (args.set or []))
    if args.out:
        overrides["run_dir"] = args.out
    if getattr(args, "vram_budget_gb", None) is not None:
        overrides["vram_budget_gb"] = args.vram_budget_gb
    run_dir = Path(overrides.get("run_dir", MedcapConfig.from_profile(args.profile).run_dir))
    saved = run_dir / "config.json"
    if saved.exists() and not getattr(args, "force", False):
        # A rerun continues the run it finds, with its saved settings plus any new overrides.
        values = json.loads(saved.read_text())
        if values.get("profile") != args.profile:
            raise ConfigError(f"{run_dir} holds a '{values.get('profile')}' run, not '{args.profile}': "
                              "choose another --out folder or pass --force to start it afresh.")
        values.update(overrides)
        return MedcapConfig.from_dict(values)
    return MedcapConfig.from_profile(args.profile, **overrides)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the notebooks 01 → 06 into a run folder")
    run.add_argument("--profile", choices=PROFILES, default="smoke")
    run.add_argument("--out", help="run folder (default: runs/<profile>)")
    run.add_argument("--stages", help="subset such as 01-03 or 01,04 (default: all)")
    run.add_argument("--force", action="store_true", help="rerun stages that already finished")
    run.add_argument("--vram-budget-gb", type=float, dest="vram_budget_gb",
                     help="fit batch size and checkpointing to this much GPU memory")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field")
    run.add_argument("--no-progress", action="store_true")

    show = sub.add_parser("config", help="print a profile's settings as JSON")
    show.add_argument("--profile", choices=PROFILES, default="smoke")
    show.add_argument("--out")
    show.add_argument("--set", action="append", metavar="KEY=VALUE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 a stage failed (see its executed notebook), 2 a setting or file to fix, 130 interrupted."""
    args = make_parser().parse_args(argv)
    try:
        config = build_config(args)
        if args.command == "config":
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        run_pipeline(config, stages=args.stages, force=args.force, progress=not args.no_progress)
        print(final_table_text(config.run_dir))
        print(f"\nRun folder: {Path(config.run_dir).resolve()} (summary.md)")
        return 0
    except StageFailed as err:
        _report(err, args.debug)
        return 1
    except MedcapError as err:
        _report(err, args.debug, prefix="configuration error: " if isinstance(err, ConfigError) else "")
        return 2
    except KeyboardInterrupt:
        print("medcap: interrupted; finished stages are kept, rerun the same command to continue.",
              file=sys.stderr)
        return 130


def _report(err: BaseException, debug: bool, prefix: str = "") -> None:
    if debug:
        traceback.print_exception(err)
    print(f"medcap: {prefix}{err}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
