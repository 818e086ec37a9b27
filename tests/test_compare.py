"""The A/B command (``examples/compare.py``) and its Python form (``mmgibbs.compare``), with the recommendation table
(``mmgibbs.recommend``) it reads its defaults from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler
from PIL import Image
from tiny_pipelines import count_calls, tiny_clip_tokenizer, tiny_ddpm_pipeline, tiny_stable_diffusion_pipeline

from mmgibbs import MMGibbsScheduler
from mmgibbs.compare import (
    ClipScore,
    FrechetDistance,
    NotMeasured,
    PeakMemory,
    compare,
    cost_per_level,
    host_steps,
    levels_for_budget,
)
from mmgibbs.families import StableDiffusion, Unconditional
from mmgibbs.recommend import RECOMMENDED, recommended_settings

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "checkpoints" / "digits-ddpm"


def _records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["records"]


def test_digits_ddpm_from_the_command_line_measures_fd_against_the_held_out_digits(tmp_path) -> None:
    """``--model examples/checkpoints/digits-ddpm --steps 10``: both samplers at 10 calls, FD in the shipped
    classifier's features against the 397 held-out digits in every record, the grid and the table written."""
    import compare as cli

    out = tmp_path / "ab"
    cli.main(
        ["--model", str(DIGITS), "--steps", "10", "--seeds", "0", "1", "--num-samples", "8", "--out-dir", str(out)]
    )
    records = _records(out)
    assert [(r["sampler"], r["budget"]) for r in records] == [("host", 10), ("mmgibbs", 10)]
    for r in records:
        assert isinstance(r["fd"], float) and np.isfinite(r["fd"]) and r["fd"] > 0
        assert "397 held-out digits" in r["fd_about"] and r["num_images"] == 16
        assert r["clip_score"] is None and r["clip_score_reason"] == "the model takes no prompt"
        assert r["model_calls"] == {"forward": 10, "backward": 0, "jvp": 0} and r["forward_equivalents"] == 10
    assert records[1]["settings"] == recommended_settings(Unconditional, 10)
    assert records[0]["fd"] != records[1]["fd"]  # two samplers, two sample sets
    table = (out / "results.md").read_text()
    assert "| DDPMPipeline + DDPMScheduler | 10 | 10 steps | 10 | 0 | 0 | 10 |" in table
    assert f"{records[0]['fd']:.3f}" in table and "397 held-out digits" in table
    # 2 rows (sampler x budget) of 2 cells (seeds): each cell 8 tiled 8x8 digits (3 x 3 tile, 26 px, upscaled 4x)
    # with a 3 px border, under a 20 px label line
    assert Image.open(out / "grid.png").size[1] == 20 + 2 * (4 * 26 + 6)


def test_tiny_stable_diffusion_folder_writes_the_grid_and_the_cost_table_without_quality(tmp_path) -> None:
    import compare as cli

    folder = tmp_path / "tiny-sd"
    tiny_stable_diffusion_pipeline().save_pretrained(folder)
    out = tmp_path / "ab"
    argv = ["--model", str(folder), "--prompt", "a red cat", "--prompt", "a blue dog", "--steps", "2", "3"]
    cli.main([*argv, "--seeds", "0", "1", "--num-samples", "1", "--out-dir", str(out)])
    records = _records(out)
    assert [(r["sampler"], r["budget"]) for r in records] == [("host", 2), ("mmgibbs", 2), ("host", 3), ("mmgibbs", 3)]
    for r in records:  # CFG: both branches in one call
        assert r["model_calls"]["forward"] == r["budget"] and r["num_images"] == 4
        assert r["fd"] is None and "--reference-dir" in r["fd_reason"]
        assert r["clip_score"] is None and "--clip-model" in r["clip_score_reason"]
        assert r["seconds"] > 0 and "peak_memory_mb" in r
    table = (out / "results.md").read_text()
    assert "| StableDiffusionPipeline + DDIMScheduler | 3 | 3 steps | 3 | 0 | 0 | 3 |" in table
    assert "not measured: no reference images given" in table
    grid = Image.open(out / "grid.png")
    assert grid.size[1] == 20 + 4 * (6 * 16 + 6)  # 4 rows of 16 px images upscaled 6x, 3 px borders


