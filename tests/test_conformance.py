"""Conformance with diffusers' scheduler contract and standard pipelines (issue 10).

Written here, not copied: each test states the property of diffusers' scheduler suite (``SchedulerCommonTest``)
or of a standard pipeline loop it checks, and most name the defect they guard against.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import public
from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler
from diffusers.utils import DummyObject

from mmgibbs import MMGibbsScheduler

# configured as diffusers' own DDPM scheduler test configures the scheduler under test
DDPM_TEST_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
}


def _sample(batch: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)


def _round_trip_cases() -> list[tuple[str, MMGibbsScheduler]]:
    return [
        ("default", MMGibbsScheduler()),
        ("ddpm-test-config", MMGibbsScheduler(**DDPM_TEST_CONFIG, covariance="none", gibbs_sweeps=2)),
        ("from-ddim", MMGibbsScheduler.from_config(DDIMScheduler(steps_offset=1).config, transition="gibbs")),
        ("from-edm", MMGibbsScheduler.from_config(EDMEulerScheduler(sigma_max=60.0).config, eta=0.5)),
    ]


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(("name", "scheduler"), _round_trip_cases(), ids=[n for n, _ in _round_trip_cases()])
def test_round_trip_through_every_compatible_scheduler_keeps_the_config(name: str, scheduler) -> None:
    """MMGibbs -> any compatible scheduler -> MMGibbs gives the same config (diffusers' ``test_compatibles``).

    Defect: ``noise_family`` (set after ``__init__``) stayed listed in ``_use_default_values``, so the other
    scheduler dropped it and the way back treated the config as foreign (clip_sample on, linspace spacing, ...)."""
    init_keys = set(inspect.signature(MMGibbsScheduler.__init__).parameters) - {"self"}
    compatibles = [c for c in scheduler.compatibles if not isinstance(c, DummyObject)]
    assert len(compatibles) >= 15
    for other_cls in compatibles:
        other = other_cls.from_config(scheduler.config)
        back = MMGibbsScheduler.from_config(other.config)
        kept = {k: v for k, v in back.config.items() if k in scheduler.config}
        assert public(kept) == public(scheduler.config), other_cls.__name__
        assert set(kept["_use_default_values"]) == set(scheduler.config["_use_default_values"]), other_cls.__name__
        extra = set(back.config) - set(scheduler.config)
        assert not extra & init_keys, (other_cls.__name__, extra & init_keys)


def test_save_and_load_keep_config_and_steps(tmp_path) -> None:
    """``save_pretrained``/``from_pretrained`` give the same config (without ``_use_default_values``) and step."""
    scheduler = MMGibbsScheduler(**DDPM_TEST_CONFIG, gibbs_sweeps=2)
    scheduler.save_pretrained(tmp_path)
    loaded = MMGibbsScheduler.from_pretrained(tmp_path)
    expected = dict(scheduler.config)
    del expected["_use_default_values"]
    assert dict(loaded.config) == expected
    x, out = _sample(), 0.1 * _sample()
    for s in (scheduler, loaded):
        s.set_timesteps(5)
    a = scheduler.step(out, scheduler.timesteps[0], x, generator=torch.manual_seed(0)).prev_sample
    b = loaded.step(out, loaded.timesteps[0], x, generator=torch.manual_seed(0)).prev_sample
    assert torch.equal(a, b)


def test_trained_betas_of_another_length_set_the_number_of_training_steps(tmp_path) -> None:
    """diffusers' ``test_trained_betas`` passes two betas with num_train_timesteps=1000: the training length
    follows ``trained_betas`` (defect: refused with an error about `timestep` and a 1000-number dump)."""
    scheduler = MMGibbsScheduler(**DDPM_TEST_CONFIG, trained_betas=np.array([0.1, 0.3]))
    assert scheduler.config.num_train_timesteps == 2 and len(scheduler) == 2
    scheduler.save_pretrained(tmp_path)
    loaded = MMGibbsScheduler.from_pretrained(tmp_path)
    assert scheduler.betas.tolist() == loaded.betas.tolist() == pytest.approx([0.1, 0.3])
    loaded.set_timesteps(2)
    assert loaded.timesteps.tolist() == [1, 0]


def test_vp_exposes_betas_alphas_and_alphas_cumprod_as_ddpm_does() -> None:
    for kwargs in (
        {},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"rescale_betas_zero_snr": True},
        {"trained_betas": np.linspace(1e-4, 0.03, 1000).tolist()},
    ):
        reference, ours = DDPMScheduler(**kwargs), MMGibbsScheduler(**kwargs)
        for name in ("betas", "alphas", "alphas_cumprod"):
            value = getattr(ours, name)
            assert isinstance(value, torch.Tensor) and value.dtype == getattr(reference, name).dtype
            torch.testing.assert_close(value, getattr(reference, name), rtol=0, atol=0)
    edm = MMGibbsScheduler.from_config(EDMEulerScheduler().config)
    assert not hasattr(edm, "alphas_cumprod")  # no beta schedule to expose


def test_init_takes_no_undeclared_kwargs() -> None:
    """diffusers' ``test_deprecated_kwargs``: ``**kwargs`` in ``__init__`` iff ``_deprecated_kwargs`` is set."""
    has_kwargs = "kwargs" in inspect.signature(MMGibbsScheduler.__init__).parameters
    assert has_kwargs == (len(MMGibbsScheduler._deprecated_kwargs) > 0)


# ------------------------------------------------------------------------------------------ step, add_noise
def test_public_api_and_step_output_shapes() -> None:
    scheduler = MMGibbsScheduler(**DDPM_TEST_CONFIG)
    x = _sample()
    assert scheduler.init_noise_sigma == 1.0
    assert scheduler.scale_model_input(x, 0).shape == x.shape
    scheduler.set_timesteps(10)
    out0 = scheduler.step(0.1 * x, scheduler.timesteps[0], x).prev_sample
    out1 = scheduler.step(0.1 * x, scheduler.timesteps[1], x).prev_sample
    assert out0.shape == out1.shape == x.shape
    # tuple and dict outputs agree
    outputs = []
    for return_dict in (True, False):
        scheduler.set_timesteps(10)
        outputs.append(
            scheduler.step(0.1 * x, scheduler.timesteps[0], x, torch.manual_seed(0), return_dict=return_dict)
        )
    assert torch.equal(outputs[0].prev_sample, outputs[1][0])
    assert torch.equal(outputs[0].pred_original_sample, outputs[1][1])


@pytest.mark.parametrize(
    "make_timestep",
    [
        lambda t: int(t),
        lambda t: float(t),
        lambda t: torch.tensor(int(t)),
        lambda t: torch.tensor([int(t)] * 4),
        lambda t: torch.tensor([float(t)] * 4).reshape(4, 1),
    ],
    ids=["int", "float", "0-d", "batched", "batched-2d"],
)
def test_step_accepts_scalar_0d_and_batched_timesteps(make_timestep) -> None:
    """Pipelines pass a Python number, a 0-d tensor or a per-sample (batch) tensor of equal timesteps."""
    x, out = _sample(), 0.1 * _sample()
    reference = MMGibbsScheduler(**DDPM_TEST_CONFIG)
    reference.set_timesteps(10)
    expected = reference.step(out, reference.timesteps[3], x, generator=torch.manual_seed(0)).prev_sample
    scheduler = MMGibbsScheduler(**DDPM_TEST_CONFIG)
    scheduler.set_timesteps(10)
    got = scheduler.step(out, make_timestep(scheduler.timesteps[3]), x, generator=torch.manual_seed(0))
    assert scheduler.step_index == 4
    torch.testing.assert_close(got.prev_sample, expected, rtol=0, atol=0)


def test_step_refuses_per_sample_timesteps_that_differ() -> None:
    scheduler = MMGibbsScheduler()
    scheduler.set_timesteps(10)
    x = _sample()
    t = scheduler.timesteps[[0, 0, 1, 1]]
    with pytest.raises(ValueError, match=r"`timestep`.*one noise level"):
        scheduler.step(x, t, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_are_kept(dtype: torch.dtype) -> None:
    for scheduler in (
        MMGibbsScheduler(covariance="isotropic"),
        MMGibbsScheduler.from_config(EDMEulerScheduler().config),
    ):
        scheduler.set_timesteps(3)
        x = _sample(dtype=dtype)
        noised = scheduler.add_noise(x, torch.randn_like(x), scheduler.timesteps[:1])
        assert noised.dtype == dtype
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * scheduler.scale_model_input(x, t), t, x, generator=torch.manual_seed(0))
            x = x.prev_sample
            assert x.dtype == dtype and torch.isfinite(x.float()).all()


def test_add_noise_per_sample_timesteps_and_wrong_length() -> None:
    scheduler = MMGibbsScheduler()
    scheduler.set_timesteps(4)
    x, noise = _sample(), torch.randn(4, 3, 8, 8)
    t = scheduler.timesteps  # one per sample
    per_sample = scheduler.add_noise(x, noise, t)
    for i in range(4):
        torch.testing.assert_close(per_sample[i : i + 1], scheduler.add_noise(x[i : i + 1], noise[i : i + 1], t[i]))
    torch.testing.assert_close(scheduler.add_noise(x, noise, t[:1]), scheduler.add_noise(x, noise, t[0]))
    reference = DDPMScheduler()
    torch.testing.assert_close(per_sample, reference.add_noise(x, noise, t), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"`timesteps`.*3.*batch of 4"):
        scheduler.add_noise(x, noise, t[:3])


def test_scale_model_input_is_the_model_frame() -> None:
    """VP: identity at any timestep, before ``set_timesteps`` too (DDPMPipeline skips it, SD calls it)."""
    vp = MMGibbsScheduler()
    x = _sample()
    assert torch.equal(vp.scale_model_input(x, 0), x) and torch.equal(vp.scale_model_input(x), x)
    edm, reference = MMGibbsScheduler.from_config(EDMEulerScheduler().config), EDMEulerScheduler()
    edm.set_timesteps(4)
    reference.set_timesteps(4)
    assert edm.init_noise_sigma == pytest.approx(reference.init_noise_sigma, rel=1e-6)
    for t_ours, t_ref in zip(edm.timesteps, reference.timesteps, strict=True):
        torch.testing.assert_close(edm.scale_model_input(x, t_ours), reference.scale_model_input(x, t_ref))
        edm.step(x, t_ours, x)
        reference.step(x, t_ref, x)


def test_steps_are_deterministic_given_a_generator() -> None:
    def run(seed: int) -> torch.Tensor:
        scheduler = MMGibbsScheduler(covariance="isotropic", gibbs_sweeps=2)
        scheduler.set_timesteps(3)
        x = _sample()
        generator = torch.Generator().manual_seed(seed)
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * x, t, x, generator=generator).prev_sample
        return x

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


