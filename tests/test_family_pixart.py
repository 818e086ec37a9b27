"""PixArt-alpha / -sigma through `MomentMatchingGibbsPipeline.from_pipe`: T5 prompts with attention masks, guidance,
learned sigma, resolution binning, exactness."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
from guided_gaussian import chain_law, exact_epsilon
from tiny_pipelines import count_calls, gibbs
from tiny_pixart import PIXART_SCHEDULER_CONFIG, tiny_pixart_pipeline, tiny_pixart_transformer

from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline

COVARIANCES = ["none", "isotropic", "diagonal", "projection"]
QUIET = dict(clean_caption=False, use_resolution_binning=False, max_sequence_length=16)


@pytest.fixture(scope="module")
def pixart_pipe() -> MomentMatchingGibbsPipeline:
    pipe = gibbs(tiny_pixart_pipeline())
    return pipe


@pytest.mark.parametrize("sigma", [False, True])
def test_from_pipe_shares_the_components(sigma: bool) -> None:
    host = tiny_pixart_pipeline(sigma=sigma)
    pipe = MomentMatchingGibbsPipeline.from_pipe(host, covariance="diagonal")
    assert pipe.transformer is host.transformer and pipe.text_encoder is host.text_encoder and pipe.vae is host.vae
    assert pipe.config.host_pipeline == type(host).__name__
    out = pipe("a red cat", num_inference_steps=2, output_type="np", **QUIET)
    assert out.images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_pixart_every_covariance_with_and_without_guidance(
    pixart_pipe, covariance: str, guidance_scale: float
) -> None:
    seen: list[dict] = []
    hook = pixart_pipe.transformer.register_forward_hook(
        lambda _m, _a, kwargs, _o: seen.append(kwargs), with_kwargs=True
    )
    try:
        with count_calls(pixart_pipe.transformer) as calls:
            out = pixart_pipe(
                ["a red cat", "a blue dog on grass"],
                covariance=covariance,
                guidance_scale=guidance_scale,
                num_inference_steps=2,
                gibbs_sweeps=2,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
                **QUIET,
            )
    finally:
        hook.remove()
    assert out.images.shape == (2, 16, 16, 3) and (out.images >= 0).all() and (out.images <= 1).all()
    cfg = guidance_scale > 1
    assert calls == [4 if cfg else 2] * 4 and out.num_forward == 4  # both branches in one call
    assert out.num_backward == (4 if covariance in ("diagonal", "projection") else 0)
    kwargs = seen[0]
    # T5 tokens with </s>: "" -> 1, "a red cat" -> 4, "a blue dog on grass" -> 6; the host's order [neg, pos]
    assert kwargs["encoder_attention_mask"].sum(-1).tolist() == ([1, 1, 4, 6] if cfg else [4, 6])
    assert kwargs["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}


def test_pixart_images_per_prompt_embeds_and_sigma_host() -> None:
    host = tiny_pixart_pipeline(sigma=True)
    pipe = gibbs(host)
    embeds, mask, negative, negative_mask = host.encode_prompt("a red cat", True, max_sequence_length=16)
    with count_calls(pipe.transformer) as calls:
        out = pipe(
            prompt_embeds=embeds,
            prompt_attention_mask=mask,
            negative_prompt_embeds=negative,
            negative_prompt_attention_mask=negative_mask,
            num_images_per_prompt=2,
            covariance="diagonal",
            num_inference_steps=2,
            output_type="latent",
            use_resolution_binning=False,
        )
    assert out.images.shape == (2, 4, 8, 8) and torch.isfinite(out.images).all() and calls == [4, 4]


def test_pixart_alpha_1024_models_get_resolution_and_aspect_ratio() -> None:
    """PixArt-alpha's host conditions its sample_size-128 (1024 px) models on the size; so does the adapter (run
    here on small latents: the model's positional embedding adapts to the size)."""
    host = tiny_pixart_pipeline()
    host.transformer = tiny_pixart_transformer(sample_size=128, heads=3)
    pipe = MomentMatchingGibbsPipeline.from_pipe(host)
    pipe.set_progress_bar_config(disable=True)
    seen: list[dict] = []
    hook = pipe.transformer.register_forward_hook(lambda _m, _a, kw, _o: seen.append(kw), with_kwargs=True)
    try:
        pipe("a cat", height=16, width=24, num_inference_steps=1, output_type="latent", **QUIET)
    finally:
        hook.remove()
    added = seen[0]["added_cond_kwargs"]
    assert added["resolution"].tolist() == [[16.0, 24.0]] * 2 and added["aspect_ratio"].shape == (2, 1)


def test_pixart_resolution_binning_uses_the_hosts_bins_and_resizes_back() -> None:
    """sample_size 32 has PixArt's 256 px bins: 64 x 64 asks for the square bin, 256 x 256 (32 x 32 latents with a
    factor-8 VAE); the images come back at 64 x 64, as the host resizes them."""
    pipe = MomentMatchingGibbsPipeline.from_pipe(tiny_pixart_pipeline(binning=True))
    pipe.set_progress_bar_config(disable=True)
    run = dict(height=64, width=64, num_inference_steps=1, clean_caption=False, max_sequence_length=16)
    assert pipe("a cat", output_type="latent", **run).images.shape == (1, 4, 32, 32)
    assert pipe("a cat", output_type="np", **run).images.shape == (1, 64, 64, 3)