def test_jacobian_covariances_get_the_levels_that_match_the_budget(tmp_path) -> None:
    """diagonal with one probe costs 1 forward + 1 backward (3 equivalents) per level: 7 calls buy 2 levels; the
    host spends its 7 forwards; the counts come from the run, not from the plan."""
    pipe = tiny_ddpm_pipeline()
    records = compare(pipe, steps=[7], seeds=[0], gibbs_settings={"covariance": "diagonal"}, progress=False)
    host, gibbs = records
    assert host["model_calls"] == {"forward": 7, "backward": 0, "jvp": 0}
    assert gibbs["num_inference_steps"] == 2 and gibbs["model_calls"] == {"forward": 2, "backward": 2, "jvp": 0}
    assert gibbs["forward_equivalents"] == 6 <= host["forward_equivalents"] == 7
    assert gibbs["fd"] is None and gibbs["fd_reason"] == "no reference images given"


@pytest.mark.parametrize(
    ("settings", "per_level"),
    [
        ({}, 1),
        ({"covariance": "diagonal", "num_probes": 4}, 9),
        ({"covariance": "diagonal", "num_probes": 4, "jacobian": "forward"}, 8),
        ({"covariance": "projection", "jacobian": "finite_difference"}, 2),
        ({"covariance": "full"}, 129),
        ({"covariance": "isotropic", "gibbs_sweeps": 2}, 2),
    ],
)
def test_cost_per_level(settings: dict, per_level: int) -> None:
    scheduler = MMGibbsScheduler(**settings)
    assert cost_per_level(scheduler, dim=64) == per_level
    assert levels_for_budget(scheduler, 260, dim=64) == 260 // per_level


def test_a_budget_below_one_level_is_refused_before_any_model_call() -> None:
    pipe = tiny_ddpm_pipeline()
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"`steps`: a budget of 50 model calls is below one level.*129 forward"):
        compare(pipe, steps=[50], seeds=[0], gibbs_settings={"covariance": "full"}, progress=False)
    with pytest.raises(ValueError, match="`prompts`: this unconditional model takes no prompt"):
        compare(pipe, prompts=["a cat"], steps=[5], progress=False)
    with pytest.raises(ValueError, match="`steps` must be distinct"):
        compare(pipe, steps=[5, 5], progress=False)
    with pytest.raises(ValueError, match="`seeds` must hold integers"):
        compare(pipe, steps=[5], seeds=[0.5], progress=False)
    with pytest.raises(ValueError, match="eta"):
        compare(pipe, steps=[5], gibbs_settings={"eta": 2.0}, progress=False)
    assert calls == []


def test_text_to_image_needs_prompts() -> None:
    with pytest.raises(ValueError, match="`prompts` must be a non-empty list"):
        compare(tiny_stable_diffusion_pipeline(), steps=[2], progress=False)


def test_host_steps_fit_second_order_schedulers_into_the_budget() -> None:
    """Heun evaluates the model twice per step (2 n - 1 timesteps): 10 calls buy 5 steps; DDIM's n steps are n."""
    assert host_steps(HeunDiscreteScheduler(), 10) == 5
    assert host_steps(DDIMScheduler(), 10) == 10


@pytest.mark.parametrize("argv", [["--out-dir", "{file}"], ["--out-dir", "{tmp}/missing/out"]])
def test_out_dir_is_checked_before_loading(tmp_path, capsys, argv) -> None:
    import compare as cli

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([a.format(tmp=tmp_path, file=tmp_path / "file") for a in argv])
    assert exit_info.value.code == 2 and "--out-dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--prompt", "a cat"], "has no text encoder; it takes no prompt"),
        (["--prompts", "{tmp}/empty.txt"], "--prompts {tmp}/empty.txt: holds no prompt"),
        (["--prompts", "{tmp}/missing.txt"], "not a file"),
        (["--reference-dir", "{tmp}/missing"], "--reference-dir {tmp}/missing: not a folder"),
        (["--reference-dir", "{tmp}/one"], "holds 1 image file(s)"),
        (["--steps", "10", "10"], "--steps: the budgets must be distinct"),
        (["--covariance", "full", "--steps", "10"], "below one level of covariance='full'"),
        (["--num-probes", "2"], "--num-probes sets the Jacobian products"),
        (["--model", "{tmp}/missing"], "--model"),
        (["--clip-model", "{tmp}"], "--clip-model scores images against their prompts"),
    ],
)
def test_arguments_are_checked_before_loading(tmp_path, capsys, argv, match) -> None:
    import compare as cli

    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "one").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "one" / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*(a.format(tmp=tmp_path) for a in argv), "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert match.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_text_to_image_folder_without_prompt_is_refused_before_loading(tmp_path, capsys) -> None:
    import compare as cli

    folder = tmp_path / "tiny-sd"
    tiny_stable_diffusion_pipeline().save_pretrained(folder)
    with pytest.raises(SystemExit):
        cli.main(["--model", str(folder), "--out-dir", str(tmp_path / "out")])
    assert "is a text-to-image pipeline: pass --prompt" in capsys.readouterr().err


