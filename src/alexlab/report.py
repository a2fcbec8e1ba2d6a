"""The report: read the runs' results.json files, pair runs per claim and seed, judge each claim.

It reads only what tracking.py writes and never imports the trainer, the data or the model code.
Everything a claim needs is in alexlab.claims; the metrics it is judged on are defined here.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API renders with Agg and leaves pyplot's global state alone
from matplotlib.ticker import MaxNLocator

from alexlab.claims import CLAIMS, Claim, get_path, is_ratio, paper_direction
from alexlab.experiment import NOT_THE_EXPERIMENT, differing_paths, flatten, without
from alexlab.errors import first_line, is_number
from alexlab.io import atomic_savefig, atomic_write_bytes
from alexlab.tracking import RESULTS_NAME

JOB_DIR_NAME = re.compile(r"^\d+_")  # Hydra multirun job dirs: <job number>_<overrides>
TRAIN_ERR_THRESHOLD = 25.0         # figure 1: iterations to 25% training error
CONVERGED_WITHIN = 1.0             # points above a run's best validation error that count as converged

METRICS = {
    "val_top1_err": "final validation top-1 error (%)",
    "val_top5_err": "final validation top-5 error (%)",
    "val_centre_top1_err": "final validation top-1 error of the centre patch alone (%): the ten-patch test's, or the "
                           "single-crop test's where that was the test",
    "overfit_gap": "final validation top-1 error minus the final net's top-1 error on as many training images, "
                   "tested as validation is (eval mode, centre crop; points)",
    "steps_to_25_train_err": "optimizer steps until the running training error first reaches 25% (censored if never)",
    "steps_to_converge": "optimizer steps until validation top-1 error first comes within 1 point of the run's best "
                         "(censored if that is only at the last epoch: the run was still improving)",
}

VERDICT_RULES = """\
Runs are paired per seed: a paper run and an ablated run pair when their resolved configs are identical
apart from the claim's factor, the paths the claim tunes, and what only says where or how a run was
executed or logged (experiment, logger, device, data paths, threads, logging interval, and the speed
switches, which compute the same function: model.lrn_impl, pool_in_lrn, grouped_conv, conv1_impl,
trainer.compile, channels_last). Where the claim tunes a path (relu: optim.lr), the value with the best
mean primary metric is picked for each factor value separately, scored over all the seeds launched at it
(one without a completed run that reached the metric, a failed run or a step count never reached, counts
as worse than any number), and only those runs are paired. Only completed runs take part; completed runs with identical configs (seed included) are
repeats, and only one is used: one with a step log before one without, then the latest.

Differences are ablated minus paper (error metrics, points). `steps_to_*` metrics are ratios ablated /
paper: they are averaged as log ratios and reported as exp of the mean and of the CI bounds; a pair where
either run never reached the threshold is censored, left out of the mean, and named in the verdict.
A censored count lies beyond its run's end, so the ratio of a pair censored on one side only is known to
lie on one side of 1 (above it where the ablated run is censored): where such pairs lie on the paper's
side the verdict cannot be contradicted (nor its effect size ruled out), where on the other side it
cannot be reproduced; it is inconclusive instead. Steps to 25% training
error are read from the step logs where both runs of a pair have them at one interval, else from both
runs' per-epoch history.
The 95% CI is mean ± t(0.975, n-1) · sd / sqrt(n) over the n paired differences (sample sd).

- **reproduced**: the CI excludes 0 (ratios: excludes 1) on the paper's side, and, where the paper
  gives an effect size E, does not lie wholly short of it. Where the whole CI lies beyond E, the reason
  says so: the effect is then larger than the paper's.
- **contradicted**: the CI excludes 0 (ratios: 1) on the other side, or the paper gives an effect size E
  and the whole CI lies on the near side of E (below E when the paper's effect is an increase, above it
  when a decrease), so the paper's effect size is ruled out, whether or not the CI also excludes 0 (the
  reason then says that the direction holds). So a CI that moves towards the paper's effect never gets
  a worse verdict. The paper's numbers are taken as stated: its "about 2 points" is 2.
- **inconclusive**: otherwise, with the number of seeds n that would detect an effect of the paper's size
  (of the observed mean where the paper gives no number) at the observed sd with 95% confidence and 80%
  power: the least n >= 2 with (t(0.975, n-1) + t(0.80, n-1)) · sd / sqrt(n) <= |effect| (log scale for
  ratios; the usual approximation of the paired t-test's power, which gives G*Power's 34, 15 and 10 seeds
  for effects of 0.5, 0.8 and 1 sd). One pair gives no CI: inconclusive, need at least 2 seeds.
- **not run**: the given dirs hold no runs of the ablation together with paper runs to pair them with.

A row's verdict is the verdict of its primary metric, the first metric the claim names."""

# Student's t quantiles for df = 1..30 (standard tables): t(0.975, df), the two-sided 95% critical
# value, and t(0.80, df), for 80% power.
T_TABLES = {
    0.975: (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
            2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
            2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423),
    0.80: (1.3764, 1.0607, 0.9785, 0.9410, 0.9195, 0.9057, 0.8960, 0.8889, 0.8834, 0.8791,
           0.8755, 0.8726, 0.8702, 0.8681, 0.8662, 0.8647, 0.8633, 0.8620, 0.8610, 0.8600,
           0.8591, 0.8583, 0.8575, 0.8569, 0.8562, 0.8557, 0.8551, 0.8546, 0.8542, 0.8538),
}
NORMAL_QUANTILES = {0.975: 1.959964, 0.80: 0.841621}


class ReportError(Exception):
    """Input the report cannot work with: the CLI prints it as one `error:` line."""


