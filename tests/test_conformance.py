"""Conformance with diffusers' scheduler contract and standard pipelines (issue 10).

Written here, not copied: each test states the property of diffusers' scheduler suite (``SchedulerCommonTest``)
or of a standard pipeline loop it checks, and most name the defect they guard against.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest
import torch
from conftest import public
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
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
        ("from-euler-karras", MMGibbsScheduler.from_config(EulerDiscreteScheduler(use_karras_sigmas=True).config)),
        (
            "from-flux",
            MMGibbsScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config),
        ),
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


# ------------------------------------------------------------------------------------------ from_config keywords
def test_from_config_refuses_a_misspelt_setting_and_names_the_close_match() -> None:
    """Defect: ``from_config(cfg, covarience="full")`` kept the default covariance silently."""
    from diffusers import EulerDiscreteScheduler

    for config in (DDPMScheduler().config, MMGibbsScheduler().config):
        with pytest.raises(TypeError, match=r"`covarience`.*Did you mean `covariance`"):
            MMGibbsScheduler.from_config(config, covarience="full")
    # an option of another scheduler than the source is no setting either
    with pytest.raises(TypeError, match=r"`use_karras_sigmas` is not a setting.*DDPMScheduler"):
        MMGibbsScheduler.from_config(DDPMScheduler().config, use_karras_sigmas=True)
    # ... while the source's own options are, and they override the config
    ours = MMGibbsScheduler.from_config(EulerDiscreteScheduler().config, use_karras_sigmas=True)
    reference = EulerDiscreteScheduler(use_karras_sigmas=True)
    ours.set_timesteps(6)
    reference.set_timesteps(6)
    torch.testing.assert_close(ours.timesteps, reference.timesteps)
    # also on the way back from another scheduler that left the option at its default
    euler = EulerDiscreteScheduler.from_config(MMGibbsScheduler().config)
    again = MMGibbsScheduler.from_config(
        euler.config, source_scheduler="EulerDiscreteScheduler", use_karras_sigmas=True, timestep_spacing="linspace"
    )
    again.set_timesteps(6)
    torch.testing.assert_close(again.timesteps, reference.timesteps)
    # keys of the config itself that MMGibbs does not use are accepted (diffusers logs them)
    config = {**DDPMScheduler().config, "variance_type": "fixed_large", "some_future_option": 3}
    assert MMGibbsScheduler.from_config(config).config.some_future_option == 3


# ------------------------------------------------------------------------------------------ levels of the source
def _distinct(t: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(len(t), dtype=torch.bool)
    keep[1:] = t[1:] != t[:-1]
    return t[keep]


def _layout_cases() -> list[tuple[str, Any, Any]]:
    """(id, source scheduler, its levels for n steps): the levels written out per class, not by our code."""
    import diffusers as d

    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    plain = _distinct  # first-order schedulers: their timesteps
    return [
        ("euler-karras", d.EulerDiscreteScheduler(**sd, use_karras_sigmas=True), plain),
        ("euler-exponential", d.EulerDiscreteScheduler(**sd, use_exponential_sigmas=True), plain),
        ("euler-beta", d.EulerDiscreteScheduler(**sd, use_beta_sigmas=True), plain),
        ("euler-trailing", d.EulerDiscreteScheduler(**sd, timestep_spacing="trailing"), plain),
        (
            "euler-ancestral-leading",
            d.EulerAncestralDiscreteScheduler(timestep_spacing="leading", steps_offset=1),
            plain,
        ),
        ("lms-karras", d.LMSDiscreteScheduler(**sd, use_karras_sigmas=True), plain),
        ("dpmsolver-karras", d.DPMSolverMultistepScheduler(**sd, use_karras_sigmas=True), plain),
        ("dpmsolver-lu-lambdas", d.DPMSolverMultistepScheduler(use_lu_lambdas=True), plain),
        ("dpmsolver-cosine-clipped", d.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2"), plain),
        ("dpmsolver-singlestep", d.DPMSolverSinglestepScheduler(**sd), plain),
        ("unipc-exponential", d.UniPCMultistepScheduler(use_exponential_sigmas=True), plain),
        ("deis", d.DEISMultistepScheduler(timestep_spacing="trailing"), plain),
        ("ddim-trailing", d.DDIMScheduler(timestep_spacing="trailing"), plain),
        ("ddim-leading-offset", d.DDIMScheduler(**sd, steps_offset=1), plain),
        ("heun-karras", d.HeunDiscreteScheduler(use_karras_sigmas=True), plain),  # t0, t1, t1, t2, t2, ...
        ("kdpm2", d.KDPM2DiscreteScheduler(), lambda t: t[::2]),  # t0, mid, t1, mid, t2, ...
        ("kdpm2-ancestral-karras", d.KDPM2AncestralDiscreteScheduler(use_karras_sigmas=True), lambda t: t[::2]),
        ("pndm", d.PNDMScheduler(**sd, steps_offset=1), "ddpm"),  # Runge-Kutta warm-up: the base grid is DDPM's
        ("edm-exponential", d.EDMEulerScheduler(sigma_schedule="exponential"), plain),
        ("edm-dpmsolver", d.EDMDPMSolverMultistepScheduler(rho=5.0), plain),
        ("flow-shift", d.FlowMatchEulerDiscreteScheduler(shift=3.0), "flow"),
        (
            "flow-terminal-karras",
            d.FlowMatchEulerDiscreteScheduler(shift_terminal=0.1, use_karras_sigmas=True),
            "flow",
        ),
        (
            "unipc-flow-sigmas",
            d.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
            "flow",
        ),
    ]


@pytest.mark.parametrize(("name", "source", "levels_of"), _layout_cases(), ids=[c[0] for c in _layout_cases()])
def test_levels_are_the_source_schedulers_own(name: str, source, levels_of) -> None:
    """The source's layout options (Karras/exponential/beta sigmas, spacing, offset, Lu lambdas, flow shift,
    ...) are honoured, not re-derived (defect: ``use_karras_sigmas`` and friends were silently ignored)."""
    config = dict(source.config)
    if name in ("kdpm2-ancestral-karras", "lms-karras"):  # the same keys, but KDPM2 rounds Karras levels
        config["_class_name"] = type(source).__name__  # as in a config loaded from disk
    ours = MMGibbsScheduler.from_config(config, gibbs_sweeps=2)
    for n in (4, 7) if name in ("dpmsolver-lu-lambdas", "pndm", "flow-terminal-karras") else (1, 4, 7):
        ours.set_timesteps(n)
        source.set_timesteps(n)
        if levels_of == "ddpm":
            ddpm = DDPMScheduler.from_config(source.config)
            ddpm.set_timesteps(n)
            expected = ddpm.timesteps.double()
        elif levels_of == "flow":  # u = 1 (pure noise) is clamped to the largest finite level, u = 1 - 1/T
            expected = _distinct(source.timesteps.double().clamp(max=999))
        else:
            expected = levels_of(source.timesteps.double())
        assert ours.num_inference_steps == len(expected), n
        torch.testing.assert_close(ours.timesteps[::2].double(), expected, rtol=0, atol=1e-6)
        assert torch.equal(ours.timesteps[::2], ours.timesteps[1::2])
        sigmas = getattr(source, "sigmas", None)
        if name.startswith(("euler", "edm", "lms")):  # sigmas that are the VE noise of the timesteps
            torch.testing.assert_close(ours.sigmas[:-1:2], sigmas[: len(expected)].float(), rtol=2e-2, atol=1e-4)


def test_a_config_that_fits_schedulers_with_different_levels_must_name_its_source() -> None:
    from diffusers import KDPM2DiscreteScheduler, LMSDiscreteScheduler

    config = KDPM2DiscreteScheduler(use_karras_sigmas=True).config  # LMS has the same keys, other levels
    with pytest.raises(ValueError, match="source_scheduler="):
        MMGibbsScheduler.from_config(config)
    ours = MMGibbsScheduler.from_config(config, source_scheduler="LMSDiscreteScheduler")
    reference = LMSDiscreteScheduler(**public(config))
    ours.set_timesteps(5)
    reference.set_timesteps(5)
    torch.testing.assert_close(ours.timesteps, reference.timesteps)


def test_steps_offset_never_repeats_a_level() -> None:
    """Defect: leading spacing with steps_offset=1 at 1000 steps clamped t=1000 to 999, repeating that level."""
    for scheduler in (
        MMGibbsScheduler.from_config(DDIMScheduler(steps_offset=1).config),
        MMGibbsScheduler(steps_offset=1),
    ):
        with pytest.raises(ValueError, match=r"steps_offset.*1"):
            scheduler.set_timesteps(1000)
        scheduler.set_timesteps(999)
        assert len(scheduler.timesteps.unique()) == 999 and int(scheduler.timesteps[0]) == 999


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda d: d.DDPMScheduler(thresholding=True), "thresholding"),
        (lambda d: d.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min"), "final_sigmas_type"),
        (
            lambda d: d.EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction"),
            "timestep_type",
        ),
        (lambda d: d.FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas"),
    ],
    ids=["thresholding", "final-sigma-min", "continuous-timesteps", "inverted-sigmas"],
)
def test_source_options_that_would_be_ignored_are_refused(make, option: str) -> None:
    """No option of the source config is silently ignored: it is honoured (the layouts above) or refused."""
    import diffusers

    source = make(diffusers)
    with pytest.raises(ValueError, match=rf"`{option}=.*not supported.*Pass `{option}="):
        MMGibbsScheduler.from_config(source.config)
    allowed = {"thresholding": False, "final_sigmas_type": "zero", "timestep_type": "discrete", "invert_sigmas": False}
    MMGibbsScheduler.from_config(source.config, **{option: allowed[option]}).set_timesteps(4)


@pytest.mark.parametrize("name", ["CMStochasticIterativeScheduler", "LCMScheduler", "TCDScheduler"])
def test_consistency_model_configs_are_refused_at_construction(name: str) -> None:
    """Defect: CM configs were mapped to EDM with a wrong model timestep; LCM/TCD to plain VP. Their models predict
    the probability-flow ODE's end point, not the posterior mean the Gibbs sampler needs."""
    import diffusers

    from mmgibbs import NoiseSchedule

    config = getattr(diffusers, name)().config
    for cfg in (config, {**config, "_class_name": name}):
        with pytest.raises(ValueError, match=r"consistency model.*posterior mean"):
            MMGibbsScheduler.from_config(cfg)
    if name == "CMStochasticIterativeScheduler":
        with pytest.raises(ValueError, match="consistency model"):
            NoiseSchedule.from_config({**config, "_class_name": name})


