"""Bad inputs (issue 10, item 3): each gets a clear error naming the argument, where it was passed.

Every test here failed on the code before its fix: the input either passed silently (a broadcast sample, an
ignored generator) or failed deep inside torch or diffusers with a message that names no argument.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from tiny_pipelines import tiny_stable_diffusion_pipeline, tiny_unet2d

from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ MMGibbsScheduler.step
def _stepped(model_output, sample, scheduler: MMGibbsScheduler | None = None, **kwargs) -> torch.Tensor:
    scheduler = scheduler or MMGibbsScheduler()
    scheduler.set_timesteps(3)
    return scheduler.step(model_output, scheduler.timesteps[0], sample, **kwargs).prev_sample


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 8, 8), (1, 3, 8, 8), (3, 8, 8), (), (2, 3, 4, 4), (3, 3, 8, 8), (2, 6, 8, 8)],
    ids=["channels-1", "batch-1", "3-d", "scalar", "spatial", "batch-3", "2C-without-learned-variance"],
)
def test_step_refuses_a_model_output_of_another_shape_than_the_sample(shape: tuple[int, ...]) -> None:
    """(2, 1, 8, 8), (1, 3, 8, 8), (3, 8, 8) and 0-d outputs broadcast against a (2, 3, 8, 8) sample silently; the
    others failed inside torch ("The size of tensor a (3) must match ..."). A 2C-channel output of a config without
    a learned variance names the setting that would accept it."""
    sample = torch.randn(2, 3, 8, 8, generator=_generator())
    match = r"`model_output` has shape .* but `sample` has shape \(2, 3, 8, 8\)"
    if shape == (2, 6, 8, 8):
        match = r"`model_output` has 6 channels for a 3-channel `sample`.*variance_type"
    with pytest.raises(ValueError, match=match):
        _stepped(torch.zeros(shape), sample)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_step_takes_the_prediction_channels_of_a_learned_variance_output(variance_type: str) -> None:
    """A learned-variance UNet returns [F, v] (2C channels) for a C-channel sample; with the source config's
    ``variance_type`` learned the step uses F, as DDPMScheduler splits it; the learned v is replaced by the
    moment-matched covariance. It used to fail inside torch."""
    config = DDPMScheduler(variance_type=variance_type).config
    sample = torch.randn(2, 3, 8, 8, generator=_generator())
    prediction = 0.1 * torch.randn(2, 3, 8, 8, generator=_generator(1))
    output = torch.cat([prediction, torch.full_like(prediction, 123.0)], dim=1)
    got = _stepped(output, sample, MMGibbsScheduler.from_config(config), generator=_generator(2))
    expected = _stepped(prediction, sample, MMGibbsScheduler.from_config(config), generator=_generator(2))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`model_output` has shape \(2, 9, 8, 8\)"):
        _stepped(torch.zeros(2, 9, 8, 8), sample, MMGibbsScheduler.from_config(config))


def test_ddpm_pipeline_drop_in_with_a_learned_variance_unet() -> None:
    """DDPMPipeline over a 2C-output UNet and its learned_range config: the step used to broadcast the C-channel
    sample to 2C channels, and the next UNet call failed on its input channels."""
    unet = tiny_unet2d(channels=1, attention=False)
    wide = type(unet).from_config({**unet.config, "out_channels": 2}).eval()
    pipe = DDPMPipeline(unet=wide, scheduler=DDPMScheduler(variance_type="learned_range"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config)
    images = pipe(batch_size=2, num_inference_steps=3, generator=_generator(), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


@pytest.mark.parametrize(
    ("model_output", "sample", "match"),
    [
        (np.zeros((2, 3, 8, 8)), torch.zeros(2, 3, 8, 8), r"`model_output` must be a torch.Tensor; got ndarray"),
        (None, torch.zeros(2, 3, 8, 8), r"`model_output` must be a torch.Tensor; got NoneType"),
        (torch.zeros(2, 3, 8, 8), np.zeros((2, 3, 8, 8)), r"`sample` must be a torch.Tensor; got ndarray"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), r"`sample` must be a floating-point tensor"),
    ],
    ids=["numpy-output", "none-output", "numpy-sample", "integer-sample"],
)
def test_step_refuses_inputs_that_are_not_float_tensors(model_output, sample, match: str) -> None:
    """numpy arrays and None failed with AttributeError ("'numpy.ndarray' object has no attribute 'to'"), an integer
    sample came back rounded to integers. DDPMScheduler does not take numpy arrays either."""
    with pytest.raises(TypeError, match=match):
        _stepped(model_output, sample)


@pytest.mark.parametrize(
    ("generator", "match"),
    [
        (0, r"`generator` must be a torch.Generator or a list of them .*; got int"),
        (np.random.default_rng(0), r"`generator` must be a torch.Generator or a list of them .*; got Generator"),
        ("seed", r"`generator` must be a torch.Generator or a list of them .*; got str"),
        ([torch.Generator(), 0], r"`generator\[1\]` must be a torch.Generator; got int"),
        ([torch.Generator()], r"1 generators in `generator` for a batch of 2"),
        ([torch.Generator()] * 3, r"3 generators in `generator` for a batch of 2"),
    ],
    ids=["int", "numpy-rng", "str", "list-with-int", "list-too-short", "list-too-long"],
)
def test_step_refuses_generators_that_are_not_one_per_sample(generator, match: str) -> None:
    """Non-generators failed inside diffusers' randn_tensor ("'int' object has no attribute 'device'"); a list of
    one generator drew every sample from it and a list longer than the batch ignored the rest, both silently."""
    sample = torch.zeros(2, 3, 8, 8)
    with pytest.raises((TypeError, ValueError), match=match):
        _stepped(torch.zeros_like(sample), sample, generator=generator)


@pytest.mark.parametrize("timestep", [None, "500", object()], ids=["none", "str", "object"])
def test_step_refuses_a_timestep_that_is_not_a_number(timestep) -> None:
    scheduler = MMGibbsScheduler()
    scheduler.set_timesteps(3)
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="`timestep` must be a number or a tensor"):
        scheduler.step(x, timestep, x)


# ------------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def unconditional() -> MomentMatchingGibbsPipeline:
    pipe = MomentMatchingGibbsPipeline(unet=tiny_unet2d(), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stable_diffusion() -> MomentMatchingGibbsPipeline:
    pipe = MomentMatchingGibbsPipeline.from_pipe(tiny_stable_diffusion_pipeline())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latent(pipe: MomentMatchingGibbsPipeline, **kwargs) -> torch.Tensor:
    return pipe(**{"num_inference_steps": 1, "output_type": "latent", **kwargs}).images


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"latents": np.zeros((2, 1, 8, 8))}, TypeError, r"`latents` must be a torch.Tensor; got ndarray"),
        ({"latents": [[0.0]]}, TypeError, r"`latents` must be a torch.Tensor; got list"),
        ({"latents": torch.zeros(2, 1, 8, 8, dtype=torch.complex64)}, TypeError, r"`latents` must be a real"),
        ({"latents": torch.zeros(2, 1, 4, 4), "batch_size": 2}, ValueError, r"`latents` must have shape \(2, 1, 8, 8"),
        ({"latents": torch.zeros(3, 1, 8, 8), "batch_size": 2}, ValueError, r"`latents` must have shape \(2, 1, 8, 8"),
        ({"latents": torch.zeros(1, 8, 8)}, ValueError, r"`latents` must have shape \(1, 1, 8, 8"),
        ({"x_init": np.zeros((2, 1, 8, 8))}, TypeError, r"`x_init` must be a torch.Tensor; got ndarray"),
        ({"x_init": torch.zeros(2, 1, 4, 4), "batch_size": 2}, ValueError, r"`x_init` must have shape \(2, 1, 8, 8"),
        ({"x_init": torch.zeros(1, 1, 8, 8), "batch_size": 2}, ValueError, r"`x_init` must have shape \(2, 1, 8, 8"),
        ({"x_init": torch.zeros(2, 1, 8, 8), "latents": torch.zeros(2, 1, 8, 8)}, ValueError, r"`x_init`.*`latents`"),
    ],
    ids=[
        "latents-numpy",
        "latents-list",
        "latents-complex",
        "latents-spatial",
        "latents-batch",
        "latents-3d",
        "x_init-numpy",
        "x_init-spatial",
        "x_init-batch",
        "x_init-and-latents",
    ],
)
def test_unconditional_starting_points_of_the_wrong_type_or_shape(unconditional, kwargs, error, match) -> None:
    """numpy arrays failed with AttributeError ('no attribute to'), complex latents ran silently, shape errors
    named "the starting sample" or `noise`/`original_samples` (of add_noise), and `x_init` beside `latents` was
    silently ignored."""
    with pytest.raises(error, match=match):
        _latent(unconditional, **kwargs)


def test_unconditional_batch_follows_the_starting_tensor(unconditional) -> None:
    """Without `batch_size`, `latents` or `x_init` of N samples give N samples (they were refused against the
    default batch of 1)."""
    assert _latent(unconditional, latents=torch.zeros(3, 1, 8, 8)).shape == (3, 1, 8, 8)
    assert _latent(unconditional, x_init=torch.zeros(2, 1, 8, 8)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    ("generator", "kwargs", "error", "match"),
    [
        (0, {"batch_size": 2}, TypeError, r"`generator` must be a torch.Generator or a list"),
        ((torch.Generator(), torch.Generator()), {"batch_size": 2}, TypeError, r"got tuple"),
        ([torch.Generator(), "x"], {"batch_size": 2}, TypeError, r"`generator\[1\]` must be a torch.Generator"),
        ([torch.Generator(), torch.Generator()], {}, ValueError, r"2 generators in `generator` for a batch of 1"),
    ],
    ids=["int", "tuple", "list-with-str", "list-without-batch-size"],
)
def test_unconditional_generators(unconditional, generator, kwargs, error, match) -> None:
    """Non-generators failed inside diffusers' randn_tensor; two generators without `batch_size` drew one sample
    from the first and ignored the second."""
    with pytest.raises(error, match=match):
        _latent(unconditional, generator=generator, **kwargs)


def test_callbacks_that_are_not_callable_or_return_no_tensor(unconditional) -> None:
    with pytest.raises(TypeError, match="`callback_on_step_end` must be callable; got str"):
        _latent(unconditional, callback_on_step_end="print")
    with pytest.raises(TypeError, match=r"`callback_on_step_end` returned a ndarray as 'latents'"):
        _latent(unconditional, callback_on_step_end=lambda *_: {"latents": np.zeros((1, 1, 8, 8))})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": []}, r"`prompt` must be a string or a non-empty list of strings; got \[\]"),
        ({"prompt": ["a", 2]}, r"`prompt` must be a string or a non-empty list of strings"),
        ({"prompt": "a", "negative_prompt": [None]}, r"`negative_prompt` must be a string or a non-empty list"),
        ({"num_images_per_prompt": 0}, r"`num_images_per_prompt` must be an integer >= 1; got 0"),
        ({"num_images_per_prompt": 1.5}, r"`num_images_per_prompt` must be an integer >= 1; got 1.5"),
        ({"height": -8}, r"`height` must be an integer >= 1; got -8"),
        ({"width": "16"}, r"`width` must be an integer >= 1; got '16'"),
        ({"guidance_scale": "7"}, r"`guidance_scale` must be a finite number; got '7'"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number; got nan"),
        ({"guidance_rescale": -1.0}, r"`guidance_rescale` must be a finite number in \[0, 1\]; got -1.0"),
        ({"clip_skip": -1}, r"`clip_skip` must be an integer >= 0; got -1"),
    ],
    ids=[
        "prompt-empty",
        "prompt-int-item",
        "negative-none-item",
        "images-0",
        "images-float",
        "height-negative",
        "width-str",
        "guidance-str",
        "guidance-nan",
        "rescale-negative",
        "clip-skip-negative",
    ],
)
def test_text_to_image_scalars_and_prompts(stable_diffusion, kwargs, match) -> None:
    """Each of these failed inside torch, diffusers or transformers ("cannot reshape tensor of 0 elements", "list
    index out of range", "'>' not supported between 'str' and 'int'") or ran silently (NaN guidance, negative
    rescale)."""
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(ValueError, match=match):
        _latent(stable_diffusion, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"latents": torch.zeros(1, 4, 4, 4)}, ValueError, r"`latents` must have shape \(1, 4, 8, 8\)"),
        ({"latents": torch.zeros(1, 4, 8, 8), "prompt": ["a", "b"]}, ValueError, r"shape \(2, 4, 8, 8\)"),
        ({"latents": torch.zeros(1, 3, 8, 8)}, ValueError, r"`latents` must have shape \(1, 4, 8, 8\)"),
        ({"latents": np.zeros((1, 4, 8, 8), np.float32)}, TypeError, r"`latents` must be a torch.Tensor"),
        ({"generator": 0}, TypeError, r"`generator` must be a torch.Generator"),
    ],
    ids=["spatial", "batch", "channels", "numpy", "generator-int"],
)
def test_text_to_image_latents_and_generators(stable_diffusion, kwargs, error, match) -> None:
    """Stable Diffusion's prepare_latents takes `latents` of any shape: 4x4 latents ran silently (8x8 images),
    other shapes failed inside the UNet or the text cross-attention; numpy arrays and generator=0 failed with
    AttributeError."""
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(error, match=match):
        _latent(stable_diffusion, **kwargs)


def test_inpainting_latents_of_the_wrong_shape(stable_diffusion) -> None:
    image, mask = torch.rand(1, 3, 16, 16, generator=_generator()), torch.ones(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 4, 8, 8\)"):
        _latent(stable_diffusion, prompt="a", image=image, mask_image=mask, latents=torch.zeros(1, 4, 4, 4))


def test_a_scheduler_that_is_not_a_scheduler() -> None:
    with pytest.raises(TypeError, match="`scheduler` must be a diffusers scheduler"):
        MomentMatchingGibbsPipeline(unet=tiny_unet2d(), scheduler={"num_train_timesteps": 1000})


def _family(name: str) -> tuple[MomentMatchingGibbsPipeline, dict]:
    if name == "sdxl":
        from tiny_sdxl import tiny_sdxl_pipeline

        return MomentMatchingGibbsPipeline.from_pipe(tiny_sdxl_pipeline()), {}
    if name == "sd3":
        from tiny_sd3 import tiny_sd3_pipeline

        return MomentMatchingGibbsPipeline.from_pipe(tiny_sd3_pipeline()), {"height": 16, "width": 16}
    if name == "flux":
        from tiny_flux import tiny_flux_pipeline

        return MomentMatchingGibbsPipeline.from_pipe(tiny_flux_pipeline()), {"height": 16, "width": 16}
    from tiny_pixart import tiny_pixart_pipeline

    return MomentMatchingGibbsPipeline.from_pipe(tiny_pixart_pipeline()), {
        "clean_caption": False,
        "use_resolution_binning": False,
    }


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "pixart"])
def test_every_text_to_image_family_checks_the_shape_of_latents(family: str) -> None:
    """The hosts' prepare_latents return `latents` as passed: a smaller tensor ran silently at another size (SDXL,
    SD3, PixArt) or failed inside the transformer's position ids (Flux)."""
    pipe, size = _family(family)
    pipe.set_progress_bar_config(disable=True)
    good = pipe("a cat", num_inference_steps=1, output_type="latent", **size).images[:1]
    bad = good[..., : good.shape[-1] // 2] if family == "flux" else good[..., :2, :2]
    with pytest.raises(ValueError, match=rf"`latents` must have shape \({', '.join(map(str, good.shape))}\)"):
        pipe("a cat", num_inference_steps=1, latents=bad.contiguous(), output_type="latent", **size)
    with pytest.raises(ValueError, match=r"1 generators in `generator` for a batch of 2|length of the generators"):
        pipe(["a", "b"], num_inference_steps=1, generator=[_generator()], output_type="latent", **size)


# ------------------------------------------------------------------------------------------ scheduler settings
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eta": "x"}, r"`eta` must be a finite number in \[0, 1\]; got 'x'"),
        ({"eta": None}, r"`eta` must be a finite number in \[0, 1\]; got None"),
        ({"variance_bound": "1"}, r"`variance_bound` must be positive .*; got '1'"),
        ({"variance_bound": float("nan")}, r"`variance_bound` must be positive .*; got nan"),
        ({"schedule": "single_level", "sigma": "0.5"}, r"positive noise level `sigma` \(finite\); got '0.5'"),
        ({"num_train_timesteps": 0}, r"`num_train_timesteps` must be an integer >= 1; got 0"),
        ({"num_train_timesteps": -5}, r"`num_train_timesteps` must be an integer >= 1; got -5"),
        ({"num_train_timesteps": 1.5}, r"`num_train_timesteps` must be an integer >= 1; got 1.5"),
        ({"beta_start": -1.0}, r"betas .*\(0, 1\].*`beta_start`=-1"),
        ({"beta_start": float("nan")}, r"betas .*\(0, 1\].*`beta_start`=nan"),
        ({"beta_end": 2.0}, r"betas .*\(0, 1\].*`beta_end`=2"),
        ({"trained_betas": [float("nan")] * 10}, r"`trained_betas` must lie in \(0, 1\]"),
        ({"trained_betas": [-0.1] * 10}, r"`trained_betas` must lie in \(0, 1\]"),
        ({"trained_betas": [1.5] * 10}, r"`trained_betas` must lie in \(0, 1\]"),
    ],
    ids=[
        "eta-str",
        "eta-none",
        "bound-str",
        "bound-nan",
        "sigma-str",
        "train-steps-0",
        "train-steps-negative",
        "train-steps-float",
        "beta-start-negative",
        "beta-start-nan",
        "beta-end-2",
        "trained-nan",
        "trained-negative",
        "trained-above-1",
    ],
)
def test_scheduler_settings_of_the_wrong_type_or_range(kwargs: dict, match: str) -> None:
    """Strings and None failed inside a comparison ("'<=' not supported between 'float' and 'str'"); zero
    training steps fell back to 1000 and -5 failed inside torch.linspace; betas outside (0, 1] (negative,
    NaN, above 1) built a schedule with NaN levels, silently."""
    with pytest.raises(ValueError, match=match):
        MMGibbsScheduler(**kwargs)


