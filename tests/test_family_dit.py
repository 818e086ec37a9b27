"""DiT through `MomentMatchingGibbsPipeline.from_pipe`: class labels, null-class guidance, learned sigma, exactness."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DiTPipeline
from guided_gaussian import chain_law, exact_epsilon
from tiny_dit import (
    DIT_SCHEDULER_CONFIG,
    TINY_DIT_CLASSES,
    ExactClassConditional,
    tiny_dit_pipeline,
)
from tiny_pipelines import count_calls, gibbs, tiny_autoencoder_kl

from mmgibbs import GaussianMixtureDenoiser, MMGibbsScheduler, MomentMatchingGibbsPipeline
from mmgibbs.moments import denoising_moments

COVARIANCES = ["none", "isotropic", "diagonal", "projection"]


@pytest.fixture(scope="module")
def dit_pipe() -> MomentMatchingGibbsPipeline:
    pipe = gibbs(tiny_dit_pipeline())
    return pipe


def test_from_pipe_shares_components_and_keeps_id2label() -> None:
    host = tiny_dit_pipeline()
    pipe = MomentMatchingGibbsPipeline.from_pipe(host, covariance="diagonal")
    assert pipe.transformer is host.transformer and pipe.vae is host.vae
    assert pipe.config.host_pipeline == "DiTPipeline"
    family = pipe.family(pipe.scheduler)
    assert family.host.labels == host.labels  # id2label travelled through host_config
    assert family.label_ids(["goldfish", "great white shark", 7]) == [1, 3, 7]
    assert family.label_ids(torch.tensor([2, 4])) == [2, 4] and family.label_ids("tench") == [0]


def test_dit_saves_and_loads_with_its_labels(dit_pipe, tmp_path) -> None:
    """The saved folder keeps ``host_config`` (``id2label`` included) and loads with diffusers' own loader."""
    dit_pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, MomentMatchingGibbsPipeline)
    assert loaded.config.host_config == dit_pipe.config.host_config
    run = dict(class_labels=["goldfish"], num_inference_steps=2, output_type="latent")
    expected = dit_pipe(generator=torch.Generator().manual_seed(0), **run).images
    torch.testing.assert_close(loaded(generator=torch.Generator().manual_seed(0), **run).images, expected)


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_dit_every_covariance_with_and_without_guidance(dit_pipe, covariance: str, guidance_scale: float) -> None:
    seen: list[torch.Tensor] = []
    hook = dit_pipe.transformer.register_forward_hook(
        lambda _m, _a, kwargs, _o: seen.append(kwargs["class_labels"]), with_kwargs=True
    )
    try:
        with count_calls(dit_pipe.transformer) as calls:
            out = dit_pipe(
                class_labels=["goldfish", 5],
                covariance=covariance,
                guidance_scale=guidance_scale,
                num_inference_steps=2,
                gibbs_sweeps=2,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            )
    finally:
        hook.remove()
    assert out.images.shape == (2, 8, 8, 3) and (out.images >= 0).all() and (out.images <= 1).all()
    cfg = guidance_scale > 1
    assert calls == [4 if cfg else 2] * 4 and out.num_forward == 4  # both branches in one call
    assert out.num_backward == (4 if covariance in ("diagonal", "projection") else 0)
    null = TINY_DIT_CLASSES
    assert seen[0].tolist() == ([1, 5, null, null] if cfg else [1, 5])  # DiT's order: [cond, uncond]


def test_dit_legacy_transformer2d_and_latent_output() -> None:
    """DiT checkpoints name their model ``Transformer2DModel``; DiTPipeline holding one works the same."""
    pipe = gibbs(tiny_dit_pipeline(legacy=True))
    out = pipe(class_labels=[1, 2], covariance="diagonal", num_inference_steps=2, output_type="latent")
    assert out.images.shape == (2, 4, 4, 4) and torch.isfinite(out.images).all()