def t_quantile(p: float, df: int) -> float:
    """t(p, df) for p in T_TABLES: the table up to df=30, beyond it the Cornish-Fisher expansion (error below 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(T_TABLES[p]):
        return T_TABLES[p][df - 1]
    z = NORMAL_QUANTILES[p]
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def seeds_to_detect(effect_in_sds: float) -> int:
    """The fewest seeds (at least 2) at which a paired t-test at 5% two-sided detects an effect this many
    standard deviations of the differences large with 80% power (see VERDICT_RULES). The normal
    approximation, ((1.96 + 0.84) / d)^2, asks for too few at small n: 2 where the t-test needs 3 or more."""
    if effect_in_sds == math.inf:
        return 2
    n = max(2, math.ceil(((NORMAL_QUANTILES[0.975] + NORMAL_QUANTILES[0.80]) / effect_in_sds) ** 2))  # never too many
    while (t_quantile(0.975, n - 1) + t_quantile(0.80, n - 1)) / math.sqrt(n) > effect_in_sds:
        n += 1
    return n


# ---------------------------------------------------------------- runs and their metrics

@dataclass(eq=False)
class Run:
    name: str      # the run directory (or W&B run path)
    record: dict   # results.json as tracking.py writes it

    @property
    def config(self) -> dict:
        return self.record.get("config") or {}

    @property
    def status(self) -> str:
        return self.record.get("status") or "unknown"

    @property
    def seed(self):
        return self.config.get("seed")

    @cached_property
    def metrics(self) -> dict:
        return run_metrics(self.record)


CLASSES_BY_DATASET = {"fashion_mnist": 10, "cifar10": 10, "imagenet": 1000}
CHANCE_MARGIN = 1.0  # percentage points: a final error this close to chance means the run did not learn


def at_chance(run: Run) -> bool:
    """A completed run whose final validation error is within CHANCE_MARGIN of guessing: of guessing
    uniformly, or, where the run recorded it and it is lower (an unbalanced validation subset), of
    always guessing the most frequent class. Such runs stay in the analysis (not learning can be the
    effect of an ablation), but a verdict that rests on one says so."""
    data = run.config.get("data") or {}
    classes = run.record.get("num_classes") or data.get("classes") or data.get("num_classes") \
        or CLASSES_BY_DATASET.get(data.get("name"))
    guesses = [100 * (1 - 1 / classes)] if isinstance(classes, int) and classes > 0 else []
    if isinstance(run.record.get("val_majority_err"), (int, float)):
        guesses.append(run.record["val_majority_err"])
    err = run.metrics["val_top1_err"]
    return bool(guesses) and math.isfinite(err) and err >= min(guesses) - CHANCE_MARGIN  # NaN, inf: left out elsewhere


def diverged(run: Run) -> bool:
    """A run whose training or validation loss was not finite at some epoch (alexlab.train notes it and
    goes on: its net then guesses, so it reads as at chance level, which does not say why)."""
    return any(isinstance(m.get(key), float) and not math.isfinite(m[key])
               for m in run.record.get("history") or [] if isinstance(m, dict) for key in ("train_loss", "val_loss"))


def recorded_number(value) -> float:
    """A recorded error as a float; one that is missing or not a number (a record edited by hand, or
    read from W&B) as NaN, which the analysis leaves out and names (paired_stats)."""
    return float(value) if is_number(value) else math.nan


def run_metrics(record: dict) -> dict:
    final = record.get("final") if isinstance(record.get("final"), dict) else {}
    history = record.get("history") or []
    val = recorded_number(final.get("val_top1_err"))
    # Both tested alike: one centre patch, eval mode. The running training error (train_top1_err) is of
    # crops and mirrors under dropout, the very regularisers whose overfitting the gap measures; runs
    # from before train_eval_top1_err was recorded get NaN, left out and named.
    # A ten-patch test from before the centre patch was recorded beside it has no single-patch error: NaN
    # (left out and named), not the ten-patch one.
    ten_patch = bool(((record.get("config") or {}).get("eval") or {}).get("ten_crop"))
    single_val = recorded_number(final.get("val_centre_top1_err") if ten_patch else final.get("val_top1_err"))
    return {
        "val_top1_err": val,
        "val_top5_err": recorded_number(final.get("val_top5_err")),
        "val_centre_top1_err": single_val,
        "overfit_gap": single_val - recorded_number(final.get("train_eval_top1_err")),
        "steps_to_25_train_err": steps_to_train_err(record, TRAIN_ERR_THRESHOLD),
        "steps_to_converge": steps_to_converge(history),
    }


def steps_to_train_err(record: dict, threshold: float, per_epoch: bool = False):
    """The first step whose running training error is <= threshold; per-epoch history when no step log
    (or per_epoch: see pair_values)."""
    points = [] if per_epoch else [(s["step"], s["train_top1_err"]) for s in record.get("steps") or []]
    if not points:
        points = [(m["steps"], m["train_top1_err"]) for m in record.get("history") or []]
    return next((step for step, err in points if err <= threshold), None)


def step_log_every(record: dict):
    """The interval of the run's step log (trainer.log_every_steps), or None where it has none."""
    return ((record.get("config") or {}).get("trainer") or {}).get("log_every_steps") if record.get("steps") else None


def pair_values(metric: str, pair: dict) -> tuple:
    """(paper, ablated, read per epoch) values of a metric. steps_to_25_train_err is read at one resolution for both:
    a step log on one side only (a repeat of the paper run from a sweep that logs none may be the one
    kept), or logs at other intervals, would set an exact step against an epoch's end; both are read
    from the per-epoch history then."""
    paper, ablated = pair["paper"], pair["ablated"]
    if metric == "steps_to_25_train_err" and step_log_every(paper.record) != step_log_every(ablated.record):
        return (*(steps_to_train_err(r.record, TRAIN_ERR_THRESHOLD, per_epoch=True) for r in (paper, ablated)), True)
    return paper.metrics[metric], ablated.metrics[metric], False


def steps_to_converge(history: list):
    """None (censored) when the run only got within reach of its best at its last epoch: it was still
    improving by more than CONVERGED_WITHIN, so when it would have converged is unknown."""
    finite = [m["val_top1_err"] for m in history if math.isfinite(m["val_top1_err"])]
    if not finite:
        return None
    best = min(finite)
    first = next(i for i, m in enumerate(history) if m["val_top1_err"] <= best + CONVERGED_WITHIN)
    if first == len(history) - 1:  # a one-epoch run too: whether it had converged is unknown
        return None
    return history[first]["steps"]


CONFIG_SECTIONS = ("model", "data", "trainer", "optim", "eval")


