"""Prepare ImageNet once: `python src/prepare.py data.root=DIR [data.* overrides]`.

The same config and overrides as `src/run.py` (data=imagenet is implied): decodes every file to
find unreadable ones, writes the file index and the training set's mean image and RGB PCA (see
alexlab/data/imagenet.py). Run again after an interruption: it continues where it stopped.
Exit status 2 with one line for bad input or unreadable files (unless data.on_bad_file=skip).
"""
import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from alexlab.data.imagenet import prepare
from alexlab.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


USAGE = "usage: python src/prepare.py data.root=DIR [data.* overrides]"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    overrides = argv if any(a.startswith("data=") for a in argv) else ["data=imagenet", *argv]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except HydraException as err:  # an argument that is not key=value, a key the config lacks
        print(f"error: {str(err).strip().splitlines()[0]}\n{USAGE}", file=sys.stderr, flush=True)
        return 2
    try:
        if cfg.data.name != "imagenet":
            raise ConfigError(f"prepare is for data=imagenet, got data={cfg.data.name}")
        out = prepare(cfg.data, cfg.data.cache_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except OSError as err:  # a full disk, a folder it may not write
        print(f"error: cannot write the prepared files: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue where it stopped", file=sys.stderr, flush=True)
        return 130
    print(f"prepared: {out}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