# ------------------------------------------------------------------------------------------------ exactness
N = 300  # samples per class
D = 64  # 4 x 4 x 4 latents
STEPS = 20


def _gaussian_case(equal: bool) -> dict[int, tuple[torch.Tensor, float]]:
    """(mean (d,), variance) per class: classes 2 and 5, and the null class 10."""
    g = torch.Generator().manual_seed(1)
    means = {c: torch.randn(D, generator=g, dtype=torch.float64) for c in (2, 5, TINY_DIT_CLASSES)}
    variances = {2: 0.25, 5: 0.25, TINY_DIT_CLASSES: 0.25} if equal else {2: 0.36, 5: 0.16, TINY_DIT_CLASSES: 0.25}
    return {c: (means[c], variances[c]) for c in means}


@pytest.mark.parametrize(
    ("covariance", "guidance_scale", "equal"),
    [
        ("isotropic", 1.0, True),
        ("isotropic", 3.0, True),
        ("diagonal", 1.0, False),
        ("diagonal", 3.0, True),
        ("diagonal", 2.0, False),
    ],
)
def test_dit_adapter_is_exact_for_gaussian_classes(covariance: str, guidance_scale: float, equal: bool) -> None:
    """A forward hook replaces the DiT's output by the exact epsilon (plus a fake learned-sigma half, 100 x the
    input, which the adapter must drop) of latents N(m_c, s_c^2 I) for each sample's class c, the null class
    included (its own Gaussian N(m_u, s_u^2 I)). The chain runs in float64 at 20 levels; each class's samples must
    have the mean and std of the chain's exact law (``guided_gaussian.chain_law``, the recursion of the affine
    guided denoiser mu_g = A y + B with the exact covariance sigma^2 A):

    * no guidance: the law is N(m_c, s_c^2 I) (asserted as well, to 1e-3 of the start's mismatch);
    * guidance with s_u = s_c = s: the guided denoiser is the exact denoiser of N(m_u + g (m_c - m_u), s^2 I) at every
      level (see ``guided_gaussian``), so the law is that Gaussian (asserted as well);
    * guidance with s_u != s_c: the guided target moves with sigma, the law is the recursion's, far from the
      tilted clean Gaussian p_u^(1-g) p_c^g (in one dimension with m_c - m_u = 1, s_c^2 = 0.36, s_u^2 = 0.25, g = 2
      and this schedule the chain ends at N(2.36, 0.53), the tilted Gaussian is N(3.57, 0.64)).

    Isotropic covariance is one scalar per level over the whole batch (Analytic-DPM), so it is exact only when every
    class (and the null class) has the same variance: its cases use equal variances. Diagonal (Hutchinson) is exact
    here for any variances, as J = A I makes every Rademacher probe exact.
    """
    host = tiny_dit_pipeline()
    host.transformer.double()
    host.vae.double()
    pipe = gibbs(host)
    case = _gaussian_case(equal)
    alphas_cumprod = DDIMScheduler(**DIT_SCHEDULER_CONFIG).alphas_cumprod.double()

    def exact(_module, args, kwargs, _output):
        x_t, t, labels = args[0], kwargs["timestep"], kwargs["class_labels"]
        m = torch.stack([case[int(c)][0] for c in labels])
        s2 = torch.tensor([case[int(c)][1] for c in labels], dtype=torch.float64)
        eps = exact_epsilon(x_t, alphas_cumprod[t], m, s2)
        return (torch.cat([eps, 100.0 * x_t], dim=1),)

    labels = [2] * N + [5] * N
    handle = pipe.transformer.register_forward_hook(exact, with_kwargs=True)
    try:
        out = pipe(
            class_labels=labels,
            covariance=covariance,
            guidance_scale=guidance_scale,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    finally:
        handle.remove()
    x = out.images.reshape(len(labels), D)
    assert x.dtype == torch.float64

    scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    rows = torch.tensor(labels)
    m_c = torch.stack([case[c][0] for c in labels])
    s2_c = torch.tensor([case[c][1] for c in labels], dtype=torch.float64)
    m_u = case[TINY_DIT_CLASSES][0].expand(len(labels), D)
    s2_u = torch.full_like(s2_c, case[TINY_DIT_CLASSES][1])
    mean, var = chain_law(scheduler, m_c, s2_c, m_u, s2_u, guidance_scale)
    if guidance_scale == 1.0 or equal:
        target = m_u + guidance_scale * (m_c - m_u)
        torch.testing.assert_close(mean, target, rtol=0, atol=1e-3)
        torch.testing.assert_close(var, s2_c, rtol=1e-3, atol=0)
    for c in (2, 5):
        sel = rows == c
        n, std = int(sel.sum()), var[sel][0].sqrt()
        error = (x[sel].mean(0) - mean[sel][0]).abs().max()
        assert error < 5 * std / n**0.5, (c, float(error), float(std))
        ratio = x[sel].std(0).mean() / std
        assert abs(float(ratio) - 1) < 0.04, (c, float(ratio))


def test_guided_exact_model_mean_and_jacobian_through_the_dit_adapter() -> None:
    """A class-conditional mixture with known moments, run through the DiT adapter's ``predict`` and the scheduler's
    ``denoiser`` in float64: three classes, each p(x | c) a 2-component anisotropic mixture on d = 8 (2 x 2 x 2
    latents); the null class answers for p(x) = sum_c pi_c p(x | c) (:class:`tiny_dit.ExactClassConditional`).

    For each branch b (conditional c, or unconditional u), Tweedie's formula gives mu_b(y) = E_b[x | y] =
    y + sigma^2 grad log p_b,sigma(y), so J_b = d mu_b / d y = I + sigma^2 Hess log p_b,sigma(y) = Cov_b[x | y] /
    sigma^2 (the second-order Tweedie identity). The guided mean mu_g = mu_u + g (mu_c - mu_u) is linear in the
    branches, hence

        mu_g = mu_u + g (mu_c - mu_u),    J_g = (1 - g) J_u + g J_c = sigma^-2 [(1 - g) Cov_u + g Cov_c],

    and ``denoising_moments(covariance="full")`` must return sigma^2 J_g projected onto the PSD cone (for g > 1 the
    guided covariance can be indefinite; the same projection is applied to the analytic one). Reverse-mode
    Jacobian products go through both branches of the one batched call.
    """
    config = {"_class_name": "DDIMScheduler", **DIT_SCHEDULER_CONFIG}
    conditionals = [
        GaussianMixtureDenoiser.random_anisotropic(
            8, 2, seed=c, spread=1.0, sample_shape=[2, 2, 2], scheduler_config=config
        )
        for c in range(3)
    ]
    model = ExactClassConditional.from_denoisers(conditionals, weights=[0.5, 0.3, 0.2])
    null = model.branches[3]
    host = DiTPipeline(transformer=model, vae=tiny_autoencoder_kl(), scheduler=DDIMScheduler(**DIT_SCHEDULER_CONFIG))
    pipe = MomentMatchingGibbsPipeline.from_pipe(host)
    scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    family = pipe.family(scheduler)
    labels = [0, 1, 2, 1]
    g = torch.Generator().manual_seed(3)
    for guidance_scale in (1.0, 3.0):
        job = family.prepare(scheduler, class_labels=labels, guidance_scale=guidance_scale, device=torch.device("cpu"))
        denoiser = scheduler.denoiser(job.predict)
        for step in (2, 5, 8, 9):
            sigma = scheduler.ve_sigmas()[step]
            y = torch.stack([conditionals[c].sample_noisy(1, sigma, g)[0] for c in labels])
            mu = denoiser(y, step)
            mu_u = null.posterior_mean(y, sigma)
            cov_u = null.posterior_covariance(y, sigma)
            mu_c = torch.stack([conditionals[c].posterior_mean(y[i : i + 1], sigma)[0] for i, c in enumerate(labels)])
            cov_c = torch.stack(
                [conditionals[c].posterior_covariance(y[i : i + 1], sigma)[0] for i, c in enumerate(labels)]
            )
            expected_mu = mu_u + guidance_scale * (mu_c - mu_u)
            expected_cov = (1 - guidance_scale) * cov_u + guidance_scale * cov_c
            evals, evecs = torch.linalg.eigh(expected_cov)
            expected_cov = (evecs * evals.clamp(min=0).unsqueeze(-2)) @ evecs.transpose(-1, -2)
            assert mu.dtype == torch.float64
            torch.testing.assert_close(mu, expected_mu, rtol=1e-9, atol=1e-9)
            moments = denoising_moments(
                lambda v, step=step, denoiser=denoiser: denoiser(v, step),
                y,
                sigma,
                covariance="full",
                jacobian="reverse",
            )
            assert moments.num_backward == 8
            torch.testing.assert_close(moments.mu, expected_mu, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(moments.variance, expected_cov, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------------------ generators, errors
def _run(pipe, labels, generator, covariance, guidance_scale=4.0):
    return pipe(
        class_labels=labels,
        covariance=covariance,
        guidance_scale=guidance_scale,
        num_inference_steps=3,
        generator=generator,
        output_type="latent",
    ).images


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_dit_generators_are_deterministic_and_per_image(dit_pipe, covariance: str) -> None:
    """A generator fixes the run; a list of generators fixes each image whatever else is in the batch, except
    with ``isotropic``, whose variance is one scalar per level estimated over the whole batch (Analytic-DPM): there
    image i depends on the other images by design, so only determinism is asserted (on this random-weight DiT the
    estimate clamps to 0 at every level, which would make the per-image check pass vacuously)."""
    first = _run(dit_pipe, [1, 3], torch.Generator().manual_seed(0), covariance)
    again = _run(dit_pipe, [1, 3], torch.Generator().manual_seed(0), covariance)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    seeds = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    batch = _run(dit_pipe, [1, 3, 7], seeds, covariance)
    alone = _run(dit_pipe, [3], [torch.Generator().manual_seed(12)], covariance)
    if covariance != "isotropic":  # batched matmuls may differ in the last bits
        torch.testing.assert_close(batch[1:2], alone, rtol=1e-4, atol=1e-5)


def test_dit_errors_are_clear(dit_pipe) -> None:
    class MyDiTPipeline(DiTPipeline):
        pass

    host = tiny_dit_pipeline()
    with pytest.raises(ValueError, match=r"does not support the pipeline MyDiTPipeline\. Supported: .*DiTPipeline"):
        MomentMatchingGibbsPipeline.from_pipe(MyDiTPipeline(host.transformer, host.vae, host.scheduler))
    with pytest.raises(ValueError, match=r"class ids in \[0, 10\).*got \[10\]"):
        dit_pipe(class_labels=[1, 10], num_inference_steps=1)
    with pytest.raises(ValueError, match="`class_labels`: 'zebra' is not a word of the pipeline's `id2label`"):
        dit_pipe(class_labels=["zebra"], num_inference_steps=1)
    with pytest.raises(ValueError, match="needs `class_labels`"):
        dit_pipe(num_inference_steps=1)
    with pytest.raises(ValueError, match="does not take `prompt`"):
        dit_pipe("a goldfish", class_labels=[1], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"2 generators were passed for 3 `class_labels`"):
        dit_pipe(class_labels=[1, 2, 3], generator=[torch.Generator()] * 2, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 4, 4, 4\)"):
        dit_pipe(class_labels=[1], latents=torch.zeros(1, 4, 8, 8), num_inference_steps=1)
    bare = MomentMatchingGibbsPipeline.from_pipe(
        DiTPipeline(host.transformer, host.vae, DDIMScheduler(**DIT_SCHEDULER_CONFIG))
    )
    with pytest.raises(ValueError, match="no `id2label`: pass class ids"):
        bare(class_labels=["goldfish"], num_inference_steps=1)