# ------------------------------------------------------------------------------------------ img2img / inpainting
def _timesteps_seen(unet: torch.nn.Module) -> tuple[list[float], torch.utils.hooks.RemovableHandle]:
    seen: list[float] = []

    def hook(_module, args, kwargs) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        seen.append(float(torch.as_tensor(t).flatten()[0]))

    return seen, unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(("kind", "sweeps"), [("img2img", 2), ("img2img", 3), ("inpaint", 2)])
def test_strength_starts_on_a_level_boundary_with_any_number_of_sweeps(kind: str, sweeps: int) -> None:
    """img2img/inpainting slice ``timesteps[t_start * order:]`` and ``set_begin_index(t_start * order)``:
    ``order`` is the number of sweeps, so strength 0.5 of 4 levels runs the last 2 levels, each ``sweeps`` times,
    from the level DDIM starts at (defect: order 1 started mid-level, at the wrong noise, with too many calls)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image
    from tiny_pipelines import SD_SCHEDULER_CONFIG, TINY_SD_IMAGE_SIZE, tiny_sd_components

    cls = StableDiffusionImg2ImgPipeline if kind == "img2img" else StableDiffusionInpaintPipeline
    pipe = cls(**tiny_sd_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config, covariance="isotropic", gibbs_sweeps=sweeps)
    assert pipe.scheduler.order == sweeps
    rng = np.random.default_rng(0)
    size = TINY_SD_IMAGE_SIZE
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    extra = {"mask_image": Image.fromarray(np.full((size, size), 255, dtype=np.uint8))} if kind == "inpaint" else {}
    seen, handle = _timesteps_seen(pipe.unet)
    try:
        out = pipe(
            "a red cat",
            image=image,
            strength=0.5,
            num_inference_steps=4,
            guidance_scale=2.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **extra,
        ).images
    finally:
        handle.remove()
    ddim = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    ddim.set_timesteps(4)
    expected_levels = ddim.timesteps[2:].tolist()
    assert seen == [float(t) for t in expected_levels for _ in range(sweeps)]
    assert np.isfinite(out).all()
