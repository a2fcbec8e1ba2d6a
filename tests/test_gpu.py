"""GPU-only checks: skipped without CUDA."""
import pytest
import torch
from torch import nn

from alexlab.lrn import LocalResponseNorm
from conftest import requires_cuda, requires_fashion, run_cli

pytestmark = requires_cuda


def test_lrn_on_the_paper_shape_matches_pytorch_in_fp32_and_bf16():
    x = torch.rand(32, 96, 55, 55, device="cuda") * 20
    reference = nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)(x)
    torch.testing.assert_close(LocalResponseNorm()(x), reference, rtol=1e-5, atol=1e-5)
    ours_bf16 = LocalResponseNorm()(x.bfloat16()).float()
    torch.testing.assert_close(ours_bf16, reference, rtol=2e-2, atol=2e-2)


@requires_fashion
@pytest.mark.parametrize("mode", ["true", "reduce-overhead"])  # reduce-overhead: CUDA graphs too
def test_tiny_run_on_cuda_with_compile(tmp_path, mode):
    proc = run_cli("scale=tiny", "logger=none", "device=cuda", f"trainer.compile={mode}", "hydra.run.dir=run",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_training_steps_queue_without_waiting_for_the_gpu():
    """Batches from GPU memory, augmentation and the trainer's step, queued behind a 1 s GPU sleep:
    the host must be done long before the GPU (no .item(), no copy from pageable memory)."""
    import bench
    check = bench.host_time_while_gpu_busy(torch.device("cuda"))
    assert check["ok"], check