def load_runs(root: Path) -> tuple[list[Run], list[dict]]:
    """Every results.json under root, plus problems: unreadable files and job dirs without results.json."""
    runs, problems = [], []
    for path in sorted(root.rglob(RESULTS_NAME)):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            problems.append(problem(path.parent, "unreadable", f"{RESULTS_NAME}: {err}"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            problems.append(problem(path.parent, "unreadable", f"{RESULTS_NAME} has no config"))
            continue
        odd = [key for key in CONFIG_SECTIONS if not isinstance(record["config"].get(key, {}), dict)]
        if odd:
            problems.append(problem(path.parent, "unreadable", f"{RESULTS_NAME}: config.{odd[0]} is not a mapping"))
            continue
        damage = record_damage(record)
        if damage:
            problems.append(problem(path.parent, "unreadable", f"{RESULTS_NAME}: {damage}"))
            continue
        runs.append(Run(str(path.parent), record))
    for job_dir in job_dirs(root):
        if not (job_dir / RESULTS_NAME).is_file():
            problems.append(problem(job_dir, "missing", f"no {RESULTS_NAME}"))
    return runs, problems


# What the report reads besides `final` (which recorded_number reads leniently): per epoch and per step.
HISTORY_KEYS, STEP_KEYS = ("epoch", "steps", "train_top1_err", "val_top1_err"), ("step", "train_top1_err")


def record_damage(record: dict) -> str | None:
    """What in a record (edited by hand, or cut short) the report cannot read, or None: a history or step
    log that is not a list of entries with numbers where the report reads them, or a cost or size field
    that is not a number. Such a run is listed as unreadable instead of ending the report in a traceback."""
    for name, keys in (("history", HISTORY_KEYS), ("steps", STEP_KEYS)):
        entries = record.get(name) or []
        if not isinstance(entries, list):
            return f"{name} is not a list"
        for i, entry in enumerate(entries):
            bad = [k for k in keys if not (isinstance(entry, dict) and is_number(entry.get(k)))]
            if bad:
                return f"{name}[{i}].{bad[0]} is not a number"
    for key in ("wall_time_s", "cpu_time_s", "images_seen", "train_images", "processes"):
        if record.get(key) is not None and not is_number(record[key]):
            return f"{key} is not a number ({record[key]!r})"
    return None


def job_dirs(root: Path):
    """Dirs Hydra made for one job: they hold .hydra, or are <num>_... subdirs of a multirun dir."""
    for path in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if (path / ".hydra").is_dir() or (JOB_DIR_NAME.match(path.name) and (path.parent / "multirun.yaml").is_file()):
            yield path


def problem(run, status: str, error) -> dict:
    return {"run": str(run), "status": status, "error": error}


def drop_repeats(runs: list[Run]) -> tuple[list[Run], list[dict]]:
    """Completed runs with one config (seed included) repeat one experiment; they are not extra seeds.
    The one kept: one with a step log before one without (relu's steps to 25% are read from it), then
    the latest."""
    latest, problems = {}, []
    for run in sorted(runs, key=lambda r: (bool(r.record.get("steps")), str(r.record.get("started_at") or ""))):
        if run.status != "completed":
            continue
        key = json.dumps(without(run.config, NOT_THE_EXPERIMENT), sort_keys=True, default=str)
        if key in latest:
            problems.append(problem(latest[key].name, "repeat", f"same config and seed as {run.name}, used instead"))
        latest[key] = run
    kept = set(latest.values())
    return [r for r in runs if r.status != "completed" or r in kept], problems


# ---------------------------------------------------------------- pairing

def experiment_config(config: dict, claim: Claim, ignore: tuple = ()) -> dict:
    """The config without the claim's factor, its tuned paths, what is not the experiment and `ignore`."""
    return without(config, (claim.factor, *claim.tune, *NOT_THE_EXPERIMENT, *ignore))


def comparable_key(config: dict, claim: Claim, ignore: tuple = ()) -> str:
    """experiment_config as canonical JSON: a paper run and an ablated run with the same key form a pair
    (the seed is kept)."""
    return json.dumps(experiment_config(config, claim, ignore), sort_keys=True, default=str)


def factor_value(run: Run, claim: Claim):
    try:
        return get_path(run.config, claim.factor)
    except (KeyError, TypeError):
        return None


def metric_score(runs: list[Run], metric: str) -> tuple:
    """Lower is better: the share of the seeds launched without a completed run that reached the metric
    (a run that failed, diverged or stopped counts against its value, not only the survivors' mean),
    then the mean over those that did; a metric never reached (None), or not a number, counts as not."""
    reached_by_seed = defaultdict(list)
    for run in runs:
        value = run.metrics[metric] if run.status == "completed" else None
        reached_by_seed[json.dumps(run.seed, default=str)] += [value] if is_number(value) and math.isfinite(value) else []
    reached = [values[0] for values in reached_by_seed.values() if values]
    return (1 - len(reached) / len(reached_by_seed), float(np.mean(reached)) if reached else math.inf)


def pick_tuned(runs: list[Run], claim: Claim, metric: str) -> tuple[list[Run], str | None, int]:
    """The runs of the tuned value with the best mean metric, that value as text, and how many values
    there were to choose from."""
    if not claim.tune or not runs:
        return runs, None, 0
    groups = defaultdict(list)
    for run in runs:
        groups[", ".join(f"{p}={json.dumps(get_path(run.config, p))}" for p in claim.tune)].append(run)
    best = min(groups, key=lambda value: metric_score(groups[value], metric))
    return groups[best], best, len(groups)


def tested_twins(claim: Claim, runs: list[Run]) -> list[Run]:
    """For a claim whose ablation only changes the test (claim.recorded_as: ten_crop), the ablated side
    of each paper run that recorded it: a run of its own, with the paper run's config but the claim's
    factor, and the paper run's history with the recorded test's metrics in place of its own. It costs
    nothing (no training of its own). Paper runs are those launched for the claim, and those with every
    other claim's factor at the paper's value (the `paper` runs of `sweeps=all` and of the other claims'
    sweeps; not their ablated runs, each of which would be a set-up of its own here). None where a
    separately trained ablated run of the same config and seed exists (sweeps before the paper runs
    recorded both tests): that one is used."""
    if not claim.recorded_as:
        return []
    (ablation, value), = claim.ablations.items()
    trained = {comparable_key(r.config, claim) for r in runs if factor_value(r, claim) == value and r.status == "completed"}
    others = [c for c in CLAIMS.values() if c.id != claim.id]
    twins = []
    for run in runs:
        history = run.record.get("history") or []
        paper = run.record.get("experiment") == claim.id or all(factor_value(run, c) == c.paper_value for c in others)
        if (not paper or factor_value(run, claim) != claim.paper_value or comparable_key(run.config, claim) in trained
                or not history or any(key not in m for m in history for key in claim.recorded_as.values())):
            continue
        config = copy.deepcopy(run.config)
        parent, leaf = claim.factor.rsplit(".", 1)
        get_path(config, parent)[leaf] = value
        tested = [{**m, **{metric: m[key] for metric, key in claim.recorded_as.items()}} for m in history]
        twins.append(Run(f"{run.name} [{ablation}: its own test]", {
            **run.record, "config": config, "history": tested, "final": tested[-1], "tested_in": run.name,
            "wall_time_s": 0.0, "cpu_time_s": 0.0, "images_seen": 0}))
    return twins


def compare(claim: Claim, ablation: str, runs: list[Run]) -> list[tuple[dict, str | None]]:
    """The claim's ablation against the paper's runs, paired per seed: one row per set-up the runs
    come from (configs that differ in more than the seed, the claim's factor and what it tunes:
    another dataset, more epochs), so that differences from different set-ups are never averaged
    together; each with its set-up's comparable_key (None for a row with no runs), for claim_rows to name."""
    sides = {"paper": claim.paper_value, "ablated": claim.ablations[ablation]}
    contexts = defaultdict(lambda: {"paper": [], "ablated": []})
    for run in runs:
        for side, value in sides.items():
            if factor_value(run, claim) == value:
                contexts[comparable_key(run.config, claim, ignore=("seed",))][side].append(run)
    # A set-up counts for this claim when it holds both sides, or when it was launched for this claim;
    # otherwise a run that only happens to share a factor value (relu's sweep has no dropout) would
    # show up as a missing pair.
    relevant = [(key, c) for key, c in contexts.items()
                if (c["paper"] and c["ablated"]) or any(r.record.get("experiment") == claim.id for r in c["paper"] + c["ablated"])]
    if not relevant:
        found = {side: sum(len(c[side]) for c in contexts.values()) for side in sides}
        return [(judge_pairs(claim, ablation, [], not_run=not_run_reason(claim, ablation, found)), None)]
    return [(judge_pairs(claim, ablation, [context]), key) for key, context in relevant]


def claim_rows(claim: Claim, runs: list[Run]) -> list[dict]:
    """Every ablation of the claim compared (compare). Where the claim's rows come from more than one
    set-up (one ablation's runs from several, or its ablations' from different ones: the depth claim
    from two launches of `sweeps=all` with different epochs), each row names its set-up by the config
    values that set it apart, and the curves keep each set-up's paper runs apart."""
    judged = [pair for ablation in claim.ablations for pair in compare(claim, ablation, runs)]
    keys = list(dict.fromkeys(key for _, key in judged if key is not None))
    if len(keys) > 1:  # a key is its set-up's config as canonical JSON (comparable_key)
        labels = dict(zip(keys, setup_labels([json.loads(key) for key in keys])))
        for row, key in judged:
            if key is not None:
                row["setup"] = labels[key]
    return [row for row, _ in judged]


def not_run_reason(claim: Claim, ablation: str, found: dict) -> str:
    """Why a claim's ablation has no set-up to judge, from how many runs each side had."""
    ablated = f"{claim.factor}={json.dumps(claim.ablations[ablation])}"
    paper = f"the paper's {claim.factor}={json.dumps(claim.paper_value)}"
    if found["ablated"] and found["paper"]:
        return (f"the {runs_text(found['ablated'])} with {ablated} and the {runs_text(found['paper'])} with {paper} "
                "differ in more than the claim's factor and the seed: no pairs")
    if found["ablated"]:
        return f"{runs_text(found['ablated'])} with {ablated}, but none with {paper} in the same set-up to pair them with"
    if found["paper"]:
        recorded = (f"; its ablated side is read from paper runs (every other claim's factor at the paper's value, "
                    f"or launched for this claim) that recorded {', '.join(claim.recorded_as.values())}, as this "
                    "version's runs do, and none of these is one" if claim.recorded_as else "")
        return f"no runs with {ablated} beside the {runs_text(found['paper'])} with {paper}{recorded}"
    return f"no runs with {ablated}, nor with {paper}"


def setup_labels(configs: list[dict], most: int = 4) -> list[str]:
    """For each config, the values of the paths on which the configs differ ("trainer.epochs=2"), the
    first `most` of them in path order, and any later one that tells two labels apart that would
    otherwise be the same (rows and curves are named, and kept apart, by these labels)."""
    flat = [flatten(c) for c in configs]
    differing = differing_paths(flat)

    def values(f: dict, paths: list[str]) -> str:
        return ", ".join(f"{p}={json.dumps(f.get(p), default=str)}" for p in paths)

    shown = differing[:most]
    for path in differing[most:]:
        if len({values(f, shown + [path]) for f in flat}) > len({values(f, shown) for f in flat}):
            shown.append(path)
    more = f", +{len(differing) - len(shown)} more" if len(differing) > len(shown) else ""
    return [values(f, shown) + more for f in flat]


def judge_pairs(claim: Claim, ablation: str, relevant: list[dict], not_run: str = "") -> dict:
    """One row: the paper's and the ablated runs of one set-up (or of none: not run, for the reason
    `not_run`), paired per seed, and the verdict."""
    primary = next(iter(claim.effects))
    pairs, missing, used, tuned, choices = [], [], [], [], []
    for context in relevant:
        used += context["paper"] + context["ablated"]
        chosen = {}
        for side, side_runs in context.items():
            tuned_runs, value, candidates = pick_tuned(side_runs, claim, primary)
            completed = [r for r in tuned_runs if r.status == "completed"]
            choices.append(candidates)
            chosen[side] = {r.seed: r for r in completed}
            if value:
                tuned.append(f"{ablation if side == 'ablated' else 'paper'}: {value}")
        for seed in sorted({r.seed for r in context["paper"] + context["ablated"]}, key=seed_order):
            if seed in chosen["paper"] and seed in chosen["ablated"]:
                pairs.append({"seed": seed, "paper": chosen["paper"][seed], "ablated": chosen["ablated"][seed]})
            else:
                lacking = "paper" if seed not in chosen["paper"] else ablation
                unrecorded = (f", and its paper run did not record {claim.recorded_as[primary]} (this version's do)"
                              if claim.recorded_as and lacking != "paper" else "")
                missing.append(f"missing: claim {claim.id} ablation {ablation} seed {seed} "
                               f"(no completed {lacking} run{unrecorded})")
    paired = [r for p in pairs for r in (p["paper"], p["ablated"])]
    trained = [r for r in paired if "tested_in" not in r.record]  # a ten_crop twin is its paper run: once
    row = {"claim": claim.id, "ablation": ablation, "setup": None, "paper_says": claim.paper_says, "metric": primary,
           "factor": claim.factor, "n": len(pairs), "seeds": [p["seed"] for p in pairs], "missing": missing,
           "tuned": tuned, "used_runs": [r.name for r in used if "tested_in" not in r.record],
           "pairs": [{"seed": p["seed"], "paper": p["paper"].name, "ablated": p["ablated"].name} for p in pairs],
           "metrics": {m: paired_stats(m, effect, pairs) for m, effect in claim.effects.items()},
           "at_chance": [r.name for r in paired if at_chance(r)],
           "diverged": [r.name for r in trained if diverged(r)]}
    unlearned = [p["seed"] for p in pairs if at_chance(p["paper"]) and at_chance(p["ablated"])]
    if pairs and len(unlearned) == len(pairs):  # a difference between two guessers says nothing of the claim
        for stats in row["metrics"].values():
            stats["verdict"], stats["reason"] = "inconclusive", "no pair in which either side learned (all at chance level)"
    constant, lrn_text = lrn_factor_text(claim, [p["paper"] for p in pairs])
    if constant:  # then the runs compare a fixed scale on two layers with none: not what the claim is about
        for stats in row["metrics"].values():
            stats["verdict"], stats["reason"] = "inconclusive", lrn_text
    if not relevant:
        row["verdict"], row["reason"] = "not run", not_run
    elif not pairs:
        row["verdict"], row["reason"] = "inconclusive", "no completed pair (see the missing pairs)"
    else:
        row["verdict"], row["reason"] = row["metrics"][primary]["verdict"], row["metrics"][primary]["reason"]
    if lrn_text and not constant:
        row["reason"] += f"; {lrn_text}"
    versions = code_versions_text(trained)
    if versions:
        row["reason"] += f"; {versions}"
    if row["diverged"]:
        row["reason"] += f"; {len(row['diverged'])} run(s) diverged (a loss that was not finite; see Runs that diverged)"
    if row["at_chance"]:
        row["reason"] += f"; {len(row['at_chance'])} run(s) stayed at chance level (see Runs at chance level)"
    if pairs and claim.tune and max(choices) == 1:  # sweeps=all: one lr for both, where the paper tuned each
        row["reason"] += f"; {', '.join(claim.tune)} not tuned (one value for both sides; the paper tuned it per side)"
    running = sum(r.status == "running" for r in used)
    if claim.tune and max(choices, default=0) > 1 and running:  # they counted as not reached (metric_score)
        row["reason"] += f"; {', '.join(claim.tune)} picked while {running} of its runs were still running"
    return row


def code_versions_text(runs: list[Run]) -> str:
    """Where paired runs come from more than one commit of this code, or from a tree with uncommitted
    changes (each record's `git`): a change of the code that the config does not show (the LRN's factor
    sampling, a kernel's rounding) would be in the differences. "" where all share one clean commit or
    none recorded one (runs read from W&B). `runs`: each trained run once (no ten_crop twins)."""
    commits = sorted({str(r.record["git"]["commit"])[:7] for r in runs
                      if isinstance(r.record.get("git"), dict) and r.record["git"].get("commit")})
    dirty = sum(1 for r in runs if isinstance(r.record.get("git"), dict) and r.record["git"].get("dirty"))
    parts = [f"the paired runs come from {len(commits)} commits ({', '.join(commits)})"] if len(commits) > 1 else []
    if dirty:
        parts.append(f"{dirty} of {len(runs)} paired runs from a tree with uncommitted changes")
    return "; ".join(parts)


LRN_CONSTANT_SPREAD = 0.01  # an LRN whose 1st and 99th percentile factors differ by less, relatively, is a constant


def lrn_factor_text(claim: Claim, paper_runs: list[Run]) -> tuple[bool, str]:
    """For the lrn claim: what the paper runs' LRN layers multiplied their final nets' activations by
    (alexlab.lrn.factor_percentiles), and whether that was a near-constant factor in every layer of
    every run that recorded it (the paper's alpha on unit-variance inputs: 2^-0.75 = 0.5946), in which
    case the pairs do not test normalisation. (False, "") for other claims and runs without factors.
    Factors that are not finite and positive (a diverged net's) make a run's record unreadable here."""
    if claim.factor != "model.lrn":
        return False, ""
    spreads, recorded = [], []  # (p01, p99) of each LRN layer of each recording paper run
    for run in paper_runs:
        final = run.record.get("final") if isinstance(run.record.get("final"), dict) else {}
        layers = sorted({key.split("_factor_")[0] for key in final if "_factor_p" in key})
        found = [(final.get(f"{layer}_factor_p01"), final.get(f"{layer}_factor_p99")) for layer in layers]
        if found and all(is_number(v) and 0 < v < math.inf for pair in found for v in pair):
            spreads += found
            recorded.append(run)
    if not spreads:
        return False, ""
    constant = all(high - low <= LRN_CONSTANT_SPREAD * high for low, high in spreads)
    low, high = min(low for low, _ in spreads), max(high for _, high in spreads)
    where = (f"x{low:.4f} to x{high:.4f}, 1st to 99th percentile over the final nets' activations in "
             f"{len(recorded)} of {len(paper_runs)} paper runs")
    if not constant:
        return False, f"the LRN normalised ({where})"
    model = [r.config.get("model") or {} for r in recorded]
    scaled_down = any(m.get("input_pixel_scale", 255) != 255 for m in model)
    advice = ("; model.lrn_in_pixel_units=true gives the paper's alpha in raw-pixel units"
              if scaled_down and not all(m.get("lrn_in_pixel_units") for m in model) else "")
    return True, (f"the LRN acted as a near-constant factor ({where}), not as a normalisation: the difference "
                  f"measures a fixed scale on two layers' outputs{advice}")


def seed_order(seed) -> tuple:
    """Numbers in order, then anything else a failed run was given (seed=abc) by its text."""
    return (0, seed, "") if is_number(seed) else (1, 0, str(seed))


# ---------------------------------------------------------------- statistics and verdicts

def paired_stats(metric: str, effect, pairs: list[dict]) -> dict:
    ratio = is_ratio(metric)
    diffs, censored, not_numbers, coarse = [], [], [], []
    censored_side = defaultdict(list)  # which run of each censored pair never got there: "paper", "ablated", "both"
    hidden = set()  # the side of zero on which each pair left out as censored lies: see judge
    for pair in pairs:
        paper, ablated, per_epoch = pair_values(metric, pair)
        if per_epoch:
            coarse.append(pair["seed"])
        if paper is None or ablated is None:
            censored.append(pair["seed"])
            censored_side["both" if paper is None and ablated is None else "paper" if paper is None else "ablated"].append(pair["seed"])
            if (paper is None) != (ablated is None):  # a censored count is later than the run's end, so
                hidden.add(+1 if ablated is None else -1)  # beyond the other side's; censored on both: unknown
        elif not (math.isfinite(paper) and math.isfinite(ablated)):  # a record edited by hand, or from W&B
            not_numbers.append(pair["seed"])
        else:
            diffs.append(math.log(ablated / paper) if ratio else ablated - paper)
    n = len(diffs)
    mean = float(np.mean(diffs)) if n else None
    sd = float(np.std(diffs, ddof=1)) if n >= 2 else None
    ci = None
    if sd is not None:
        half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
        ci = (mean - half, mean + half)
    verdict, reason, seeds_needed = judge(metric, effect, n, mean, sd, ci, hidden)
    if censored:
        why = "still improving at its last epoch" if metric == "steps_to_converge" else "threshold never reached"
        sides = ", ".join(f"{'both runs' if side == 'both' else f'the {side} run'}: seeds {seeds}"
                          for side, seeds in censored_side.items())
        reason += f"; {len(censored)} of {len(pairs)} pairs censored ({why}; {sides})"
    if coarse:
        reason += (f"; {len(coarse)} pair(s) read per epoch (their runs' step logs differ, or one has none: "
                   f"seeds {coarse})")
    if not_numbers:
        reason += f"; {len(not_numbers)} of {len(pairs)} pairs left out (a {metric} that is not a finite number, seeds {not_numbers})"
    show = math.exp if ratio else float
    return {"metric": metric, "paper_effect": effect, "n": n, "censored_seeds": censored,
            "mean": None if mean is None else show(mean),
            "ci_low": None if ci is None else show(ci[0]), "ci_high": None if ci is None else show(ci[1]),
            "sd": sd,  # of the differences as analysed: log ratios for ratio metrics
            "differences": diffs, "verdict": verdict, "reason": reason, "seeds_needed": seeds_needed}


SAME_DIFFERENCE = 1e-9  # an sd below this, relative to the mean difference (at least 1), is rounding: 0


def judge(metric: str, effect, n: int, mean, sd, ci, hidden: set = frozenset()) -> tuple[str, str, int | None]:
    """The verdict rules of VERDICT_RULES, on the analysis scale (log for ratios). hidden: the signs of
    the differences of pairs left out as censored on one side (+1: the ablated run never got there, so
    its count, and the difference, is larger than any the pair could show). The CI leaves them out, so
    it may not claim what they could overturn: no "contradicted" (the paper's size ruled out included) where
    they lie on the paper's side, no "reproduced" (nor "larger") where they lie on the other."""
    if n == 0:
        return "inconclusive", "no usable pair", None
    if ci is None:
        return "inconclusive", "need at least 2 seeds", None
    if sd <= SAME_DIFFERENCE * max(1.0, abs(mean)):  # every seed gave the same difference (runs that all
        # predict one class; k more images wrong out of the same set, which float rounding leaves ~1e-15
        # apart): a CI of no width
        return "inconclusive", "every pair differs by the same amount (sd 0): the CI says nothing", None
    direction = paper_direction(metric, effect)
    target = None if effect is None else (math.log(effect) if is_ratio(metric) else effect)
    no_effect = "1" if is_ratio(metric) else "0"
    low, high = ci
    against, towards = -direction in hidden, direction in hidden
    if (direction > 0 and low > 0) or (direction < 0 and high < 0):
        if target is not None and (high < target if direction > 0 else low > target) and not towards:
            # as a CI short of it that holds 0 is (else more evidence for the direction would read better);
            # pairs censored on the other side could only take the effect further from the paper's
            holds = ("" if against else
                     f"the direction holds (the CI excludes {no_effect} on the paper's side), but ")
            return "contradicted", f"{holds}the CI rules out the paper's {fmt(metric, effect)}: a smaller effect", None
        if against:
            return "inconclusive", (f"the CI excludes {no_effect} on the paper's side, but pairs left out as "
                                    "censored lie on the other side"), None
        size = ""
        if target is not None and (low > target if direction > 0 else high < target):
            size = f"; larger than the paper's {fmt(metric, effect)} (the CI lies beyond it)"
        return "reproduced", f"the CI excludes {no_effect} on the paper's side{size}", None
    contradicts = ((direction > 0 and high < 0) or (direction < 0 and low > 0)
                   or target is not None and ((direction > 0 and high < target) or (direction < 0 and low > target)))
    if contradicts and towards:
        return "inconclusive", "the CI is against the paper, but pairs left out as censored lie on the paper's side", None
    if (direction > 0 and high < 0) or (direction < 0 and low > 0):
        return "contradicted", f"the CI excludes {no_effect} on the other side", None
    if target is not None and ((direction > 0 and high < target) or (direction < 0 and low > target)):
        return "contradicted", f"the CI rules out the paper's {fmt(metric, effect)}", None
    size = target if target is not None else mean
    if size == 0:
        return "inconclusive", "no effect observed", None
    seeds_needed = seeds_to_detect(abs(size) / sd if sd > 0 else math.inf)
    basis = "the paper's" if target is not None else "the observed"
    return "inconclusive", f"about {seeds_needed} seeds needed to detect {basis} effect", seeds_needed


def fmt(metric: str, value) -> str:
    if value is None:
        return "> 0 (direction only)"
    return f"×{value:.2f}" if is_ratio(metric) else f"{value:+.2f}"


def measured_text(stats: dict) -> str:
    if stats["mean"] is None:
        return "n/a"
    text = f"{stats['metric']} {fmt(stats['metric'], stats['mean'])}"
    if stats["ci_low"] is not None:
        text += f" [{fmt(stats['metric'], stats['ci_low'])}, {fmt(stats['metric'], stats['ci_high'])}]"
    return text


# ---------------------------------------------------------------- cost

def device_seconds(run: Run) -> tuple[float, float]:
    """(GPU-seconds, CPU-seconds): wall time of runs on cuda, CPU time of runs on the CPU, each times
    the run's data-parallel processes (rank 0 writes the record; every rank runs as long)."""
    processes = run.record.get("processes")
    processes = processes if isinstance(processes, int) and processes > 0 else 1
    if str(run.record.get("device") or "").startswith("cuda"):
        return (run.record.get("wall_time_s") or 0.0) * processes, 0.0
    return 0.0, (run.record.get("cpu_time_s") or 0.0) * processes


def cost_row(label: str, runs: list[Run], shared: int) -> dict:
    gpu_cpu = [device_seconds(r) for r in runs]
    return {"claim": label, "runs": len(runs), "shared": shared,
            "wall_time_s": sum(r.record.get("wall_time_s") or 0.0 for r in runs),
            "cpu_time_s": sum(r.record.get("cpu_time_s") or 0.0 for r in runs),
            "gpu_s": sum(g for g, _ in gpu_cpu), "cpu_device_s": sum(c for _, c in gpu_cpu),
            "images_seen": sum(r.record.get("images_seen") or 0 for r in runs)}


def cost_table(rows: list[dict], runs: list[Run]) -> list[dict]:
    by_name = {r.name: r for r in runs}
    used = defaultdict(set)
    for row in rows:
        used[row["claim"]].update(row["used_runs"])
    claims_per_run = Counter(name for names in used.values() for name in names)
    table = [cost_row(claim, [by_name[n] for n in sorted(names)], sum(claims_per_run[n] > 1 for n in names))
             for claim, names in used.items() if names]
    return table + [cost_row("all runs (each once)", runs, 0)]


# ---------------------------------------------------------------- plots

def band_by_epoch(runs: list[Run]) -> tuple[list, list, list, list]:
    """Epochs, and the mean, min and max over runs of validation top-1 error at each epoch."""
    per_epoch = defaultdict(list)
    for run in runs:
        for m in run.record.get("history") or []:
            per_epoch[m["epoch"]].append(m["val_top1_err"])
    epochs = sorted(per_epoch)
    return (epochs, [np.mean(per_epoch[e]) for e in epochs], [min(per_epoch[e]) for e in epochs],
            [max(per_epoch[e]) for e in epochs])


def plot_curves(claim: str, variants: dict[str, list[Run]], path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, runs in variants.items():
        epochs, mean, low, high = band_by_epoch(runs)
        line, = ax.plot(epochs, mean, marker="o", label=f"{label} ({len(runs)} seeds)")
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation top-1 error (%)", title=f"{claim}: mean over seeds, min-max band")
    ax.legend()
    atomic_savefig(fig, path, dpi=100, bbox_inches="tight")


SETUP_LABEL_WIDTH = 16  # characters a line under a bar of the deltas plot (7 pt; a bar is 1.6 inches)


def setup_label_lines(setup: str | None) -> list[str]:
    """A row's set-up ("data.name=\"fashion_mnist\", trainer.epochs=2") as lines as narrow as the bars:
    a line per value, a long one split after its "=" (beside each other, long labels overlapped)."""
    lines = []
    for item in setup.split(", ") if setup else []:
        key, sep, value = item.partition("=")
        lines += [key + sep, value] if len(item) > SETUP_LABEL_WIDTH and sep else [item]
    return lines


def plot_deltas(rows: list[dict], path: Path) -> Figure:
    """Measured primary effect with its CI beside the paper's number; ratios on their own log panel."""
    measured = [r for r in rows if r["metrics"][r["metric"]]["mean"] is not None]
    panels = [p for p in ([r for r in measured if not is_ratio(r["metric"])],
                          [r for r in measured if is_ratio(r["metric"])]) if p]
    fig = Figure(figsize=(4 + 1.6 * len(measured), 4))
    # each panel as wide as its bars need: with equal halves, ten labels crowded into one half and overlapped
    widths = [max(len(panel), 2) for panel in panels]
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0], panels):
        ratio = is_ratio(panel[0]["metric"])
        base = 1.0 if ratio else 0.0
        x = np.arange(len(panel))
        stats = [r["metrics"][r["metric"]] for r in panel]
        means = np.array([s["mean"] for s in stats])
        errors = np.array([[s["mean"] - s["ci_low"], s["ci_high"] - s["mean"]] if s["ci_low"] is not None
                           else [0.0, 0.0] for s in stats]).T
        ax.bar(x, means - base, bottom=base, yerr=errors, capsize=4, color="tab:blue", label="measured (95% CI)")
        paper = [(i, s["paper_effect"]) for i, s in enumerate(stats) if s["paper_effect"] is not None]
        if paper:
            ax.scatter(*zip(*paper), marker="D", color="tab:red", zorder=3, label="paper")
        ax.axhline(base, color="black", linewidth=0.8)
        if ratio:
            ax.set_yscale("log")
        ax.set_xticks(x, [f"{r['claim']}\n{r['ablation']}\n{r['metric']}" + "".join(f"\n{line}" for line in
                                                                               setup_label_lines(r.get("setup")))
                          for r in panel], fontsize=7)
        ax.set_ylabel("ratio ablated / paper" if ratio else "ablated - paper (points)")
        ax.legend(fontsize=7)
    atomic_savefig(fig, path, dpi=100, bbox_inches="tight")
    return fig


def plot_relu_fig1(variants: dict[str, list[Run]], path: Path) -> None:
    """The paper's figure 1: training error against iterations, relu solid, tanh dashed."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for (label, runs), style, color in zip(variants.items(), ("-", "--"), ("tab:blue", "tab:orange")):
        for i, run in enumerate(runs):
            points = [(s["step"], s["train_top1_err"]) for s in run.record.get("steps") or []] or \
                     [(m["steps"], m["train_top1_err"]) for m in run.record.get("history") or []]
            ax.plot(*zip(*points), style, color=color, alpha=0.7, label=label if i == 0 else None)
    ax.axhline(TRAIN_ERR_THRESHOLD, color="black", linewidth=0.8)
    ax.set(xlabel="iterations (optimizer steps)", ylabel="training error (%)", title="relu vs tanh (figure 1)")
    ax.legend()
    atomic_savefig(fig, path, dpi=100, bbox_inches="tight")


def write_plots(rows: list[dict], runs: list[Run], out_dir: Path) -> list[Path]:
    by_name = {r.name: r for r in runs}
    variants = defaultdict(dict)  # claim -> variant label -> runs (shared baselines once)
    relu_sides = {"paper": {}, "ablated": {}}  # the relu claim's runs of every set-up, by side: figure 1
    for row in rows:
        for pair in row["pairs"]:
            for side, label in (("paper", "paper"), ("ablated", row["ablation"])):
                variants[row["claim"]].setdefault(in_setup(row, label), {})[pair[side]] = by_name[pair[side]]
                if row["claim"] == "relu":
                    relu_sides[side][pair[side]] = by_name[pair[side]]
    written = []
    for claim, labels in variants.items():
        written.append(out_dir / f"curves_{claim}.png")
        plot_curves(claim, {label: list(rs.values()) for label, rs in labels.items()}, written[-1])
    if any(r["metrics"][r["metric"]]["mean"] is not None for r in rows):
        written.append(out_dir / "deltas.png")
        plot_deltas(rows, written[-1])
    if "relu" in variants:
        written.append(out_dir / "relu_fig1.png")
        plot_relu_fig1({"relu": list(relu_sides["paper"].values()), "tanh": list(relu_sides["ablated"].values())},
                       written[-1])
    return written


# ---------------------------------------------------------------- the report

def in_setup(row: dict, text: str) -> str:
    """text, followed by the row's set-up where the runs came from several."""
    return text + (f" ({row['setup']})" if row.get("setup") else "")


def row_name(row: dict) -> str:
    return in_setup(row, f"{row['claim']}: {row['ablation']}")


def main_table(rows: list[dict]) -> list[str]:
    lines = ["| claim | paper says | measured (mean of paired differences, 95% CI) | seeds | verdict |",
             "|---|---|---|---|---|"]
    for row in rows:
        stats = row["metrics"][row["metric"]]
        seeds = f"{stats['n']}" + (f" (+{len(stats['censored_seeds'])} censored)" if stats["censored_seeds"] else "")
        lines.append(f"| {row_name(row)} | {row['paper_says']} | {measured_text(stats)} "
                     f"| {seeds} | {row['verdict']}: {row['reason']} |")
    return lines


def setups(runs: list[Run]) -> list[tuple[str, int]]:
    """What the completed runs trained on: each distinct set-up, in order, with its count of runs
    (repeats not counted: give the runs without them, drop_repeats)."""
    counts = Counter()
    for run in runs:
        if run.status != "completed":
            continue
        data, model, trainer = (run.config.get(key) or {} for key in ("data", "model", "trainer"))
        # as the run counted them; runs before it recorded that: a subset's size, or a synthetic set's
        images = run.record.get("train_images") or data.get("train_subset") or data.get("train_size")
        counts[f"{data.get('name', '?')} ({f'{images:,} training images' if images else 'all training images'}), "
               f"model `{model.get('name', '?')}` at {model.get('input_size', '?')} px, "
               f"{trainer.get('epochs', '?')} epochs"] += 1
    return sorted(counts.items())


def runs_text(n: int) -> str:
    return f"{n} run{'' if n == 1 else 's'}"


def setup_lines(trained_on: list[tuple[str, int]]) -> list[str]:
    return [f"- {setup}: {runs_text(n)}" for setup, n in trained_on]


def markdown(rows, table, problems, missing, costs, plots, sources, n_runs, trained_on) -> str:
    lines = ["# AlexNet claims: report", "",
             f"{n_runs} runs read from: {', '.join(sources)}. Problem runs are listed below and never averaged in.",
             "", "## What the runs trained on", "",
             "The paper's claims are about ImageNet (1.2 million training images, 90 epochs); a verdict "
             "below says what these runs show on their own set-up:", "", *(setup_lines(trained_on) or ["none"]),
             "", "## Claims", "", *table, "", "## Verdict rules", "", VERDICT_RULES, "",
             "## Metrics", "", *[f"- `{name}`: {text}" for name, text in METRICS.items()], "",
             "## Detail per metric", "",
             "| claim | ablation | metric | paper | pairs | mean | sd | 95% CI | verdict | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for metric, s in row["metrics"].items():
            ci = "" if s["ci_low"] is None else f"[{fmt(metric, s['ci_low'])}, {fmt(metric, s['ci_high'])}]"
            mean = "" if s["mean"] is None else fmt(metric, s["mean"])
            sd = "" if s["sd"] is None else f"{s['sd']:.3f}" + (" (log)" if is_ratio(metric) else "")
            verdict = row["verdict"] if row["verdict"] == "not run" else s["verdict"]
            notes = "; ".join([s["reason"] if row["n"] else row["reason"], *row["tuned"]])
            lines.append(f"| {row['claim']} | {in_setup(row, row['ablation'])} | {metric} "
                         f"| {fmt(metric, s['paper_effect'])} | {s['n']} | {mean} | {sd} | {ci} | {verdict} | {notes} |")
    lines += ["", "## Problem runs", ""]
    lines += [f"- `{p['run']}`: {p['status']}" + (f": {p['error']}" if p["error"] else "") for p in problems] or ["none"]
    chance = sorted({name for row in rows for name in row.get("at_chance", [])})
    lines += ["", "## Runs at chance level", "",
              f"Completed runs whose final validation error is within {CHANCE_MARGIN:g} point of guessing: they "
              "did not learn. They stay in the pairs (not learning can be what an ablation does), but a mean "
              "over seeds that includes them says more about that seed than about the claim.", "",
              *([f"- `{name}`" for name in chance] or ["none"])]
    lost = sorted({name for row in rows for name in row.get("diverged", [])})
    lines += ["", "## Runs that diverged", "",
              "Completed runs whose training or validation loss was not finite at some epoch: they stay in the "
              "pairs as runs at chance level do (a learning rate too high for an ablated net is an effect too).",
              "", *([f"- `{name}`" for name in lost] or ["none"])]
    lines += ["", "## Missing pairs", "", *([f"- {m}" for m in missing] or ["none"]), "",
              "## Cost", "",
              "Runs a claim used: every run in its paired set-ups, tuning grid and failed runs included. "
              "Baseline runs shared between claims (the `all` sweep) count in each claim that uses them; "
              "`shared` says how many. Device-seconds: wall time of cuda runs (GPU-s), CPU time of CPU runs, each "
              "times the run's data-parallel processes. `CPU s`: the training process's CPU time (rank 0) "
              "with that of its DataLoader workers (not of data.decode=gpu_process's decoder processes).",
              "", "| claim | runs | shared | wall s | CPU s | GPU-s | CPU-s (CPU runs) | images |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['runs']} | {c['shared']} | {c['wall_time_s']:.0f} | {c['cpu_time_s']:.0f} "
              f"| {c['gpu_s']:.0f} | {c['cpu_device_s']:.0f} | {c['images_seen']} |" for c in costs]
    lines += ["", "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots]]
    return "\n".join(lines) + "\n"


def report_runs(runs: list[Run], problems: list[dict], out_dir: Path, sources: list[str]) -> dict:
    """Judge every claim on these runs and write report.md and the plots into out_dir."""
    problems = list(problems) + [problem(r.name, r.status, r.record.get("error"))
                                 for r in runs if r.status != "completed"]
    analysed, repeats = drop_repeats(runs)
    problems += repeats
    twins = {claim.id: tested_twins(claim, analysed) for claim in CLAIMS.values()}
    rows = [row for claim in CLAIMS.values() for row in claim_rows(claim, analysed + twins[claim.id])]
    missing = [m for row in rows for m in row["missing"]]
    costs = cost_table(rows, runs)  # repeats cost time too: they count in the total
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(rows, analysed + [twin for claim_twins in twins.values() for twin in claim_twins], out_dir)
    report_path = out_dir / "report.md"
    trained_on, table = setups(analysed), main_table(rows)
    atomic_write_bytes(markdown(rows, table, problems, missing, costs, plots, sources, len(runs), trained_on).encode(),
                       report_path)
    # where --log-to-wandb puts the report run: the runs' own project, in their most common group
    logger = next((r.config["logger"] for r in runs if isinstance(r.config.get("logger"), dict)), {})
    experiments = Counter(str(r.record.get("experiment")) for r in runs)
    return {"rows": rows, "problems": problems, "missing": missing, "cost": costs, "plots": plots,
            "report": report_path, "table": table, "setups": trained_on,
            "experiment": experiments.most_common(1)[0][0] if runs else None,
            "wandb_project": (logger.get("entity"), logger.get("project") or "alexlab")}


def build_report(run_dirs: list[Path], out_dir: Path) -> dict:
    runs, problems = {}, {}  # by resolved path: nested or repeated dirs read each run once
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise ReportError(f"{run_dir} is not a directory")
        found, trouble = load_runs(run_dir)
        unreadable = [p for p in trouble if p["status"] == "unreadable"]
        if not found and unreadable:
            raise ReportError(f"no readable {RESULTS_NAME} under {run_dir}: {len(unreadable)} unreadable, "
                              f"the first {unreadable[0]['run']} ({unreadable[0]['error']})")
        if not found:
            raise ReportError(f"no {RESULTS_NAME} under {run_dir}")
        runs.update((Path(r.name).resolve(), r) for r in found)
        problems.update((Path(p["run"]).resolve(), p) for p in trouble)
    return report_runs(list(runs.values()), list(problems.values()), Path(out_dir), [str(d) for d in run_dirs])


# ---------------------------------------------------------------- Weights & Biases

WANDB_STATES = {"finished": "completed", "running": "running", "crashed": "failed", "failed": "failed",
                "killed": "interrupted"}


def wandb_status(state: str, summary: dict) -> str:
    """A W&B run's status as results.json would say it. The summary's is the last Tracker.finish's
    (it tells interrupted from failed), but a completed run continued with more epochs keeps that
    "completed" while it runs again, or once it was killed: W&B's state (running, crashed) wins then."""
    if state in ("running", "crashed"):
        return WANDB_STATES[state]
    return summary.get("status") or WANDB_STATES.get(state, state)


def load_wandb_runs(path: str, group: str) -> list[Run]:
    """The same records rebuilt from W&B: config, per-epoch history, summary (no per-step log there)."""
    try:
        import wandb
    except ImportError as err:
        raise ReportError(f"--wandb needs the wandb package ({err})") from err
    try:
        found = list(wandb.Api().runs(path, filters={"group": group}))
    except Exception as err:  # noqa: BLE001 - no API key, no network, no such project: one line, not a traceback
        raise ReportError(f"--wandb {path}: W&B could not list the runs: "
                          f"{type(err).__name__}: {first_line(err)}") from err
    runs = []
    for wb_run in found:
        history = [m for m in wb_run.history(pandas=False) if m.get("val_top1_err") is not None]
        summary = wb_run.summary_metrics or {}
        record = {"status": wandb_status(wb_run.state, summary),
                  "error": None, "experiment": group, "config": dict(wb_run.config), "history": history,
                  "steps": [], "final": history[-1] if history else None, "started_at": wb_run.created_at,
                  # runs recorded before their summary held these: W&B's own wall time, and a guess at the device
                  "wall_time_s": summary.get("wall_time_s", summary.get("_runtime")),
                  "cpu_time_s": summary.get("cpu_time_s"), "processes": summary.get("processes"),
                  "device": summary.get("device") or ("cuda" if (wb_run.metadata or {}).get("gpu") else "cpu"),
                  "images_seen": history[-1].get("images_seen", 0) if history else 0}
        runs.append(Run("/".join(wb_run.path), record))
    return runs


def log_to_wandb(result: dict, project: str, entity: str | None, group: str, out_dir: Path) -> None:
    """The table, what the runs trained on and the plots as a report run in the runs' group."""
    import wandb
    run = wandb.init(project=project, entity=entity, group=group, job_type="report", name=f"report {group}",
                     dir=str(out_dir), mode=os.environ.get("WANDB_MODE", "offline"))
    columns = ["claim", "paper says", "measured", "seeds", "verdict"]
    data = [[row_name(r), r["paper_says"], measured_text(r["metrics"][r["metric"]]),
             r["n"], f"{r['verdict']}: {r['reason']}"] for r in result["rows"]]
    trained_on = [[setup, runs_text(n)] for setup, n in result["setups"]]
    run.log({"claims": wandb.Table(columns=columns, data=data),
             "trained_on": wandb.Table(columns=["set-up", "runs"], data=trained_on),
             **{p.stem: wandb.Image(str(p)) for p in result["plots"]}})
    run.finish()
