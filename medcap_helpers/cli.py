"""``medcap`` command line: run the pipeline, serve the demo of a finished run, or show a profile's config.

    medcap run --profile smoke                      # the embedded default, CPU, minutes
    medcap run --profile full --out runs/blip-large --vram-budget-gb 4
    medcap run --profile full --gpus 2              # stage 03 data-parallel on two GPUs
    medcap run --profile smoke --stages 01-03 --set num_train_epochs=2
    medcap demo --run runs/smoke                    # the upload demo as a web page on 127.0.0.1:8866
    medcap check --profile full                     # preflight alone: what would break hours later
    medcap config --profile full
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medcap_helpers import pipeline

pipeline.quiet_libraries()  # before bitsandbytes loads: no import-time kernel-package note on the terminal

# Not `demo`: it imports the model stack (peft, bitsandbytes; 5 s), which `medcap run`, started once per
# stage, hands to the notebooks' kernels.
from medcap_helpers import preflight, runs  # noqa: E402
from medcap_helpers.config import BOOLEAN_FIELDS, PROFILES, MedcapConfig, field_names  # noqa: E402
from medcap_helpers.errors import ConfigError, MedcapError, StageFailed  # noqa: E402
from medcap_helpers.pipeline import resolve_config, run_pipeline  # noqa: E402
from medcap_helpers.summary import final_table_text  # noqa: E402


BOOLEAN_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False,
                 "1": True, "0": False}


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with value read as a Python literal when it is one (``2``, ``None``, ``(4, 8)``); a
    switch also takes true/false, yes/no, on/off or 1/0."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in field_names():
        raise ConfigError(f"Unknown setting {key!r}. Known settings: {', '.join(field_names())}.")
    if key in BOOLEAN_FIELDS and raw.strip().lower() in BOOLEAN_WORDS:  # true/false/yes/no/on/off as well
        return key, BOOLEAN_WORDS[raw.strip().lower()]
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def build_config(args: argparse.Namespace) -> MedcapConfig:
    """The profile's settings with ``--set``/``--out``/``--vram-budget-gb``/``--gpus``; a run folder that holds a run
    continues with its saved settings (unless ``--force``). Paths are resolved against this folder."""
    overrides: dict[str, Any] = dict(parse_assignment(item) for item in (args.set or []))
    if getattr(args, "vram_budget_gb", None) is not None:
        overrides["vram_budget_gb"] = args.vram_budget_gb
    if getattr(args, "gpus", None) is not None:
        overrides["num_gpus"] = args.gpus
    return resolve_config(args.profile, args.out, overrides, fresh=getattr(args, "force", False))


DEFAULT_DEMO_PORT = 8866


def voila_command(page: Path, port: int, host: str, open_browser: bool) -> list[str]:
    """The Voilà command that serves ``page`` (code hidden) on ``host:port``."""
    command = [sys.executable, "-m", "voila", str(page), f"--port={port}", f"--Voila.ip={host}",
               "--strip_sources=True", "--theme=light"]
    if not open_browser:
        command.append("--no-browser")
    return command


def serve_demo(run_dir: str, port: int = DEFAULT_DEMO_PORT, host: str = "127.0.0.1", open_browser: bool = True) -> int:
    """Serve the demo page of the finished run in ``run_dir`` with Voilà until interrupted."""
    run = runs.check_finished_run(run_dir)
    env = {**os.environ, runs.DEMO_RUN_ENV: str(run)}
    print(f"medcap demo: serving the run {run} on http://{host}:{port}/ (Ctrl+C stops it)", flush=True)
    try:
        return subprocess.call(voila_command(runs.DEMO_PAGE_NOTEBOOK, port, host, open_browser), env=env)
    except KeyboardInterrupt:
        return 0


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
    run.add_argument("--gpus", type=int, dest="gpus", metavar="N",
                     help="train stage 03 data-parallel on N GPUs (num_gpus; default: all visible)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--skip-check", action="store_true",
                     help="skip the preflight that runs before a GPU profile (see `medcap check`)")

    check = sub.add_parser("check", help="preflight: CUDA, bitsandbytes, GPU memory, disk, Java, data, hub")
    check.add_argument("--profile", choices=PROFILES, default="full")
    check.add_argument("--out", help="run folder (default: runs/<profile>)")
    check.add_argument("--vram-budget-gb", type=float, dest="vram_budget_gb")
    check.add_argument("--gpus", type=int, dest="gpus", metavar="N")
    check.add_argument("--set", action="append", metavar="KEY=VALUE")

    page = sub.add_parser("demo", help="serve the upload demo of a finished run as a web page (Voilà)")
    page.add_argument("--run", default="runs/smoke", help="a finished run folder (default: runs/smoke)")
    page.add_argument("--port", type=int, default=DEFAULT_DEMO_PORT, help=f"default {DEFAULT_DEMO_PORT}")
    page.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default 127.0.0.1: this machine only; the page has no login)")
    page.add_argument("--no-browser", action="store_true", help="do not open a browser")

    show = sub.add_parser("config", help="print a profile's settings as JSON")
    show.add_argument("--profile", choices=PROFILES, default="smoke")
    show.add_argument("--out")
    show.add_argument("--set", action="append", metavar="KEY=VALUE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 a stage failed (see its executed notebook), 2 a setting or file to fix, 130 interrupted."""
    args = make_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return serve_demo(args.run, args.port, args.host, open_browser=not args.no_browser)
        config = build_config(args)
        if args.command == "config":
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        if args.command == "check" or (config.profile != "smoke" and not args.skip_check):
            checks = preflight.run_checks(config)
            if args.command == "check" or not preflight.passed(checks):
                print(preflight.report(checks), file=sys.stdout if preflight.passed(checks) else sys.stderr)
                return 0 if preflight.passed(checks) else 2
            print("medcap: preflight passed (`medcap check` shows the details).")
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
