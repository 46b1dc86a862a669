"""Device and precision names: no silent CUDA fallback, one clear line when CUDA is asked for and absent."""

import pytest
import torch
from typer.testing import CliRunner

from geoscout.cli import app
from geoscout.device import resolve_device, resolve_precision
from geoscout.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


@no_cuda
def test_extract_device_cuda_without_cuda_exits_1_with_one_clear_line(synth_master, tmp_path):
    done = CliRunner().invoke(app, ["extract", str(synth_master), str(tmp_path / "store"), "-b", "tiny-clip",
                                    "--device", "cuda"])
    assert done.exit_code == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: --device cuda: no usable CUDA device here") and "--device cpu" in done.stderr
    assert not (tmp_path / "store").exists()  # nothing was started


@no_cuda
def test_a_torchrun_process_without_a_gpu_stops_unless_the_cpu_is_asked_for():
    with pytest.raises(ConfigError, match="local rank 1 found no usable CUDA device; pass --device cpu"):
        resolve_device("auto", local_rank=1, world_size=2)
    assert resolve_device("cpu", local_rank=1, world_size=2).type == "cpu"
    assert resolve_device("auto", local_rank=0, world_size=1).type == "cpu"


def test_precision_names():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("BF16", cpu) == "bf16"
    assert resolve_precision("fp16", cpu) == "fp16"
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", cpu)