@pytest.fixture
def cosine_dpmsolver_class(monkeypatch):
    """The real CosineDPMSolverMultistepScheduler; torchsde, which only its ``step`` uses, stubbed if missing."""
    import importlib
    import sys
    import types

    if importlib.util.find_spec("torchsde") is None:
        monkeypatch.setitem(sys.modules, "torchsde", types.ModuleType("torchsde"))
    module = importlib.import_module("diffusers.schedulers.scheduling_cosine_dpmsolver_multistep")
    return module.CosineDPMSolverMultistepScheduler


def test_cosine_dpmsolver_config_calls_the_model_with_its_noise_conditioning(cosine_dpmsolver_class) -> None:
    """Stable Audio's cosine scheduler conditions the network on atan(sigma) * 2 / pi (defect: mapped to EDM's
    0.25 ln sigma). The timesteps, the network input and the posterior mean are the source's own functions."""
    reference = cosine_dpmsolver_class(sigma_schedule="karras", sigma_max=300.0)
    ours = MMGibbsScheduler.from_config({**reference.config, "_class_name": "CosineDPMSolverMultistepScheduler"})
    assert ours.config.noise_family == "edm" and ours.config.prediction_type == "v_prediction"
    reference.set_timesteps(6)
    ours.set_timesteps(6)
    torch.testing.assert_close(ours.timesteps, reference.timesteps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.sigmas, reference.sigmas, rtol=1e-5, atol=1e-6)
    assert ours.init_noise_sigma == pytest.approx(reference.init_noise_sigma, rel=1e-6)
    x, out = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    for i, t in enumerate(ours.timesteps):
        sigma = reference.sigmas[i]
        torch.testing.assert_close(
            t, reference.precondition_noise(sigma)[0] if sigma.ndim else reference.precondition_noise(sigma)
        )
        torch.testing.assert_close(
            ours.scale_model_input(x, t), reference.precondition_inputs(x, sigma), rtol=1e-5, atol=1e-6
        )
        mu = ours.noise_schedule.posterior_mean(out, x, t)
        torch.testing.assert_close(mu, reference.precondition_outputs(x, out, sigma), rtol=1e-5, atol=1e-5)
        ours.step(out, t, x)


