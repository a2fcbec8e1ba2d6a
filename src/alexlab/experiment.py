"""What makes two runs the same experiment: their resolved configs, less the paths that only say where
or how a run was executed or logged. The report pairs runs by it (alexlab.report), and a run resumes
from its directory's checkpoint only if that checkpoint was written under the same (alexlab.train)."""
from __future__ import annotations

import copy
import json

# Config paths that say where or how a run was executed or logged, not what was trained: two runs that
# differ only in these are the same experiment. The speed switches are among them: each computes the
# same function with the same parameters (up to rounding, as on another device).
SPEED_SWITCHES = ("model.lrn_impl", "model.pool_in_lrn", "model.grouped_conv", "model.conv1_impl",
                  "trainer.compile", "trainer.channels_last")
NOT_THE_EXPERIMENT = ("experiment", "logger", "ablation", "sweeps", "device", "resume", "data.root",
                      "data.cache_dir", "data.download", "data.workers", "trainer.threads",
                      "trainer.log_every_steps", "eval.batch_size", *SPEED_SWITCHES)


def without(config: dict, paths) -> dict:
    stripped = copy.deepcopy(config)
    for path in paths:
        *parents, last = path.split(".")
        node = stripped
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return stripped


def flatten(config, prefix: str = "") -> dict:
    """{"a.b": value} for every leaf of nested dicts (lists are leaves)."""
    if not isinstance(config, dict):
        return {prefix: config}
    return {path: value for key, node in config.items()
            for path, value in flatten(node, f"{prefix}.{key}" if prefix else str(key)).items()}


def differing_paths(flat: list[dict]) -> list[str]:
    """The leaf paths, sorted, whose values are not the same in all the flattened configs (`flatten`; a path
    one lacks counts)."""
    paths = sorted({p for f in flat for p in f})
    return [p for p in paths if len({json.dumps(f.get(p), sort_keys=True, default=str) for f in flat}) > 1]