# ------------------------------------------------------------------------------------------ the main job's flags
DSM = Path(__file__).resolve().parents[1] / "examples" / "checkpoints" / "digits-dsm-sigma0.5"


def _cli_error(argv: list[str], capsys) -> str:
    """The argparse error of the main job's command line, raised while parsing (before any model is loaded)."""
    import sample

    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--out", "{tmp}/missing/a.png"], r"--out .*: the folder .*missing does not exist"),
        (["--out", "{tmp}"], r"--out .* is a folder; pass an image file name"),
        (["--out", "{tmp}/grid"], r"--out .*: no extension is not an image format PIL writes"),
        (["--out", "{tmp}/grid.txt"], r"--out .*: \.txt is not an image format PIL writes"),
        (["--out", "{tmp}/file.txt/a.png"], r"--out .*: the folder .*file.txt does not exist"),
        (["--out", "/proc/a.png"], r"--out /proc/a.png: cannot write to /proc"),
        (["--model", "./missing"], r"--model './missing' is neither an existing folder nor a Hub id"),
        (["--model", "a/b/c"], r"--model 'a/b/c' is neither an existing folder nor a Hub id"),
        (["--model", ""], r"--model '' is neither an existing folder nor a Hub id"),
        (["--model", "{tmp}"], r"--model .* has no model_index.json"),
        (["--model", "{tmp}/file.txt"], r"--model .*file.txt is a file"),
        (["--prompt", "a cat"], r"--prompt: .*digits-ddpm \(DDPMPipeline\) has no text encoder"),
        (["--mode", "drop-in", "--covariance", "full"], r"--covariance full needs the model's Jacobian"),
        (["--model", str(DSM), "--mode", "drop-in"], r"--mode drop-in .* is a MomentMatchingGibbsPipeline"),
        (["--sigma", "1e6"], r"sampler settings do not fit .*`sigma`=1e\+06 lies outside the noise levels"),
        (["--sigma", "-1"], r"argument --sigma: '-1' is not a finite number > 0"),
        (["--sigma", "nan"], r"argument --sigma: 'nan' is not a finite number > 0"),
        (["--steps", "0"], r"argument --steps: '0' is not a finite number >= 1"),
        (["--batch-size", "-2"], r"argument --batch-size: '-2' is not a finite number >= 1"),
        (["--gibbs-sweeps", "1.5"], r"argument --gibbs-sweeps: '1.5' is not an integer"),
        (["--eta", "2"], r"argument --eta: '2' is not a finite number in \[0, 1\]"),
        (["--num-probes", "2"], r"--num-probes sets the Hutchinson probes of --covariance diagonal, not isotropic"),
        (["--transition", "gibbs", "--eta", "0.5"], r"--eta sets the ancestral transition's noise"),
        (["--guidance-scale", "3"], r"--guidance-scale needs --prompt"),
    ],
    ids=lambda v: "_".join(a.strip("-").replace("{tmp}", "tmp") for a in v) if isinstance(v, list) else "",
)
def test_main_job_checks_its_command_line_before_loading_a_model(argv, match, tmp_path, capsys) -> None:
    """Each of these used to load the model and sample first: a bad --out failed after sampling (in PIL's save),
    a bad --model inside diffusers' loader (FileNotFoundError model_index.json), bad numbers and contradicting flags
    in the first step or inside the scheduler, --sigma out of range after loading; --num-probes, --eta and
    --guidance-scale without their setting were ignored."""
    (tmp_path / "file.txt").write_text("not a model")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert re.search(match, _cli_error(argv, capsys))