# ------------------------------------------------------------------------------------------ flow models (Flux, SD3)
def test_flux_dynamic_shifting_with_sigmas_and_mu() -> None:
    """FluxPipeline: ``retrieve_timesteps(scheduler, n, device, sigmas=..., mu=...)`` with sigmas u from 1 to 1/n.
    Defect: with ``use_dynamic_shifting`` the scheduler could not even be built (levels laid out without mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    flux = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15}
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, **flux)
    ours = MMGibbsScheduler.from_config(reference.config, gibbs_sweeps=2)
    assert "sigmas" in inspect.signature(ours.set_timesteps).parameters  # retrieve_timesteps checks this
    n = 5
    sigmas = np.linspace(1.0, 1 / n, n)
    # Flux reads the shift settings from the scheduler's config
    mu = calculate_shift(1024, *(ours.config[k] for k in ("base_image_seq_len", "max_image_seq_len")), 0.5, 1.15)
    timesteps, count = retrieve_timesteps(ours, n, "cpu", sigmas=sigmas, mu=mu)
    reference.set_timesteps(sigmas=sigmas, mu=mu)
    # u = 1 (alpha = 0) has no noise level in the VE frame: the first level is the largest finite one, t = 999
    expected = reference.timesteps.clamp(max=999.0)
    assert float(reference.timesteps[0]) == 1000.0 and count == len(timesteps) == 2 * n
    torch.testing.assert_close(timesteps[::2], expected, rtol=1e-6, atol=1e-4)
    ours.set_timesteps(n, mu=mu)  # the num_inference_steps route of SD3-type pipelines
    reference.set_timesteps(n, mu=mu)
    torch.testing.assert_close(ours.timesteps[::2], reference.timesteps.clamp(max=999.0), rtol=1e-6, atol=1e-4)
    # Flux's loop: set_begin_index(0), then step with a velocity prediction
    ours.set_timesteps(sigmas=sigmas, mu=mu)
    ours.set_begin_index(0)
    latents = torch.randn(2, 16, 8)
    for t in ours.timesteps:
        latents = ours.step(torch.randn_like(latents), t, latents, return_dict=False)[0]
    assert torch.isfinite(latents).all()
    with pytest.raises(ValueError, match="mu"):
        ours.set_timesteps(n)


@pytest.mark.parametrize(
    ("config", "kwargs", "match"),
    [
        ({}, {"timesteps": []}, r"`timesteps` is empty"),
        ({}, {"timesteps": [500, float("nan")]}, r"`timesteps` contains NaN"),
        ({}, {"timesteps": [1000, 500]}, r"`timesteps`.*training steps in \[0, 999\]"),
        ({}, {"timesteps": [0.9, 0.5, 0.1]}, r"`timesteps`.*continuous times"),
        ({}, {"timesteps": [10, 20]}, r"`timesteps` must be strictly descending"),
        ({}, {"sigmas": [14.6, 1.0]}, r"`sigmas` cannot be laid out for a VP model.*`timesteps`"),
        ("edm", {"timesteps": [80.0, 10.0, 1.0]}, r"`timesteps`.*0.25 \* ln\(sigma\).*`sigmas`"),
        ("edm", {"sigmas": [80.0, -1.0]}, r"`sigmas` must be positive"),
        ("flow", {"timesteps": [1000.0, 500.0]}, r"`timesteps` includes t=1000.*pure noise"),
        ("flow", {"timesteps": [1.0, 0.5]}, r"`timesteps`.*look like u.*`sigmas`"),
        ("flow", {"sigmas": [1.5, 0.5]}, r"`sigmas`.*\(0, 1\]"),
        ({}, {"timesteps": [500, 100], "sigmas": [1.0, 0.5]}, r"at most one of `timesteps` and `sigmas`"),
        ({}, {"num_inference_steps": 3, "timesteps": [500, 100]}, r"`num_inference_steps` or `timesteps`, not both"),
        ({}, {"num_inference_steps": 3, "steps": 4}, r"unexpected keyword.*steps"),
    ],
)
def test_custom_levels_that_are_wrong_are_refused_naming_the_argument(config, kwargs: dict, match: str) -> None:
    import diffusers

    sources = {"edm": diffusers.EDMEulerScheduler(), "flow": diffusers.FlowMatchEulerDiscreteScheduler()}
    scheduler = MMGibbsScheduler.from_config(sources[config].config) if config else MMGibbsScheduler()
    with pytest.raises((ValueError, TypeError), match=match):
        scheduler.set_timesteps(**kwargs)


def test_custom_sigmas_of_each_family() -> None:
    import diffusers

    edm = MMGibbsScheduler.from_config(diffusers.EDMEulerScheduler().config)
    edm.set_timesteps(sigmas=[80.0, 10.0, 0.5])
    torch.testing.assert_close(edm.sigmas, torch.tensor([80.0, 10.0, 0.5, 0.0]), rtol=1e-6, atol=0)
    flow = MMGibbsScheduler(noise_family="flow")  # MMGibbs's own layout: FlowMatchEuler's units, u = 1 clamped
    flow.set_timesteps(sigmas=[1.0, 0.5])
    assert flow.timesteps.tolist() == [999.0, 500.0]
    euler = MMGibbsScheduler.from_config(diffusers.EulerDiscreteScheduler().config)
    reference = diffusers.EulerDiscreteScheduler()
    euler.set_timesteps(sigmas=[14.6, 3.0, 0.5])
    reference.set_timesteps(sigmas=[14.6, 3.0, 0.5])
    torch.testing.assert_close(euler.timesteps, reference.timesteps)


def test_single_level_sigma_outside_the_trained_levels() -> None:
    """VP and flow models refuse (ValueError); VE and EDM models warn (UserWarning): their formula is defined, but
    the model was not trained there. Defect: sigma=inf or 1e4 silently used a training step far from sigma."""
    for sigma in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="`sigma`"):
            MMGibbsScheduler(schedule="single_level", sigma=sigma)
    with pytest.raises(ValueError, match=r"`sigma`=10000 lies outside.*VP.*\[0.01.*157"):
        MMGibbsScheduler(schedule="single_level", sigma=1e4)
    with pytest.raises(ValueError, match=r"`sigma`=1e\+06 lies outside.*FLOW"):
        MMGibbsScheduler(schedule="single_level", sigma=1e6, noise_family="flow")
    dsm = {"noise_family": "ve", "sigma_min": 0.5, "sigma_max": 0.5, "schedule": "single_level"}
    MMGibbsScheduler(**dsm, sigma=0.5)  # the level it was trained at: no warning
    with pytest.warns(UserWarning, match=r"`sigma`=50 lies outside.*VE.*\[0.5, 0.5\]"):
        MMGibbsScheduler(**dsm, sigma=50.0)


# ------------------------------------------------------------------------------------------ standard pipelines
def test_ddim_pipeline_passes_eta_and_use_clipped_model_output() -> None:
    """DDIMPipeline calls ``step(..., eta=, use_clipped_model_output=, generator=)`` (defect: TypeError). ``eta`` is
    the ancestral transition's eta for that call: with covariance 'none', eta=0 is DDIM's deterministic step
    (the noise re-derived from the clipped mean, DDIM's use_clipped_model_output=True)."""
    from diffusers import DDIMPipeline
    from tiny_pipelines import tiny_unet2d

    pipe = DDIMPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": 2, "num_inference_steps": 5, "output_type": "np", "use_clipped_model_output": True}
    reference = pipe(**kwargs, eta=0.0, generator=torch.Generator().manual_seed(0)).images
    pipe.scheduler = MMGibbsScheduler.from_config(DDIMScheduler().config, covariance="none")  # config eta = 1
    ours = pipe(**kwargs, eta=0.0, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    ancestral = pipe(**kwargs, eta=1.0, generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(ancestral).all() and not np.allclose(ancestral, ours, atol=1e-3)
    assert pipe.scheduler.config.eta == 1.0  # a per-call eta does not change the config
    kwargs["use_clipped_model_output"] = False  # not possible with clip_sample: the noise comes from the clipped x
    with pytest.warns(UserWarning, match="use_clipped_model_output=False"):
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    scheduler = MMGibbsScheduler()
    scheduler.set_timesteps(2)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="`eta`"):
        scheduler.step(x, scheduler.timesteps[0], x, eta=2.0)
    with pytest.raises(TypeError, match=r"unexpected keyword.*etta"):
        scheduler.step(x, scheduler.timesteps[0], x, etta=0.0)
    with pytest.raises(ValueError, match="`variance_noise`"):
        scheduler.step(x, scheduler.timesteps[0], x, variance_noise=x)


def test_score_sde_ve_pipeline_is_refused_before_any_model_call() -> None:
    """ScoreSdeVePipeline runs a predictor-corrector loop (set_sigmas, step_correct, step_pred): refused at its
    first call into the scheduler that only that loop makes, naming what to use instead (defect: AttributeError)."""
    from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler
    from tiny_pipelines import count_calls, tiny_unet2d

    scheduler = MMGibbsScheduler.from_config(ScoreSdeVeScheduler().config)
    pipe = ScoreSdeVePipeline(unet=tiny_unet2d(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with count_calls(pipe.unet) as calls, pytest.raises(ValueError, match=r"ScoreSdeVePipeline.*MomentMatchingGibbs"):
        pipe(batch_size=1, num_inference_steps=2)
    assert calls == []
    for method in ("step_pred", "step_correct"):
        with pytest.raises(ValueError, match="predictor-corrector"):
            getattr(scheduler, method)(torch.zeros(1), 0, torch.zeros(1))


def test_latent_consistency_pipeline_is_refused_before_any_model_call() -> None:
    """LatentConsistencyModelPipeline passes ``original_inference_steps`` to ``set_timesteps``: refused there, naming
    why (defect: TypeError); an LCM scheduler config is refused at construction (see above)."""
    from diffusers import LatentConsistencyModelPipeline
    from tiny_pipelines import SD_SCHEDULER_CONFIG, count_calls, tiny_sd_components

    components = tiny_sd_components()
    components["scheduler"] = MMGibbsScheduler.from_config(DDIMScheduler(**SD_SCHEDULER_CONFIG).config)
    pipe = LatentConsistencyModelPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    with count_calls(pipe.unet) as calls, pytest.raises(ValueError, match=r"consistency models.*LCMScheduler"):
        pipe("a red cat", num_inference_steps=2, output_type="np")
    assert calls == []


def test_saved_pipeline_reloads_in_a_fresh_interpreter(tmp_path) -> None:
    """A standard pipeline saved with MMGibbsScheduler reloads with ``DiffusionPipeline.from_pretrained`` in a fresh
    interpreter, by diffusers' convention for custom components: the scheduler folder ships ``mmgibbs_scheduler.py``
    (it imports the installed package), model_index.json names it, and loading takes ``trust_remote_code=True``.
    Defect: model_index.json named the module ``mmgibbs.scheduler``, which diffusers 0.42 only finds if the caller
    imported it first."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from diffusers import DiffusionPipeline
    from tiny_pipelines import tiny_ddpm_pipeline

    pipe = tiny_ddpm_pipeline()
    pipe.scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config, covariance="none", gibbs_sweeps=2)
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == [
        "mmgibbs_scheduler",
        "MMGibbsScheduler",
    ]
    assert (folder / "scheduler" / "mmgibbs_scheduler.py").is_file()
    code = (
        "import json, sys, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "assert 'mmgibbs' not in sys.modules\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "out = pipe(batch_size=1, num_inference_steps=2, generator=g, output_type='np').images\n"
        "cls, sweeps = type(pipe.scheduler), pipe.scheduler.config.gibbs_sweeps\n"
        "print(json.dumps([cls.__module__, cls.__name__, sweeps, float(out.sum())]))\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    module, name, sweeps, total = json.loads(done.stdout.strip().splitlines()[-1])
    assert (module, name, sweeps) == ("mmgibbs.scheduler", "MMGibbsScheduler", 2)
    expected = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert total == pytest.approx(float(expected.images.sum()), rel=1e-5)
    # in this interpreter too; without trust_remote_code diffusers says to pass it
    again = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(again.scheduler) is MMGibbsScheduler and public(again.scheduler.config) == public(
        pipe.scheduler.config
    )
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(folder)


def test_a_passed_scheduler_is_accepted_without_remote_code(tmp_path) -> None:
    """Passing the scheduler object skips the folder's loader file; diffusers then checks its type against the
    library model_index.json names, which importing mmgibbs makes resolvable."""
    from diffusers import DiffusionPipeline
    from tiny_pipelines import tiny_ddpm_pipeline

    pipe = tiny_ddpm_pipeline()
    pipe.scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    scheduler = MMGibbsScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    loaded = DiffusionPipeline.from_pretrained(tmp_path, scheduler=scheduler)
    assert loaded.scheduler is scheduler
