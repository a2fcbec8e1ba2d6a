"""Entry point: `python src/report.py multirun/... [DIR ...] [--out OUTDIR]`: the claims table, plots, report.md.

Runs can also come from W&B: `--wandb ENTITY/PROJECT --group G`; `--log-to-wandb` logs the table and
the plots to a report run in the runs' group (offline unless WANDB_MODE says otherwise).
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

from alexlab.report import ReportError, build_report, load_wandb_runs, log_to_wandb, report_runs, setup_lines


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Judge the paper's claims on finished runs.")
    parser.add_argument("dirs", nargs="*", type=Path, help="run or multirun dirs; every results.json below them is read")
    parser.add_argument("--out", type=Path, help="where report.md and the plots go (default: the first dir)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B instead of dirs")
    parser.add_argument("--group", help="the W&B group (the experiment name) to read with --wandb")
    parser.add_argument("--log-to-wandb", action="store_true", help="log the table and plots as a W&B report run")
    args = parser.parse_args(argv)
    if bool(args.dirs) == bool(args.wandb):
        parser.error("give run dirs or --wandb ENTITY/PROJECT, not both" if args.dirs else
                     "give the run or multirun dirs to report on, or --wandb ENTITY/PROJECT --group GROUP")
    if args.wandb and (not args.group or args.wandb.count("/") != 1):
        parser.error("--wandb needs ENTITY/PROJECT and --group")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.wandb:
            runs = load_wandb_runs(args.wandb, args.group)
            if not runs:
                raise ReportError(f"no runs in group {args.group} of {args.wandb}")
            result = report_runs(runs, [], args.out or Path("outputs") / f"report_{args.group}", [args.wandb])
        else:
            result = build_report(args.dirs, args.out or args.dirs[0])
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # --out where nothing can be written
        print(f"error: cannot write the report: {err}", file=sys.stderr)
        return 2
    print("Trained on:", *setup_lines(result["setups"]), "", *result["table"], sep="\n")
    if result["problems"]:  # failed, unreadable, missing or repeated runs: never averaged in, and said so here
        kinds = Counter(p["status"] for p in result["problems"])
        print(f"\n{len(result['problems'])} problem run(s), left out ("
              + ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items())) + "): listed in the report")
    print(f"\nreport: {result['report']}")
    if args.log_to_wandb:
        entity, project = args.wandb.split("/", 1) if args.wandb else result["wandb_project"]
        log_to_wandb(result, project, entity, args.group or result["experiment"], result["report"].parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
