"""The example scripts: the main job on the shipped checkpoints, its distributed twin, the toy demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from background import result as background_run
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CHECKPOINTS = EXAMPLES / "checkpoints"


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


def test_calibrate_then_sample_a_text_to_image_model_from_the_command_line(tmp_path, capsys) -> None:
    """examples/calibrate.py on a saved tiny Stable Diffusion folder for two prompts at guidance 3 (its own samples,
    drawn with its own DDIM under that guidance), stationary table; the saved folder then samples one prompt with
    the table at that guidance."""
    import calibrate
    import sample
    from tiny_pipelines import tiny_stable_diffusion_pipeline

    tiny_stable_diffusion_pipeline().save_pretrained(tmp_path / "sd")
    out = tmp_path / "calibrated"
    argv = ["--model", str(tmp_path / "sd"), "--out", str(out), "--prompt", "a cat", "a dog", "--guidance-scale", "3"]
    argv += ["--num-samples", "8", "--sampler-steps", "2", "--steps", "2", "--clusters", "1"]
    calibrate.main([*argv, "--covariance", "calibrated_stationary", "--table-dtype", "float16"])
    printed = capsys.readouterr().out
    assert "2 levels (steps [2]), 1 clusters, stationary" in printed
    assert "prompts:  2 (4 samples each), guidance_scale 3.0" in printed and "16 to draw own samples" in printed
    argv = ["--model", str(out), "--covariance", "calibrated_stationary", "--eta", "0", "--steps", "2"]
    sample.main(
        [*argv, "--prompt", "a cat", "--guidance-scale", "3", "--batch-size", "2", "--out", str(tmp_path / "a.png")]
    )
    printed = capsys.readouterr().out
    assert "covariance=calibrated_stationary" in printed and "2 UNet forward passes" in printed


def test_calibrate_then_sample_a_class_conditional_model_from_the_command_line(tmp_path, capsys) -> None:
    """examples/calibrate.py on a saved tiny DiT folder for two classes at guidance 2 (own samples, the host's DDIM),
    then sample.py over the saved folder with --class-labels at that guidance (the labels in turn)."""
    import calibrate
    import sample
    from tiny_dit import tiny_dit_pipeline

    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    out = tmp_path / "calibrated"
    argv = ["--model", str(tmp_path / "dit"), "--out", str(out), "--class-labels", "1", "3", "--guidance-scale", "2"]
    calibrate.main(
        [*argv, "--num-samples", "4", "--sampler-steps", "2", "--steps", "2", "--clusters", "1", "--rank", "2"]
    )
    assert "classes:  2 (2 samples each), guidance_scale 2.0" in capsys.readouterr().out
    argv = [
        "--model",
        str(out),
        "--covariance",
        "calibrated",
        "--eta",
        "0",
        "--steps",
        "2",
        "--class-labels",
        "1",
        "3",
    ]
    sample.main([*argv, "--guidance-scale", "2", "--batch-size", "3", "--out", str(tmp_path / "a.png")])
    printed = capsys.readouterr().out
    assert "covariance=calibrated" in printed and "wrote:" in printed and "(3 samples)" in printed


@pytest.mark.slow  # a subprocess run of an example script end to end
@pytest.mark.background("distributed-job")
def test_distributed_job_gathers_each_process_slice() -> None:
    """Three processes, two samples: process k samples its slice with seed 5 + k, the main process gathers them in
    order; the third process gets none (fewer samples than processes) and the gather still works (it used to call
    the sampler with batch_size=0 and fail). The launch (``background.RUNS["distributed-job"]``: accelerate launch,
    3 processes, ``--batch-size 2 --steps 3 --seed 5``) runs beside the other tests."""
    result, folder = background_run("distributed-job")
    out, array = folder / "grid.png", folder / "images.npy"
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
@pytest.mark.background("toy-demo")
def test_toy_demo_writes_its_table_and_figure() -> None:
    """``examples/toy_mog.py --num-samples 300 --sweeps 3`` (``background.RUNS["toy-demo"]``)."""
    result, folder = background_run("toy-demo")
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("clean (floor)", "Langevin on p~", "exact-posterior Gibbs", "MMGibbs full", "MMGibbs isotropic"):
        assert row in result.stdout
    assert (folder / "t.png").exists()


def test_shipped_checkpoints_load() -> None:
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(CHECKPOINTS / "digits-ddpm")
    assert any("Attn" in type(b).__name__ for b in pipe.unet.down_blocks)
    assert pipe.scheduler.config.num_train_timesteps == 1000 and pipe.scheduler.config.prediction_type == "epsilon"
    assert torch.isfinite(next(pipe.unet.parameters())).all()


@pytest.mark.slow  # a subprocess run of an example script end to end
@pytest.mark.background("benchmark-toy")
def test_benchmark_quick_run_prints_measured_tables() -> None:
    """The benchmark's smoke mode end to end: cached results, the report and the sample grids
    (``examples/benchmark.py --quick --threads 1 --section toy``, ``background.RUNS["benchmark-toy"]``)."""
    result, folder = background_run("benchmark-toy")
    out = folder / "bench"
    assert result.returncode == 0, result.stderr[-2000:]
    report = (out / "report_toy.md").read_text()
    for row in ("| DPM-Solver++ (2M) | 20 | 20 |", "| MMGibbs ancestral, isotropic | 20 | 20 |", "| 0.3 | 10 |"):
        assert row in report
    assert "nan ± nan" not in report
