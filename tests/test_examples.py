"""The example scripts: the main job on the shipped checkpoints, its distributed twin, the toy demo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CHECKPOINTS = EXAMPLES / "checkpoints"


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=environment, timeout=300, check=False)


def test_main_job_pipeline_and_drop_in(tmp_path, capsys) -> None:
    import sample

    sample.main(["--batch-size", "6", "--steps", "4", "--out", str(tmp_path / "a.png")])
    printed = capsys.readouterr().out
    assert "MomentMatchingGibbsPipeline" in printed and "4 UNet forward passes" in printed
    assert Image.open(tmp_path / "a.png").size[0] >= 8 * 3
    sample.main(
        [
            "--mode",
            "drop-in",
            "--gibbs-sweeps",
            "2",
            "--batch-size",
            "4",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "b.png"),
        ]
    )
    printed = capsys.readouterr().out
    assert "DDPMPipeline + MMGibbsScheduler" in printed and "6 UNet forward passes" in printed
    sample.main(["--covariance", "full", "--batch-size", "2", "--steps", "2", "--out", str(tmp_path / "c.png")])
    assert "2 UNet forward passes, 128 backward passes" in capsys.readouterr().out


def test_main_job_refuses_jacobian_covariance_in_drop_in_mode(tmp_path, capsys) -> None:
    """Refused while parsing the command line, before the model is loaded (it used to fail in the first step)."""
    import sample

    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--mode", "drop-in", "--covariance", "diagonal", "--batch-size", "2", "--steps", "2"])
    assert exit_info.value.code == 2
    assert "--covariance diagonal needs the model's Jacobian" in capsys.readouterr().err


def test_main_job_refuses_calibrated_covariance_without_a_table(tmp_path, capsys) -> None:
    """A folder saved without a calibrated table: refused before the model is loaded (it used to sample and fail
    with a traceback from inside the kernel)."""
    import sample

    with pytest.raises(SystemExit) as exit_info:
        sample.main(
            ["--covariance", "calibrated", "--batch-size", "2", "--steps", "2", "--out", str(tmp_path / "a.png")]
        )
    assert exit_info.value.code == 2
    assert "--covariance calibrated needs a calibrated covariance table" in capsys.readouterr().err


def test_calibrate_then_sample_from_the_command_line(tmp_path, capsys) -> None:
    """examples/calibrate.py on the digits DDPM (2 step counts, the train digits), then the main job samples the saved
    folder with the table: the saved pipeline (custom-class ``model_index.json``) loads without remote code and the
    table travels with it."""
    import calibrate
    import sample

    out = tmp_path / "calibrated"
    calibrate.main(["--out", str(out), "--steps", "2", "4", "--digits", "--clusters", "2", "--rank", "4"])
    printed = capsys.readouterr().out
    assert "4 levels (steps [2, 4])" in printed and "5600 single-sample forwards" in printed
    argv = ["--model", str(out), "--covariance", "calibrated", "--eta", "0", "--steps", "4"]
    sample.main([*argv, "--batch-size", "3", "--out", str(tmp_path / "a.png")])
    printed = capsys.readouterr().out
    assert "covariance=calibrated" in printed and "4 UNet forward passes, 0 backward passes" in printed


def _free_port() -> int:
    """A port nothing listens on now (a fixed one collides with a lingering or parallel run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # a subprocess run of an example script end to end
def test_distributed_job_gathers_each_process_slice(tmp_path) -> None:
    """Three processes, two samples: process k samples its slice with seed 5 + k, the main process gathers them in
    order; the third process gets none (fewer samples than processes) and the gather still works (it used to call
    the sampler with batch_size=0 and fail)."""
    out, array = tmp_path / "grid.png", tmp_path / "images.npy"
    result = _run(
        [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()),
            "examples/distributed_sample.py", "--batch-size", "2", "--steps", "3", "--seed", "5",
            "--out", str(out), "--save-array", str(array),
        ]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(2 samples from 3 processes" in result.stdout and out.exists()
    assert "process 2: 0 samples" in result.stdout
    gathered = np.load(array)
    import sample

    args = sample.parse_args(["--steps", "3"])
    sampler = sample.build_sampler(sample.load_pipeline(args.model), "pipeline", sample.scheduler_settings(args))
    sampler.set_progress_bar_config(disable=True)
    expected = np.concatenate([sample.sample(sampler, args, 1, seed)[0] for seed in (5, 6)])
    assert gathered.shape == (2, 8, 8, 1)
    assert np.abs(gathered.astype(int) - expected.astype(int)).max() <= 1  # same slices, same seeds


@pytest.mark.slow  # a subprocess run of an example script end to end
def test_toy_demo_writes_its_table_and_figure(tmp_path) -> None:
    result = _run(
        [
            sys.executable,
            "examples/toy_mog.py",
            "--num-samples",
            "300",
            "--sweeps",
            "3",
            "--out",
            str(tmp_path / "t.png"),
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("clean (floor)", "Langevin on p~", "exact-posterior Gibbs", "MMGibbs full", "MMGibbs isotropic"):
        assert row in result.stdout
    assert (tmp_path / "t.png").exists()


def test_shipped_checkpoints_load() -> None:
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(CHECKPOINTS / "digits-ddpm")
    assert any("Attn" in type(b).__name__ for b in pipe.unet.down_blocks)
    assert pipe.scheduler.config.num_train_timesteps == 1000 and pipe.scheduler.config.prediction_type == "epsilon"
    assert torch.isfinite(next(pipe.unet.parameters())).all()


@pytest.mark.slow  # a subprocess run of an example script end to end
def test_benchmark_quick_run_prints_measured_tables(tmp_path) -> None:
    """The benchmark's smoke mode end to end: cached results, the report and the sample grids."""
    out = tmp_path / "bench"
    args = [sys.executable, "examples/benchmark.py", "--quick", "--threads", "1", "--out-dir", str(out)]
    result = _run([*args, "--section", "toy"])
    assert result.returncode == 0, result.stderr[-2000:]
    report = (out / "report_toy.md").read_text()
    for row in ("| DPM-Solver++ (2M) | 20 | 20 |", "| MMGibbs ancestral, isotropic | 20 | 20 |", "| 0.3 | 10 |"):
        assert row in report
    assert "nan ± nan" not in report