def test_inception_fd_is_not_measured_without_torchmetrics_or_its_weights(tmp_path) -> None:
    """A reference folder for a text-to-image model: FD in Inception features when torchmetrics (with its image
    extra and weights) is available locally, otherwise "not measured" with the reason, never a number."""
    import compare as cli

    folder, refs = tmp_path / "tiny-sd", tmp_path / "refs"
    tiny_stable_diffusion_pipeline().save_pretrained(folder)
    refs.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(refs / f"{i}.png")
    out = tmp_path / "ab"
    argv = ["--model", str(folder), "--prompt", "a red cat", "--steps", "2", "--seeds", "0", "--num-samples", "2"]
    cli.main([*argv, "--reference-dir", str(refs), "--out-dir", str(out)])
    for r in _records(out):
        if importlib.util.find_spec("torchmetrics") is None:
            assert r["fd"] is None and "pip install 'torchmetrics[image]'" in r["fd_reason"]
        else:
            assert (r["fd"] is None and "Inception" in r["fd_reason"]) or "Inception" in r["fd_about"]


def test_frechet_distance_against_a_reference_folder(tmp_path) -> None:
    """PIL references are resized to the samples' size and channels; the same sets give 0."""
    images = torch.rand(6, 1, 8, 8)
    pil = [Image.fromarray((im[0].numpy() * 255).round().astype(np.uint8)) for im in images]
    measure = FrechetDistance(lambda x: x.flatten(1)[:, :4], pil, "pixels")
    assert measure(images, None) == pytest.approx(0.0, abs=1e-3)
    assert measure(images * 0.5, None) > 0.01
    with pytest.raises(NotMeasured, match="at least 2 samples"):
        measure(images[:1], None)