def test_main_job_asks_for_a_prompt_of_a_text_to_image_folder(tmp_path, capsys) -> None:
    tiny_stable_diffusion_pipeline().save_pretrained(tmp_path / "sd")
    message = _cli_error(["--model", str(tmp_path / "sd")], capsys)
    assert "(StableDiffusionPipeline) is a text-to-image pipeline: pass --prompt" in message


def test_scheduler_add_noise_from_config_and_custom_timesteps_of_the_wrong_type() -> None:
    """numpy samples failed in add_noise with AttributeError ('no attribute is_floating_point'), a non-dict config
    with "'int' object is not iterable", and a nested list of timesteps was flattened silently."""
    scheduler = MMGibbsScheduler()
    scheduler.set_timesteps(3)
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"`original_samples` must be a torch\.Tensor; got ndarray"):
        scheduler.add_noise(x.numpy(), x, scheduler.timesteps[:1])
    with pytest.raises(TypeError, match=r"`noise` must be a torch\.Tensor; got list"):
        scheduler.add_noise(x, [0.0], scheduler.timesteps[:1])
    with pytest.raises(TypeError, match="`config` must be a scheduler config"):
        MMGibbsScheduler.from_config(42)
    with pytest.raises(ValueError, match=r"`timesteps` must be a 1-d sequence of numbers; got shape \(1, 2\)"):
        scheduler.set_timesteps(timesteps=[[900, 500]])