# ------------------------------------------------------------------------------------------------ exactness
N = 200  # samples per prompt
D = 256  # 4 x 8 x 8 latents
STEPS = 20
#: condition by the prompt's token count (with </s>): "" -> 1, "a red cat" -> 4, "a blue dog on grass" -> 6
PROMPTS = {4: "a red cat", 6: "a blue dog on grass"}


@pytest.mark.parametrize(
    ("covariance", "guidance_scale", "equal"),
    [("isotropic", 1.0, True), ("isotropic", 4.5, True), ("diagonal", 1.0, False), ("diagonal", 2.0, False)],
)
def test_pixart_adapter_is_exact_for_gaussian_prompts(covariance: str, guidance_scale: float, equal: bool) -> None:
    """As ``test_family_dit.test_dit_adapter_is_exact_for_gaussian_classes``, per prompt: a forward hook gives the
    exact epsilon of latents N(m_p, s_p^2 I) for each row's prompt (recognised by its attention mask), the negative
    prompt "" included, plus a fake learned-sigma half the adapter must drop. In float64 at 20 levels each prompt's
    samples have the mean and std of the chain's exact law (``guided_gaussian.chain_law``); without guidance, and
    with guidance when all variances are equal, that law is the (guided) Gaussian itself: N(m_p, s_p^2 I), or
    N(m_u + g (m_p - m_u), s^2 I)."""
    host = tiny_pixart_pipeline()
    for part in (host.transformer, host.vae, host.text_encoder):
        part.double()
    pipe = gibbs(host)
    g = torch.Generator().manual_seed(2)
    means = {k: torch.randn(D, generator=g, dtype=torch.float64) for k in (1, 4, 6)}
    variances = {1: 0.25, 4: 0.25, 6: 0.25} if equal else {1: 0.25, 4: 0.36, 6: 0.16}
    alphas_cumprod = DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG).alphas_cumprod.double()

    def exact(_module, args, kwargs, _output):
        x_t, t = args[0], kwargs["timestep"]
        tokens = kwargs["encoder_attention_mask"].sum(-1).tolist()
        m = torch.stack([means[k] for k in tokens])
        s2 = torch.tensor([variances[k] for k in tokens], dtype=torch.float64)
        return (torch.cat([exact_epsilon(x_t, alphas_cumprod[t], m, s2), 100.0 * x_t], dim=1),)

    keys = [4] * N + [6] * N
    handle = pipe.transformer.register_forward_hook(exact, with_kwargs=True)
    try:
        out = pipe(
            [PROMPTS[k] for k in keys],
            covariance=covariance,
            guidance_scale=guidance_scale,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **QUIET,
        )
    finally:
        handle.remove()
    x = out.images.reshape(len(keys), D)
    assert x.dtype == torch.float64

    scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    m_c = torch.stack([means[k] for k in keys])
    s2_c = torch.tensor([variances[k] for k in keys], dtype=torch.float64)
    mean, var = chain_law(
        scheduler, m_c, s2_c, means[1].expand(len(keys), D), torch.full_like(s2_c, 0.25), guidance_scale
    )
    if guidance_scale == 1.0 or equal:
        torch.testing.assert_close(mean, means[1] + guidance_scale * (m_c - means[1]), rtol=0, atol=1e-3)
        torch.testing.assert_close(var, s2_c, rtol=1e-3, atol=0)
    rows = torch.tensor(keys)
    for k in PROMPTS:
        sel = rows == k
        n, std = int(sel.sum()), var[sel][0].sqrt()
        error = (x[sel].mean(0) - mean[sel][0]).abs().max()
        assert error < 5 * std / n**0.5, (k, float(error), float(std))
        ratio = x[sel].std(0).mean() / std
        assert abs(float(ratio) - 1) < 0.04, (k, float(ratio))


# ------------------------------------------------------------------------------------------------ generators, errors
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_pixart_generators_are_deterministic_and_per_image(pixart_pipe, covariance: str) -> None:
    """As for DiT: deterministic; per-image generators fix each image whatever else is in the batch, except for
    ``isotropic`` (a batch statistic), where only determinism is asserted."""

    def run(prompts, generator):
        return pixart_pipe(
            prompts, covariance=covariance, num_inference_steps=3, generator=generator, output_type="latent", **QUIET
        ).images

    first = run(["a red cat", "a dog"], torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, run(["a red cat", "a dog"], torch.Generator().manual_seed(0)), rtol=0, atol=0)
    batch = run(["a red cat", "a dog", "the grass"], [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    alone = run(["a dog"], [torch.Generator().manual_seed(2)])
    if covariance != "isotropic":  # batched matmuls may differ in the last bits
        torch.testing.assert_close(batch[1:2], alone, rtol=1e-4, atol=1e-5)


def test_pixart_errors_are_clear(pixart_pipe) -> None:
    class MyPixArtPipeline(PixArtAlphaPipeline):
        pass

    host = tiny_pixart_pipeline()
    with pytest.raises(ValueError, match=r"does not support the pipeline MyPixArtPipeline\. Supported: .*PixArtAlpha"):
        MomentMatchingGibbsPipeline.from_pipe(MyPixArtPipeline(**host.components))
    with pytest.raises(ValueError, match="pass use_resolution_binning=False"):
        pixart_pipe("a cat", num_inference_steps=1, clean_caption=False)
    with pytest.raises(ValueError, match="does not take `class_labels`"):
        pixart_pipe("a cat", class_labels=[1], num_inference_steps=1, **QUIET)
    with pytest.raises(ValueError, match="Pass `prompt` or `prompt_embeds`, not both"):
        pixart_pipe("a cat", prompt_embeds=torch.zeros(1, 16, 32), num_inference_steps=1, **QUIET)