def test_clip_score_from_a_local_clip_model(tmp_path) -> None:
    """torchmetrics' definition, 100 max(cos, 0) in [0, 100], from a local folder (a tiny random CLIP here);
    a folder that is not there is "not measured"."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer()
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1)
    config = CLIPConfig(
        text_config=dict(
            text, vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(text, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(tmp_path / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path / "clip")
    score = ClipScore.from_pretrained(tmp_path / "clip")
    value = score(torch.rand(2, 3, 16, 16), ["a red cat", "a blue dog"])
    assert 0.0 <= value <= 100.0
    assert score(torch.zeros(2, 3, 16, 16), ["a red cat", "a blue dog"]) != value
    with pytest.raises(NotMeasured, match="not available locally"):
        ClipScore.from_pretrained(tmp_path / "missing")
    with pytest.raises(NotMeasured, match="takes no prompt"):
        score(torch.rand(2, 3, 16, 16), None)


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="the CPU measure reads /proc/self/statm")
def test_peak_memory_on_cpu_sees_a_block_allocation() -> None:
    """A fresh 64 MiB anonymous mapping, every page written: resident while the block runs (a torch or numpy
    allocation may reuse memory the process already holds, which the measure does not count by design)."""
    import mmap

    size = 64 * 2**20
    with PeakMemory(torch.device("cpu")) as memory:
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
    assert memory.mb is not None and memory.mb >= 48
    assert "resident set size" in memory.how
    block.close()


@pytest.mark.parametrize(
    ("calls", "budget"),
    [(1, 10), (10, 10), (19, 10), (20, 20), (35, 20), (50, 50), (1000, 50)],
)
def test_recommendation_is_the_largest_measured_budget_not_above(calls: int, budget: int) -> None:
    assert recommended_settings(StableDiffusion, calls) == RECOMMENDED[budget]["uncalibrated"]
    assert recommended_settings("Unconditional", calls, calibrated=True) == RECOMMENDED[budget]["calibrated"]
    # every family calibrates (issue 15), so every family has a calibrated recommendation
    assert recommended_settings(StableDiffusion, calls, calibrated=True) == RECOMMENDED[budget]["calibrated"]


def test_recommendation_refuses_what_it_cannot_recommend() -> None:
    with pytest.raises(ValueError, match="`model_calls` must be a positive integer"):
        recommended_settings(Unconditional, 0)
    settings = recommended_settings(Unconditional, 10)
    settings["eta"] = 0.5  # a copy: the table is not changed through it
    assert recommended_settings(Unconditional, 10)["eta"] == 0.0


def test_a_calibrated_gibbs_pipeline_is_compared_against_its_host_with_the_calibrated_recommendation() -> None:
    """A MomentMatchingGibbsPipeline holding a table (as examples/calibrate.py saves it): the host is rebuilt from
    its components and source scheduler, and the default settings are the calibrated recommendation."""
    from mmgibbs import MomentMatchingGibbsPipeline

    pipe = MomentMatchingGibbsPipeline.from_pipe(tiny_ddpm_pipeline())
    pipe.set_progress_bar_config(disable=True)
    samples = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pipe.calibrate_covariance([4], samples=samples, num_clusters=2, rank=4, generator=torch.Generator().manual_seed(1))
    host, gibbs = compare(pipe, steps=[4], seeds=[0], num_samples=2, progress=False)
    assert host["label"] == "DDPMPipeline + DDPMScheduler" and host["model_calls"]["forward"] == 4
    assert gibbs["settings"] == recommended_settings(Unconditional, 4, calibrated=True)
    assert gibbs["settings"]["covariance"] == "calibrated" and gibbs["model_calls"]["forward"] == 4


def test_a_calibrated_text_to_image_gibbs_pipeline_is_compared_against_its_host_with_its_table() -> None:
    """A Gibbs pipeline over Stable Diffusion holding a table calibrated for a prompt at guidance 3: its host is
    rebuilt (the safety checker and feature extractor it has none of passed as None), both samplers run at the
    table's guidance when the caller names none, the Gibbs side with the calibrated recommendation; another guidance
    scale is refused before any model call (it failed inside the Gibbs run, after the host's)."""
    from mmgibbs import MomentMatchingGibbsPipeline

    pipe = MomentMatchingGibbsPipeline.from_pipe(tiny_stable_diffusion_pipeline())
    pipe.set_progress_bar_config(disable=True)
    samples = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe.calibrate_covariance(
        [4], samples=samples, num_clusters=2, rank=4, prompt="a cat", guidance_scale=3.0, generator=torch.Generator()
    )
    host, gibbs = compare(pipe, prompts=["a cat"], steps=[4], seeds=[0], num_samples=1, progress=False)
    assert host["label"] == "StableDiffusionPipeline + DDIMScheduler" and host["model_calls"]["forward"] == 4
    assert gibbs["settings"] == recommended_settings(StableDiffusion, 4, calibrated=True)
    assert gibbs["settings"]["covariance"] == "calibrated" and gibbs["model_calls"]["forward"] == 4
    assert host["call_arguments"] == gibbs["call_arguments"] == {"guidance_scale": 3.0, "guidance_rescale": 0.0}
    with count_calls(pipe.unet) as calls, pytest.raises(ValueError, match=r"`guidance_scale`=7\.5: the pipeline's "):
        compare(pipe, prompts=["a cat"], steps=[4], seeds=[0], call_arguments={"guidance_scale": 7.5}, progress=False)
    assert calls == []


def test_a_stationary_table_is_compared_with_the_estimator_that_reads_it() -> None:
    """The calibrated recommendation names ``calibrated``; a pipeline holding a stationary table is compared with
    ``calibrated_stationary`` (the low-rank reader refuses stationary levels)."""
    from mmgibbs import MomentMatchingGibbsPipeline

    pipe = MomentMatchingGibbsPipeline.from_pipe(tiny_stable_diffusion_pipeline(), covariance="calibrated_stationary")
    pipe.set_progress_bar_config(disable=True)
    samples = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe.calibrate_covariance([4], samples=samples, num_clusters=2, prompt="a cat", generator=torch.Generator())
    _, gibbs = compare(pipe, prompts=["a cat"], steps=[4], seeds=[0], num_samples=1, progress=False)
    assert gibbs["settings"] == recommended_settings(StableDiffusion, 4, calibrated=True, structure="stationary")
    assert gibbs["settings"]["covariance"] == "calibrated_stationary" and gibbs["model_calls"]["forward"] == 4
    with pytest.raises(ValueError, match="`structure` must be one of 'low_rank', 'stationary'"):
        recommended_settings(StableDiffusion, 4, calibrated=True, structure="fourier")
