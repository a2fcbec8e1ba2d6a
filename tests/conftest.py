import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (the fused LRN, the GPU resize) run in Triton's numpy interpreter on a CPU; the
    # variable must be set before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

requires_fashion = pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                      reason="Debian's dataset-fashion-mnist is not installed")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def skip_without_nvimgcodec() -> None:
    """For data.jpeg_decoder=nvimgcodec: imported as the workbench imports it (its JPEG extensions only)."""
    from alexlab.data.nvimgcodec_jpeg import import_nvimgcodec
    from alexlab.errors import ConfigError
    try:
        import_nvimgcodec()
    except ConfigError:
        pytest.skip("nvImageCodec is not installed (pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg)")


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def model_cfg(preset: str = "alexnet", channels: int = 3, **changes) -> dict:
    """A model preset as the plain dict the builder receives after Hydra resolved it."""
    cfg = compose_cfg(f"model={preset}", "data=synthetic", f"data.channels={channels}")
    plain = OmegaConf.to_container(cfg.model, resolve=True)
    plain["input_pixel_scale"] = 255.0  # the paper's LRN constants as printed (synthetic data's pixel_scale is 1)
    plain.update(changes)
    return plain


def run_cli(*args: str, cwd: Path, timeout: int = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python src/run.py ARGS` as a user would, outputs under `cwd`."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               HOME=str(cwd))  # keeps the stats cache and W&B settings inside the test dir
    for key, value in (env_extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, str(ROOT / "src" / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# The `slurm` tests talk to a real cluster: tests/slurm/cluster.sh start (state in ALEXLAB_SLURM_DIR).
SLURM_DIR = Path(os.environ.get("ALEXLAB_SLURM_DIR", "/tmp/alexlab-slurm"))


@pytest.fixture(scope="session")
def slurm_env() -> dict:
    """The environment that reaches the test cluster (SLURM_CONF); skips the test when none runs."""
    conf = os.environ.get("SLURM_CONF") or str(SLURM_DIR / "etc" / "slurm.conf")
    env = dict(os.environ, SLURM_CONF=conf)
    try:
        up = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        up = None
    if not Path(conf).is_file() or up is None or up.returncode != 0 or not up.stdout.strip():
        pytest.skip("no SLURM cluster running: start one with tests/slurm/cluster.sh start")
    return {"SLURM_CONF": conf}
