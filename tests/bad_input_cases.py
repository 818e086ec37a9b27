"""Every bad or unusual input the project answers, as one table: what is passed, what happens, where it is checked.

``tests/test_bad_inputs.py`` runs every case (an error must carry its message fragment, a right result must pass
its own assertions) and checks that ``docs/bad-inputs.md`` is exactly :func:`render` of this table, so the page
lists what is tested and nothing else. After changing the table, rewrite the page with

    python tests/bad_input_cases.py > docs/bad-inputs.md
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "tests", ROOT / "examples"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

CHECKPOINTS = ROOT / "examples" / "checkpoints"
DSM = CHECKPOINTS / "digits-dsm-sigma0.5"


class CommandLineError(Exception):
    """An example script's argparse error (exit code 2), with the message it printed."""


@dataclass(frozen=True)
class Case:
    """One input and what happens to it.

    Args:
        section: the page section (the surface the input is passed to).
        where: where it is checked (a method, a family, a flag).
        input: the input, as markdown.
        outcome: for an error or a warning, a fragment of its message (literally in it); for a right result, what
            is right (``run`` asserts it).
        run: makes the call, given a fresh temporary folder.
        error: the exception (or warning) class; ``None`` for a right result.
    """

    section: str
    where: str
    input: str
    outcome: str
    run: Callable[[Path], Any]
    error: type[BaseException] | None = ValueError

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-zA-Z0-9]+", "-", self.input).strip("-").lower()
        return f"{SECTIONS.index(self.section)}-{slug[:100]}"

    def happens(self) -> str:
        """The "what happens" cell of the page."""
        if self.error is None:
            return f"right result: {self.outcome}"
        kind = "error" if self.error is CommandLineError else self.error.__name__
        return f"{kind}: {self.outcome}"


# ------------------------------------------------------------------------------------------ what the cases use
def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quiet(pipe: Any) -> Any:
    """``pipe`` with its progress bar off."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def over(host: Any, **kwargs: Any) -> Any:
    """``MomentMatchingGibbsPipeline.from_pipe(host, **kwargs)``, progress bar off."""
    from mmgibbs import MomentMatchingGibbsPipeline

    return quiet(MomentMatchingGibbsPipeline.from_pipe(host, **kwargs))


@cache
def unconditional() -> Any:
    from diffusers import DDPMScheduler
    from tiny_pipelines import tiny_unet2d

    from mmgibbs import MomentMatchingGibbsPipeline

    pipe = quiet(MomentMatchingGibbsPipeline(unet=tiny_unet2d(), scheduler=DDPMScheduler()))
    return pipe


@cache
def stable_diffusion() -> Any:
    from tiny_pipelines import tiny_stable_diffusion_pipeline

    return over(tiny_stable_diffusion_pipeline())


@cache
def family(name: str) -> tuple[Any, dict[str, Any]]:
    """A tiny pipeline of a text-to-image family and the call arguments it needs."""
    size: dict[str, Any] = {"height": 16, "width": 16}
    if name == "sdxl":
        from tiny_sdxl import tiny_sdxl_pipeline

        host, size = tiny_sdxl_pipeline(), {}
    elif name == "sd3":
        from tiny_sd3 import tiny_sd3_pipeline

        host = tiny_sd3_pipeline()
    elif name == "flux":
        from tiny_flux import tiny_flux_pipeline

        host = tiny_flux_pipeline()
    else:
        from tiny_pixart import tiny_pixart_pipeline

        host, size = tiny_pixart_pipeline(), {"clean_caption": False, "use_resolution_binning": False}
    return over(host), size


def latent(pipe: Any, **kwargs: Any) -> Any:
    """One level, latent output."""
    return pipe(**{"num_inference_steps": 1, "output_type": "latent", **kwargs}).images


def stepped(model_output: Any, sample: Any, scheduler: Any = None, **kwargs: Any) -> torch.Tensor:
    """One ``MMGibbsScheduler.step`` at the first of 3 levels."""
    from mmgibbs import MMGibbsScheduler

    scheduler = scheduler or MMGibbsScheduler()
    scheduler.set_timesteps(3)
    return scheduler.step(model_output, scheduler.timesteps[0], sample, **kwargs).prev_sample


def scheduler(**kwargs: Any) -> Any:
    from mmgibbs import MMGibbsScheduler

    return MMGibbsScheduler(**kwargs)


def from_config(config: dict[str, Any], **kwargs: Any) -> Any:
    from mmgibbs import MMGibbsScheduler

    return MMGibbsScheduler.from_config(config, **kwargs)


def set_timesteps(config: dict[str, Any] | None = None, **kwargs: Any) -> None:
    from mmgibbs import MMGibbsScheduler

    (MMGibbsScheduler() if config is None else MMGibbsScheduler.from_config(config)).set_timesteps(**kwargs)


def pipeline(**kwargs: Any) -> Any:
    from mmgibbs import MomentMatchingGibbsPipeline

    return MomentMatchingGibbsPipeline(**kwargs)


def tiny_unet() -> Any:
    from tiny_pipelines import tiny_unet2d

    return tiny_unet2d()


def ddpm_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler()


def learned_variance_step(variance_type: str) -> None:
    """A 2C-channel output [F, v] of a learned-variance config steps as F alone (v is replaced)."""
    from diffusers import DDPMScheduler

    from mmgibbs import MMGibbsScheduler

    config = DDPMScheduler(variance_type=variance_type).config
    sample = torch.randn(2, 3, 8, 8, generator=_generator())
    prediction = 0.1 * torch.randn(2, 3, 8, 8, generator=_generator(1))
    output = torch.cat([prediction, torch.full_like(prediction, 123.0)], dim=1)
    got = stepped(output, sample, MMGibbsScheduler.from_config(config), generator=_generator(2))
    expected = stepped(prediction, sample, MMGibbsScheduler.from_config(config), generator=_generator(2))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def ddpm_drop_in_with_a_learned_variance_unet() -> None:
    from diffusers import DDPMPipeline, DDPMScheduler
    from tiny_pipelines import tiny_unet2d

    from mmgibbs import MMGibbsScheduler

    unet = tiny_unet2d(channels=1, attention=False)
    wide = type(unet).from_config({**unet.config, "out_channels": 2}).eval()
    pipe = DDPMPipeline(unet=wide, scheduler=DDPMScheduler(variance_type="learned_range"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config)
    images = pipe(batch_size=2, num_inference_steps=3, generator=_generator(), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def too_many_steps() -> None:
    from mmgibbs import MMGibbsScheduler

    sched, x = MMGibbsScheduler(), torch.zeros(2, 3)
    sched.set_timesteps(1)
    sched.step(x, sched.timesteps[0], x)
    sched.step(x, sched.timesteps[0], x)


def trained_betas_define_the_steps() -> None:
    assert scheduler(trained_betas=[0.01] * 10, num_train_timesteps=1000).config.num_train_timesteps == 10


def vector_model() -> Any:
    from mmgibbs import GaussianMixtureDenoiser

    pipe = quiet(pipeline(unet=GaussianMixtureDenoiser(num_components=2, dim=3), scheduler=ddpm_scheduler()))
    return pipe


def batch_follows_the_start() -> None:
    assert latent(unconditional(), latents=torch.zeros(3, 1, 8, 8)).shape == (3, 1, 8, 8)
    assert latent(unconditional(), x_init=torch.zeros(2, 1, 8, 8)).shape == (2, 1, 8, 8)


def not_differentiable(jacobian: str) -> Any:
    """The diagonal covariance of a UNet whose forward runs under ``no_grad`` (as some wrappers do)."""
    from diffusers import UNet2DModel
    from tiny_pipelines import tiny_unet2d

    class NoGradUNet(UNet2DModel):
        def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            with torch.no_grad():
                return super().forward(*args, **kwargs)

    unet = NoGradUNet.from_config(tiny_unet2d().config)
    unet.load_state_dict(tiny_unet2d().state_dict())
    pipe = quiet(pipeline(unet=unet.eval(), scheduler=ddpm_scheduler()))
    return latent(pipe, covariance="diagonal", jacobian=jacobian)


def half_precision_differences() -> Any:
    from tiny_pipelines import tiny_unet2d

    pipe = quiet(pipeline(unet=tiny_unet2d().to(torch.bfloat16), scheduler=ddpm_scheduler()))
    return latent(pipe, covariance="diagonal", jacobian="finite_difference")


def family_latents(name: str) -> None:
    """Latents of another shape than the host would draw."""
    pipe, size = family(name)
    good = latent(pipe, prompt="a cat", **size)[:1]
    bad = good[..., : good.shape[-1] // 2] if name == "flux" else good[..., :2, :2]
    latent(pipe, prompt="a cat", latents=bad.contiguous(), **size)


def family_generators(name: str) -> None:
    pipe, size = family(name)
    latent(pipe, prompt=["a", "b"], generator=[_generator()], **size)


# ------------------------------------------------------------------------------------------ the command lines
def cli(script: str, argv: list[str], tmp: Path) -> Any:
    """``<script>.parse_args(argv)`` (``{tmp}`` in argv is the temporary folder, which holds a ``file.txt``); an
    argparse error becomes a :class:`CommandLineError` with its last line."""
    (tmp / "file.txt").write_text("not a model")
    module = importlib.import_module(script)
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return module.parse_args(argv)
    except SystemExit as exit_info:
        if exit_info.code != 2:
            raise
        raise CommandLineError(err.getvalue().strip().splitlines()[-1]) from None


def main_job(argv: list[str]) -> Callable[[Path], Any]:
    return lambda tmp: cli("sample", argv, tmp)


def calibrate_job(argv: list[str]) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        (tmp / "taken").mkdir()
        (tmp / "taken" / "x").write_text("x")
        return cli("calibrate", ["--out", "{tmp}/new", *argv], tmp)

    return run


def samples_file(name: str, value: Any) -> Callable[[Path], Any]:
    """``calibrate.py --samples <tmp>/<name>`` (a .pt file of ``value``, or a .npy file of it as numpy)."""

    def run(tmp: Path) -> Any:
        path = tmp / name
        if path.suffix == ".npy":
            np.save(path, value)
        else:
            torch.save(value, path)
        return calibrate_job(["--samples", str(path), "--clusters", "2", "--rank", "2"])(tmp)

    return run


def digits_like(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=_generator(10)) * 2 - 1


def calibrated_jacobian_probes(tmp: Path) -> None:
    """A folder saved with a calibrated table samples with --covariance calibrated_jacobian --num-probes 2."""
    from sample import scheduler_settings

    pipe = quiet(pipeline(unet=tiny_unet(), scheduler=ddpm_scheduler()))
    pipe.calibrate_covariance(2, samples=digits_like(), num_clusters=2, rank=2)
    pipe.save_pretrained(tmp / "calibrated")
    argv = ["--model", str(tmp / "calibrated"), "--covariance", "calibrated_jacobian", "--num-probes", "2"]
    args = cli("sample", [*argv, "--out", "{tmp}/a.png"], tmp)
    assert scheduler_settings(args)["num_probes"] == 2


def distributed_job(argv: list[str]) -> Callable[[Path], Any]:
    return lambda tmp: cli("distributed_sample", argv, tmp)


def text_to_image_folder_without_prompt(tmp: Path) -> Any:
    from tiny_pipelines import tiny_stable_diffusion_pipeline

    tiny_stable_diffusion_pipeline().save_pretrained(tmp / "sd")
    return cli("sample", ["--model", str(tmp / "sd")], tmp)


def calibrated_folder_at_other_steps(tmp: Path) -> Any:
    """``sample.main`` over a digits-like folder calibrated for 2 steps, asked for 3."""
    import sample

    pipe = quiet(pipeline(unet=tiny_unet2d_model(), scheduler=ddpm_scheduler()))
    pipe.calibrate_covariance(2, samples=digits_like(), num_clusters=2, rank=2)
    pipe.save_pretrained(tmp / "calibrated")
    argv = ["--model", str(tmp / "calibrated"), "--covariance", "calibrated", "--eta", "0", "--steps", "3"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return sample.main([*argv, "--batch-size", "2", "--out", str(tmp / "a.png")])
    except SystemExit as exit_info:
        if exit_info.code != 2:
            raise
        raise CommandLineError(err.getvalue().strip().splitlines()[-1]) from None


def tiny_unet2d_model() -> Any:
    from tiny_pipelines import tiny_unet2d

    return tiny_unet2d()


def dit_folder_job(script: str, argv: list[str]) -> Callable[[Path], Any]:
    """``<script>.parse_args(["--model", <tmp>/dit, *argv])`` over a saved tiny DiT folder."""

    def run(tmp: Path) -> Any:
        from tiny_dit import tiny_dit_pipeline

        tiny_dit_pipeline().save_pretrained(tmp / "dit")
        extra = ["--out", "{tmp}/a.png"] if script == "sample" else []
        return cli(script, ["--model", str(tmp / "dit"), *argv, *extra], tmp)

    return run


def sd_calibration(argv: list[str]) -> Callable[[Path], Any]:
    """``calibrate.py --model <tmp>/sd <argv>`` over a saved tiny Stable Diffusion folder."""

    def run(tmp: Path) -> Any:
        from tiny_pipelines import tiny_stable_diffusion_pipeline

        tiny_stable_diffusion_pipeline().save_pretrained(tmp / "sd")
        return cli("calibrate", ["--model", str(tmp / "sd"), "--out", "{tmp}/new", *argv], tmp)

    return run


def sd_table_guidance(guidance: float | None) -> Callable[[Path], Any]:
    """A tiny SD folder calibrated from the command line at guidance 3 (2 prompts, 4 own samples each), then
    ``sample.main`` over it at ``guidance`` (None: the pipeline's default, 7.5)."""

    def run(tmp: Path) -> Any:
        import calibrate
        import sample
        from tiny_pipelines import tiny_stable_diffusion_pipeline

        tiny_stable_diffusion_pipeline().save_pretrained(tmp / "sd")
        argv = ["--prompt", "a cat", "a dog", "--guidance-scale", "3", "--num-samples", "8", "--sampler-steps", "2"]
        argv += ["--steps", "2", "--clusters", "1", "--rank", "2"]
        with contextlib.redirect_stdout(io.StringIO()):
            calibrate.main(["--model", str(tmp / "sd"), "--out", str(tmp / "cal"), *argv])
        argv = ["--model", str(tmp / "cal"), "--covariance", "calibrated", "--eta", "0", "--steps", "2"]
        argv += ["--prompt", "a cat", "--batch-size", "1", "--out", str(tmp / "a.png")]
        argv += [] if guidance is None else ["--guidance-scale", f"{guidance:g}"]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                return sample.main(argv)
        except SystemExit as exit_info:
            if exit_info.code != 2:
                raise
            raise CommandLineError(err.getvalue().strip().splitlines()[-1]) from None

    return run


def offline_hub_id(tmp: Path) -> None:
    """``HF_HUB_OFFLINE=1 python examples/sample.py --model google/ddpm-cifar10-32 --steps 2``, a subprocess run
    beside the other tests (tests/background.py)."""
    from background import result as background_run

    result, _ = background_run("offline-hub-id")
    assert result.returncode != 0
    assert "pass a local folder" in result.stderr and "--model" in result.stderr


# ------------------------------------------------------------------------------------------ the table
SECTIONS = ("MMGibbsScheduler", "MomentMatchingGibbsPipeline", "Model families", "Calibration", "Command lines")
SCHEDULER, PIPELINE, FAMILIES, CALIBRATION, COMMAND_LINES = SECTIONS
Z = torch.zeros
SAMPLE = (2, 3, 8, 8)


def _scheduler_cases() -> list[Case]:
    s = SCHEDULER
    choices = [
        ("covariance", "low_rank", "`covariance` must be one of 'none', 'isotropic'"),
        ("schedule", "x", "`schedule` must be one of 'annealed', 'single_level'; got 'x'"),
        ("transition", "x", "`transition` must be one of 'ancestral', 'gibbs'; got 'x'"),
        ("final_output", "x", "`final_output` must be one of 'sample', 'mean'; got 'x'"),
        ("jacobian", "x", "`jacobian` must be one of 'auto', 'reverse', 'forward', 'finite_difference'; got 'x'"),
        ("noise_family", "x", "`noise_family` must be one of 'vp', 've', 'edm', 'flow'; got 'x'"),
        ("prediction_type", "x", "`prediction_type` must be one of 'epsilon', 'v_prediction', 'sample'"),
    ]
    cases = [
        Case(s, "`__init__`", f"`MMGibbsScheduler({k}={v!r})`", m, lambda _, k=k, v=v: scheduler(**{k: v}))
        for k, v, m in choices
    ]
    numbers: list[tuple[dict[str, Any], str]] = [
        ({"gibbs_sweeps": 0}, "`gibbs_sweeps` must be a positive integer; got 0"),
        ({"gibbs_sweeps": True}, "`gibbs_sweeps` must be a positive integer; got True"),
        ({"num_probes": 1.5}, "`num_probes` must be a positive integer; got 1.5"),
        ({"product_batch": "2"}, "`product_batch` must be a positive integer; got '2'"),
        ({"num_train_timesteps": 0}, "`num_train_timesteps` must be an integer >= 1; got 0"),
        ({"num_train_timesteps": -5}, "`num_train_timesteps` must be an integer >= 1; got -5"),
        ({"num_train_timesteps": 1.5}, "`num_train_timesteps` must be an integer >= 1; got 1.5"),
        ({"eta": "x"}, "`eta` must be a finite number in [0, 1]; got 'x'"),
        ({"eta": None}, "`eta` must be a finite number in [0, 1]; got None"),
        ({"variance_bound": "1"}, "`variance_bound` must be positive (a number, or None for no bound); got '1'"),
        ({"variance_bound": float("nan")}, "`variance_bound` must be positive (a number, or None for no bound)"),
        ({"schedule": "single_level"}, "schedule='single_level' needs a positive noise level `sigma` (finite)"),
        ({"schedule": "single_level", "sigma": "0.5"}, "positive noise level `sigma` (finite); got '0.5'"),
        ({"schedule": "single_level", "sigma": 1e6}, "`sigma`=1e+06 lies outside the noise levels this VP model"),
        ({"beta_start": -1.0}, "`beta_start`=-1"),
        ({"beta_start": float("nan")}, "`beta_start`=nan"),
        ({"beta_end": 2.0}, "`beta_end`=2"),
        ({"trained_betas": [float("nan")] * 10}, "`trained_betas` must lie in (0, 1]"),
        ({"trained_betas": [-0.1] * 10}, "`trained_betas` must lie in (0, 1]"),
        ({"trained_betas": [1.5] * 10}, "`trained_betas` must lie in (0, 1]"),
    ]

    def shown(kwargs: dict[str, Any]) -> str:
        return ", ".join(f"{k}=[{v[0]!r}] * 10" if isinstance(v, list) else f"{k}={v!r}" for k, v in kwargs.items())

    cases += [
        Case(s, "`__init__`", f"`MMGibbsScheduler({shown(kw)})`", m, lambda _, kw=kw: scheduler(**kw))
        for kw, m in numbers
    ]
    ve = {"noise_family": "ve", "sigma_min": 0.01, "sigma_max": 50.0}
    cases += [
        Case(
            s,
            "`__init__`",
            "`MMGibbsScheduler(schedule='single_level', sigma=1e6, noise_family='ve', sigma_max=50.0)`",
            "`sigma`=1e+06 lies outside the noise levels this VE model was trained at, [0.01, 50]; its predictions "
            "there are an extrapolation",
            lambda _: scheduler(schedule="single_level", sigma=1e6, **ve),
            UserWarning,
        ),
        Case(
            s,
            "`__init__`",
            "`MMGibbsScheduler(trained_betas=[0.01] * 10, num_train_timesteps=1000)`",
            "the betas define the training steps (10), with a logged warning",
            lambda _: trained_betas_define_the_steps(),
            None,
        ),
        Case(
            s,
            "`from_config`",
            "`MMGibbsScheduler.from_config(DDPMScheduler().config, covarience='full')`",
            "`covarience` is not a setting of MMGibbsScheduler or of the source scheduler DDPMScheduler. Did you "
            "mean `covariance`?",
            lambda _: from_config(ddpm_scheduler().config, covarience="full"),
            TypeError,
        ),
        Case(
            s,
            "`from_config`",
            "`MMGibbsScheduler.from_config(42)`",
            "`config` must be a scheduler config (a dict such as `pipe.scheduler.config`); got int",
            lambda _: from_config(42),  # type: ignore[arg-type]
            TypeError,
        ),
    ]
    cases += [
        Case(
            s,
            "`from_config`",
            f"`MMGibbsScheduler.from_config({{'_class_name': '{name}'}})`",
            f"MMGibbsScheduler cannot sample a {name} config: its model is a consistency model",
            lambda _, name=name: from_config({"_class_name": name}),
        )
        for name in ("LCMScheduler", "CMStochasticIterativeScheduler", "TCDScheduler")
    ]
    timesteps: list[tuple[str, dict[str, Any], dict[str, Any] | None, str, type[BaseException]]] = [
        ("set_timesteps(4, original_inference_steps=50)", {"num_inference_steps": 4, "original_inference_steps": 50},
         None, "`original_inference_steps` is a LatentConsistencyModelPipeline argument", ValueError),
        ("set_timesteps(0)", {"num_inference_steps": 0}, None,
         "`num_inference_steps` must be a positive integer; got 0", ValueError),
        ("set_timesteps(2.5)", {"num_inference_steps": 2.5}, None,
         "`num_inference_steps` must be a positive integer; got 2.5", ValueError),
        ("set_timesteps(timesteps=[])", {"timesteps": []}, None, "`timesteps` is empty", ValueError),
        ("set_timesteps(timesteps=[900, nan])", {"timesteps": [900, float("nan")]}, None,
         "`timesteps` contains NaN or infinite values", ValueError),
        ("set_timesteps(timesteps=[1500, 500])", {"timesteps": [1500, 500]}, None,
         "`timesteps` of this VP model must be training steps in [0, 999]; got 1500.0", ValueError),
        ("set_timesteps(timesteps=[500, 900])", {"timesteps": [500, 900]}, None,
         "`timesteps` must be strictly descending (from high to low noise)", ValueError),
        ("set_timesteps(timesteps=[[900, 500]])", {"timesteps": [[900, 500]]}, None,
         "`timesteps` must be a 1-d sequence of numbers; got shape (1, 2)", ValueError),
        ("set_timesteps(timesteps=[900, 500], sigmas=[2.0, 1.0])", {"timesteps": [900, 500], "sigmas": [2.0, 1.0]},
         None, "Pass at most one of `timesteps` and `sigmas`", ValueError),
        ("set_timesteps(2, timesteps=[900, 500])", {"num_inference_steps": 2, "timesteps": [900, 500]}, None,
         "Pass `num_inference_steps` or `timesteps`, not both", ValueError),
        ("set_timesteps(3, timesteps=[900, 500])", {"num_inference_steps": 3, "timesteps": [900, 500]}, None,
         "Pass `num_inference_steps` or `timesteps`, not both", ValueError),
        ("set_timesteps(2, sigmas=[0.9, 0.5]) (a flow model)", {"num_inference_steps": 2, "sigmas": [0.9, 0.5]},
         {"_class_name": "FlowMatchEulerDiscreteScheduler"}, "Pass `num_inference_steps` or `sigmas`, not both",
         ValueError),
        ("set_timesteps(3, mu=0.5) (a VP model)", {"num_inference_steps": 3, "mu": 0.5}, None,
         "`mu` shifts flow-matching levels; this is a 'vp' model", ValueError),
        ("set_timesteps(3, foo=1)", {"num_inference_steps": 3, "foo": 1}, None,
         "set_timesteps() got unexpected keyword argument(s): foo", TypeError),
        ("set_timesteps(timesteps=[80.0, 10.0, 0.5]) (an EDM model: sigmas passed as timesteps)",
         {"timesteps": [80.0, 10.0, 0.5]}, {"_class_name": "EDMEulerScheduler"},
         "noise levels themselves go to `sigmas`", ValueError),
        ("set_timesteps(timesteps=[1000.0, 500.0]) (a flow model)", {"timesteps": [1000.0, 500.0]},
         {"_class_name": "FlowMatchEulerDiscreteScheduler"}, "`timesteps` includes t=1000: u = t / 1000 = 1 is pure "
         "noise", ValueError),
    ]  # fmt: skip
    cases += [
        Case(s, "`set_timesteps`", f"`{shown_}`", m, lambda _, kw=kw, c=c: set_timesteps(c, **kw), e)
        for shown_, kw, c, m, e in timesteps
    ]
    cases += [
        Case(s, "`set_sigmas`, `step_pred`, `step_correct`", "`scheduler.set_sigmas(10)` (ScoreSdeVePipeline's loop)",
             "ScoreSdeVePipeline runs a predictor-corrector loop (set_sigmas, step_correct, step_pred) that "
             "MMGibbsScheduler does not implement", lambda _: scheduler().set_sigmas(10)),
    ]  # fmt: skip
    outputs: list[tuple[str, Any, Any, str, type[BaseException]]] = [
        ("a numpy `model_output`", np.zeros(SAMPLE), Z(SAMPLE), "`model_output` must be a torch.Tensor; got ndarray",
         TypeError),
        ("`model_output=None`", None, Z(SAMPLE), "`model_output` must be a torch.Tensor; got NoneType", TypeError),
        ("a numpy `sample`", Z(SAMPLE), np.zeros(SAMPLE), "`sample` must be a torch.Tensor; got ndarray", TypeError),
        ("an integer `sample`", Z(2, 3), Z(2, 3, dtype=torch.long), "`sample` must be a floating-point tensor",
         TypeError),
    ]  # fmt: skip
    for shape in [(2, 1, 8, 8), (1, 3, 8, 8), (3, 8, 8), (), (2, 3, 4, 4), (3, 3, 8, 8)]:
        outputs.append(
            (f"`model_output` of shape {shape} for a (2, 3, 8, 8) `sample`", Z(shape), Z(SAMPLE),
             f"`model_output` has shape {shape} but `sample` has shape (2, 3, 8, 8)", ValueError)
        )  # fmt: skip
    outputs.append(
        ("`model_output` of shape (2, 6, 8, 8) for a (2, 3, 8, 8) `sample`, no learned variance", Z(2, 6, 8, 8),
         Z(SAMPLE), "`model_output` has 6 channels for a 3-channel `sample`: a model with a learned variance?",
         ValueError)
    )  # fmt: skip
    cases += [Case(s, "`step`", i, m, lambda _, o=o, x=x: stepped(o, x), e) for i, o, x, m, e in outputs]
    cases += [
        Case(s, "`step`", f"a (2, 6, 8, 8) `model_output` for a (2, 3, 8, 8) `sample`, `variance_type='{v}'`",
             "the first C channels are the prediction (as DDPMScheduler splits them); the learned variance is "
             "replaced by the moment-matched covariance", lambda _, v=v: learned_variance_step(v), None)
        for v in ("learned", "learned_range")
    ]  # fmt: skip
    cases += [
        Case(s, "`step`", "a (2, 9, 8, 8) `model_output`, `variance_type='learned'`",
             "`model_output` has shape (2, 9, 8, 8)",
             lambda _: stepped(Z(2, 9, 8, 8), Z(SAMPLE), from_config(ddpm_scheduler().config,
                                                                     variance_type="learned"))),
        Case(s, "`step`", "`DDPMPipeline` over a 2C-output UNet with `variance_type='learned_range'`",
             "the pipeline's own loop samples (the step used to broadcast the sample to 2C channels)",
             lambda _: ddpm_drop_in_with_a_learned_variance_unet(), None),
    ]  # fmt: skip
    x = Z(2, 3)
    cases += [
        Case(s, "`step`", f"`timestep={shown_}`", "`timestep` must be a number or a tensor",
             lambda _, t=t: _step_at(t), TypeError)
        for shown_, t in (("None", None), ("'500'", "500"), ("object()", object()))
    ]  # fmt: skip
    cases += [
        Case(s, "`step`", "`timestep=7` (not in the schedule)", "`timestep` 7.0 is not in this scheduler's timesteps",
             lambda _: _step_at(7)),
        Case(s, "`step`", "per-sample timesteps that differ", "`timestep` holds different per-sample values",
             lambda _: _step_at(torch.tensor([666, 333]))),
    ]  # fmt: skip
    generators: list[tuple[str, Any, str, type[BaseException]]] = [
        ("`generator=0`", 0, "`generator` must be a torch.Generator or a list of them (one per sample); got int",
         TypeError),
        ("a numpy `Generator`", np.random.default_rng(0), "`generator` must be a torch.Generator or a list of them",
         TypeError),
        ("`generator='seed'`", "seed", "; got str", TypeError),
        ("`generator=[torch.Generator(), 0]`", [torch.Generator(), 0], "`generator[1]` must be a torch.Generator; "
         "got int", TypeError),
        ("one generator in a list for a batch of 2", [torch.Generator()], "1 generators in `generator` for a batch "
         "of 2", ValueError),
        ("three generators for a batch of 2", [torch.Generator()] * 3, "3 generators in `generator` for a batch of 2",
         ValueError),
    ]  # fmt: skip
    cases += [
        Case(s, "`step`", i, m, lambda _, g=g: stepped(Z(SAMPLE), Z(SAMPLE), generator=g), e)
        for i, g, m, e in generators
    ]
    cases += [
        Case(s, "`step`", "`MMGibbsScheduler(covariance='diagonal')` in a pipeline's own loop",
             "covariance='diagonal' needs the model's Jacobian, which a standard pipeline loop does not give",
             lambda _: stepped(x, x, scheduler(covariance="diagonal"))),
        Case(s, "`step`", "more `step` calls than timesteps", "`step` called more often than there are timesteps",
             lambda _: too_many_steps(), IndexError),
        Case(s, "`step`", "`step(..., foo=1)`", "step() got unexpected keyword argument(s): foo",
             lambda _: stepped(x, x, foo=1), TypeError),
        Case(s, "`step`", "`step(..., variance_noise=noise)`", "`variance_noise` is not supported: the draws come "
             "from `generator`", lambda _: stepped(x, x, variance_noise=x)),
        Case(s, "`step`", "`step(..., eta=2.0)`", "`eta` must lie in [0, 1]; got 2.0",
             lambda _: stepped(x, x, eta=2.0)),
        Case(s, "`add_noise`", "a numpy `original_samples`", "`original_samples` must be a torch.Tensor; got ndarray",
             lambda _: _add_noise(x.numpy(), x, [333]), TypeError),
        Case(s, "`add_noise`", "`noise=[0.0]`", "`noise` must be a torch.Tensor; got list",
             lambda _: _add_noise(x, [0.0], [333]), TypeError),
        Case(s, "`add_noise`", "3 timesteps for a batch of 2", "`timesteps` must be one value or one per sample; "
             "got 3 for a batch of 2", lambda _: _add_noise(x, x, [1, 2, 3])),
        Case(s, "`add_noise`", "`noise` of another shape", "`noise` must have the shape of `original_samples` (2, 3)",
             lambda _: _add_noise(x, Z(2, 4), [333])),
        Case(s, "`add_noise`", "`timesteps=[5000]` (a VP model)", "`timestep` must lie in [0, 999]",
             lambda _: _add_noise(x, x, [5000])),
    ]  # fmt: skip
    return cases


def _step_at(timestep: Any) -> None:
    from mmgibbs import MMGibbsScheduler

    sched, x = MMGibbsScheduler(), torch.zeros(2, 3)
    sched.set_timesteps(3)
    sched.step(x, timestep, x)


def _add_noise(samples: Any, noise: Any, timesteps: list[int]) -> Any:
    from mmgibbs import MMGibbsScheduler

    sched = MMGibbsScheduler()
    sched.set_timesteps(3)
    return sched.add_noise(samples, noise, torch.tensor(timesteps))


def _pipeline_cases() -> list[Case]:
    p = PIPELINE
    cases = [
        Case(p, "`__init__`", "no `scheduler`", "`scheduler` is required", lambda _: pipeline(unet=tiny_unet())),
        Case(p, "`__init__`", "`scheduler={'num_train_timesteps': 1000}` (a config dict)",
             "`scheduler` must be a diffusers scheduler", lambda _: pipeline(unet=tiny_unet(),
             scheduler={"num_train_timesteps": 1000}), TypeError),
        Case(p, "`__init__`", "no denoiser", "Pass the denoiser as `unet` (UNet families) or `transformer`",
             lambda _: pipeline(scheduler=ddpm_scheduler())),
        Case(p, "`__init__`", "`unet=torch.nn.Linear(2, 2)`", "`unet` must be a diffusers model (ModelMixin, e.g. "
             "UNet2DModel); got a Linear",
             lambda _: pipeline(unet=torch.nn.Linear(2, 2), scheduler=ddpm_scheduler())),
        Case(p, "`__init__`", "`host_pipeline='FooPipeline'`", "`host_pipeline` 'FooPipeline' is not a diffusers "
             "pipeline class", lambda _: pipeline(unet=tiny_unet(), scheduler=ddpm_scheduler(),
             host_pipeline="FooPipeline")),
        Case(p, "`__init__`, `from_pipe`", "`host_pipeline='KandinskyPipeline'` (an unsupported pipeline)",
             "MomentMatchingGibbsPipeline does not support the pipeline KandinskyPipeline. Supported:",
             lambda _: pipeline(unet=tiny_unet(), scheduler=ddpm_scheduler(), host_pipeline="KandinskyPipeline")),
        Case(p, "`__init__`", "`unet=<a custom ModelMixin declaring sample_shape, called as model(sample, "
             "timestep)>`", "the unconditional family, the same samples as through `from_pipe(DDPMPipeline(unet="
             "model, ...))` (it was refused as an unsupported model)", lambda _: custom_unconditional("sample_shape"),
             None),
        Case(p, "`__init__`", "`unet=<a custom ModelMixin with in_channels and sample_size in its config>`",
             "the unconditional family", lambda _: custom_unconditional("config"), None),
        Case(p, "`__init__`", "`unet=<a custom ModelMixin with neither sample_shape nor in_channels/sample_size>`",
             "MomentMatchingGibbsPipeline does not support the model Plain", lambda _: pipeline(
             unet=custom_model("neither"), scheduler=ddpm_scheduler())),
        Case(p, "`__init__`", "`unet=<a custom ModelMixin declaring sample_shape, called as model(sample)>`",
             "`unet` (OneArgument) must be callable as model(sample, timestep)", lambda _: pipeline(
             unet=custom_model("one_argument"), scheduler=ddpm_scheduler())),
        Case(p, "`from_pipe`", "`from_pipe(sd, scheduler='DDIMScheduler')` (a string)", "`scheduler` must be a "
             "diffusers scheduler (an MMGibbsScheduler or one to convert); got str",
             lambda _: from_pipe_sd(scheduler="DDIMScheduler"), TypeError),
        Case(p, "`__init__`, `from_pipe`", "`from_pipe(sd, unet=UNet2DModel(...))` (another family's denoiser)",
             "`unet` is a UNet2DModel, the denoiser of unconditional UNet2DModel", lambda _: from_pipe_sd(
             unet=tiny_unet())),
        Case(p, "`__init__`, `from_pipe`", "`from_pipe(ddpm, unet=UNet2DConditionModel(...))`",
             "`unet` is a UNet2DConditionModel, the denoiser of Stable Diffusion 1.x/2.x", lambda _: _from_pipe_ddpm(
             unet=stable_diffusion().unet)),
        Case(p, "`__init__`, `from_pipe`", "`from_pipe(sd, unet=None, transformer=sd.unet)` (the wrong component)",
             "Stable Diffusion 1.x/2.x (UNet2DConditionModel) takes its denoiser as `unet`", lambda _: from_pipe_sd(
             unet=None, transformer=stable_diffusion().unet)),
        *(Case(p, "`DiffusionPipeline.from_pretrained`", f"`DiffusionPipeline.from_pretrained('examples/checkpoints/"
               f"{name}', trust_remote_code=True)`", "loads (as `MomentMatchingGibbsPipeline.from_pretrained` does, "
               "the same samples)", lambda _, name=name: shipped_folder_loads(name), None) for name in SHIPPED),
        Case(p, "`from_pipe`", "`from_pipe(pipe, covarience='full')`", "from_pipe got unknown arguments "
             "['covarience']: pass components", lambda _: _from_pipe_ddpm(covarience="full")),
    ]  # fmt: skip
    calls: list[tuple[str, dict[str, Any], str, type[BaseException]]] = [
        ("`eta=2`", {"eta": 2.0}, "`eta` must be a finite number in [0, 1]; got 2.0", ValueError),
        ("`covariance='low_rank'`", {"covariance": "low_rank"}, "`covariance` must be one of", ValueError),
        ("`gibbs_sweeps=0`", {"gibbs_sweeps": 0}, "`gibbs_sweeps` must be a positive integer; got 0", ValueError),
        ("`output_type='jpg'`", {"output_type": "jpg"}, "`output_type` must be one of 'pil', 'np', 'pt', 'latent'",
         ValueError),
        ("`batch_size=0`", {"batch_size": 0}, "`batch_size` must be a positive integer; got 0", ValueError),
        ("`batch_size=1.5`", {"batch_size": 1.5}, "`batch_size` must be a positive integer; got 1.5", ValueError),
        ("a numpy `latents`", {"latents": np.zeros((2, 1, 8, 8))}, "`latents` must be a torch.Tensor; got ndarray "
         "(convert it with torch.from_numpy)", TypeError),
        ("`latents=[[0.0]]`", {"latents": [[0.0]]}, "`latents` must be a torch.Tensor; got list", TypeError),
        ("complex `latents`", {"latents": Z(2, 1, 8, 8, dtype=torch.complex64)}, "`latents` must be a real-valued "
         "tensor", TypeError),
        ("`latents` of shape (2, 1, 4, 4), `batch_size=2`", {"latents": Z(2, 1, 4, 4), "batch_size": 2},
         "`latents` must have shape (2, 1, 8, 8)", ValueError),
        ("`latents` of shape (3, 1, 8, 8), `batch_size=2`", {"latents": Z(3, 1, 8, 8), "batch_size": 2},
         "`latents` must have shape (2, 1, 8, 8)", ValueError),
        ("`latents` of shape (1, 8, 8)", {"latents": Z(1, 8, 8)}, "`latents` must have shape (1, 1, 8, 8)",
         ValueError),
        ("a numpy `x_init`", {"x_init": np.zeros((2, 1, 8, 8))}, "`x_init` must be a torch.Tensor; got ndarray",
         TypeError),
        ("`x_init` of shape (2, 1, 4, 4), `batch_size=2`", {"x_init": Z(2, 1, 4, 4), "batch_size": 2},
         "`x_init` must have shape (2, 1, 8, 8)", ValueError),
        ("`x_init` of shape (1, 1, 8, 8), `batch_size=2`", {"x_init": Z(1, 1, 8, 8), "batch_size": 2},
         "`x_init` must have shape (2, 1, 8, 8)", ValueError),
        ("`x_init` and `latents`", {"x_init": Z(2, 1, 8, 8), "latents": Z(2, 1, 8, 8)}, "Pass `x_init` (a clean "
         "start, re-noised to the first level) or `latents` (the noisy start), not both", ValueError),
        ("`generator=0`", {"generator": 0, "batch_size": 2}, "`generator` must be a torch.Generator or a list",
         TypeError),
        ("a tuple of generators", {"generator": (torch.Generator(), torch.Generator()), "batch_size": 2},
         "; got tuple", TypeError),
        ("`generator=[torch.Generator(), 'x']`", {"generator": [torch.Generator(), "x"], "batch_size": 2},
         "`generator[1]` must be a torch.Generator", TypeError),
        ("two generators without `batch_size`", {"generator": [torch.Generator(), torch.Generator()]},
         "2 generators in `generator` for a batch of 1", ValueError),
        ("`prompt='a'` for an unconditional UNet", {"prompt": "a"}, "does not take `prompt`; it takes `batch_size`, "
         "`generator`, `latents`, `x_init`", ValueError),
        ("`callback_on_step_end='print'`", {"callback_on_step_end": "print"}, "`callback_on_step_end` must be "
         "callable; got str", TypeError),
        ("a callback returning a numpy sample", {"callback_on_step_end": lambda *_: {"latents": np.zeros(3)}},
         "`callback_on_step_end` returned a ndarray as 'latents'", TypeError),
        ("a callback returning 3", {"callback_on_step_end": lambda *_: 3}, "`callback_on_step_end` must return a "
         "dict (or None); got int", ValueError),
        ("a callback returning a sample of another shape", {"callback_on_step_end": lambda *_: {"latents": Z(3)}},
         "`callback_on_step_end` returned a sample of shape (3,); the sample has shape (1, 1, 8, 8)", ValueError),
        ("`callback_on_step_end_tensor_inputs=['foo']`", {"callback_on_step_end": lambda *_: None,
         "callback_on_step_end_tensor_inputs": ["foo"]}, "`callback_on_step_end_tensor_inputs` may contain "
         "['latents', 'sample', 'mu']; got ['foo']", ValueError),
    ]  # fmt: skip
    cases += [Case(p, "`__call__`", i, m, lambda _, kw=kw: latent(unconditional(), **kw), e) for i, kw, m, e in calls]
    cases += [
        Case(p, "unconditional family", "`latents` or `x_init` of N samples without `batch_size`",
             "N samples are drawn", lambda _: batch_follows_the_start(), None),
        Case(p, "`__call__`", "`variance_bound=None` per call", "no bound, as `from_pipe(pipe, "
             "variance_bound=None)` (it was taken for \"not passed\" and kept the default bound)",
             lambda _: per_call_variance_bound_none(), None),
        Case(p, "the family's `finish`", "`output_type='pil'` for vector samples", "output_type='pil' needs image "
             "samples (N, C, H, W)", lambda _: vector_model()(batch_size=2, num_inference_steps=1)),
        Case(p, "the Jacobian products (`mmgibbs.moments`)", "`jacobian='reverse'` for a network run under "
             "`no_grad`", "reverse mode: the network output does not depend differentiably",
             lambda _: not_differentiable("reverse"), RuntimeError),
        Case(p, "the Jacobian products (`mmgibbs.moments`)", "`jacobian='auto'` for a network run under `no_grad`",
             "uses forward Jacobian products because reverse: NotDifferentiableError",
             lambda _: not_differentiable("auto"), UserWarning),
        Case(p, "the Jacobian products", "`jacobian='finite_difference'` for a bfloat16 network",
             "finite differences: the network outputs torch.bfloat16", lambda _: half_precision_differences(),
             RuntimeError),
    ]  # fmt: skip
    text: list[tuple[str, dict[str, Any], str, type[BaseException]]] = [
        ("`prompt=[]`", {"prompt": []}, "`prompt` must be a string or a non-empty list of strings; got []",
         ValueError),
        ("`prompt=['a', 2]`", {"prompt": ["a", 2]}, "`prompt` must be a string or a non-empty list of strings",
         ValueError),
        ("`negative_prompt=[None]`", {"negative_prompt": [None]}, "`negative_prompt` must be a string or a non-empty "
         "list", ValueError),
        ("`num_images_per_prompt=0`", {"num_images_per_prompt": 0}, "`num_images_per_prompt` must be an integer >= "
         "1; got 0", ValueError),
        ("`num_images_per_prompt=1.5`", {"num_images_per_prompt": 1.5}, "`num_images_per_prompt` must be an integer "
         ">= 1; got 1.5", ValueError),
        ("`height=-8`", {"height": -8}, "`height` must be an integer >= 1; got -8", ValueError),
        ("`width='16'`", {"width": "16"}, "`width` must be an integer >= 1; got '16'", ValueError),
        ("`guidance_scale='7'`", {"guidance_scale": "7"}, "`guidance_scale` must be a finite number; got '7'",
         ValueError),
        ("`guidance_scale=nan`", {"guidance_scale": float("nan")}, "`guidance_scale` must be a finite number; got "
         "nan", ValueError),
        ("`guidance_rescale=-1.0`", {"guidance_rescale": -1.0}, "`guidance_rescale` must be a finite number in [0, "
         "1]; got -1.0", ValueError),
        ("`clip_skip=-1`", {"clip_skip": -1}, "`clip_skip` must be an integer >= 0; got -1", ValueError),
        ("`latents` of shape (1, 4, 4, 4)", {"latents": Z(1, 4, 4, 4)}, "`latents` must have shape (1, 4, 8, 8)",
         ValueError),
        ("`latents` of shape (1, 4, 8, 8) for two prompts", {"latents": Z(1, 4, 8, 8), "prompt": ["a", "b"]},
         "`latents` must have shape (2, 4, 8, 8)", ValueError),
        ("`latents` of shape (1, 3, 8, 8)", {"latents": Z(1, 3, 8, 8)}, "`latents` must have shape (1, 4, 8, 8)",
         ValueError),
        ("numpy `latents`", {"latents": np.zeros((1, 4, 8, 8), np.float32)}, "`latents` must be a torch.Tensor",
         TypeError),
        ("`generator=0` with a prompt", {"generator": 0}, "`generator` must be a torch.Generator", TypeError),
        ("`batch_size=2`", {"batch_size": 2}, "does not take `batch_size`", ValueError),
        ("`strength=0.5` without `image`", {"strength": 0.5}, "`strength` needs `image`", ValueError),
        ("`mask_image` without `image`", {"mask_image": torch.ones(1, 1, 16, 16)}, "`mask_image` needs `image`",
         ValueError),
        ("an image-to-image `image` with `height=16`", {"image": torch.rand(1, 3, 16, 16), "height": 16},
         "Image-to-image takes no `height`", ValueError),
        ("`strength=0.01` with one level", {"image": torch.rand(1, 3, 16, 16), "strength": 0.01},
         "`strength`=0.01 leaves none of the 1 levels to run", ValueError),
        ("inpainting `latents` of shape (1, 4, 4, 4)", {"image": torch.rand(1, 3, 16, 16), "mask_image":
         torch.ones(1, 1, 16, 16), "latents": Z(1, 4, 4, 4)}, "`latents` must have shape (1, 4, 8, 8)", ValueError),
    ]  # fmt: skip
    cases += [
        Case(p, "`__call__` (Stable Diffusion)", i, m, lambda _, kw=kw: latent(stable_diffusion(), **{"prompt":
             "a cat", **kw}), e)
        for i, kw, m, e in text
    ]  # fmt: skip
    cases += [
        Case(p, "the family (SD3)", "SD3: `mu=0.5` on a static-shift scheduler (`use_dynamic_shifting=False`)",
             "`mu` shifts the levels of a scheduler with `use_dynamic_shifting`; this one has a static shift",
             lambda _: flow_levels("sd3", mu=0.5, num_inference_steps=1)),
    ]  # fmt: skip
    for name, host in (("sd3", "SD3"), ("flux", "Flux")):
        cases += [
            Case(p, f"the family ({host})", f"{host}: `sigmas=[1.0, 0.6, 0.3]` and `num_inference_steps=5`",
                 "Pass `num_inference_steps` or `sigmas`, not both: the 3 `sigmas` are the levels",
                 lambda _, n=name: flow_levels(n, sigmas=[1.0, 0.6, 0.3], num_inference_steps=5)),
            Case(p, f"the family ({host})", f"{host}: `sigmas=[1.0, 0.6, 0.3]` alone", "3 levels (3 model calls)",
                 lambda _, n=name: sigmas_alone(n), None),
        ]  # fmt: skip
    for name, host in (("sdxl", "SDXL"), ("sd3", "SD3"), ("flux", "Flux"), ("pixart", "PixArt")):
        cases += [
            Case(p, f"the family ({host})", f"{host}: `latents` of another shape than the host draws",
                 "`latents` must have shape (1, ", lambda _, n=name: family_latents(n)),
            Case(p, f"the host's `prepare_latents` ({host})", f"{host}: one generator in a list for two prompts",
                 "You have passed a list of generators of length 1, but requested an effective batch size of 2",
                 lambda _, n=name: family_generators(n)),
        ]  # fmt: skip
    return cases


def custom_model(kind: str) -> Any:
    """A custom diffusers model (``ModelMixin``) called as UNet2DModel is, ``model(sample, timestep)``: it declares
    ``sample_shape`` (``kind="sample_shape"``), or has ``in_channels``/``sample_size`` in its config
    (``"config"``), or neither (``"neither"``), or takes ``model(sample)`` only (``"one_argument"``)."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class Denoiser(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, in_channels: int = 1, sample_size: int = 8, declare: bool = True):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))
            if declare:
                self.sample_shape = (in_channels, sample_size, sample_size)

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.scale * sample,)

    class Plain(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width: int = 8):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.scale * sample,)

    class OneArgument(Denoiser):
        def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor]:  # type: ignore[override]
            return (self.scale * sample,)

    if kind == "neither":
        return Plain()
    if kind == "one_argument":
        return OneArgument()
    return Denoiser(declare=kind == "sample_shape")


def custom_unconditional(kind: str) -> None:
    """The constructor takes the custom model as the unconditional family, as ``from_pipe(DDPMPipeline(unet=model,
    ...))`` does, with the same samples."""
    from diffusers import DDPMPipeline

    model = custom_model(kind)
    direct = quiet(pipeline(unet=model, scheduler=ddpm_scheduler()))
    hosted = over(DDPMPipeline(unet=model, scheduler=ddpm_scheduler()))
    kwargs = {"batch_size": 2, "num_inference_steps": 3, "output_type": "latent"}
    a, b = direct(**kwargs, generator=_generator(4)).images, hosted(**kwargs, generator=_generator(4)).images
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, b)


def from_pipe_sd(**kwargs: Any) -> Any:
    from tiny_pipelines import tiny_stable_diffusion_pipeline

    from mmgibbs import MomentMatchingGibbsPipeline

    return MomentMatchingGibbsPipeline.from_pipe(tiny_stable_diffusion_pipeline(), **kwargs)


def per_call_variance_bound_none() -> None:
    """``variance_bound=None`` per call lifts the bound, as ``from_pipe(..., variance_bound=None)`` does."""
    from mmgibbs import MomentMatchingGibbsPipeline

    pipe = unconditional()
    lifted = MomentMatchingGibbsPipeline.from_pipe(pipe, variance_bound=None)
    kwargs = {"batch_size": 4, "num_inference_steps": 3, "output_type": "latent"}
    per_call = pipe(**kwargs, variance_bound=None, generator=_generator(3)).images
    assert torch.equal(per_call, lifted(**kwargs, generator=_generator(3)).images)
    assert not torch.equal(per_call, pipe(**kwargs, generator=_generator(3)).images)  # the default bound, 1


def flow_levels(name: str, **kwargs: Any) -> Any:
    """A call of a flow-matching family (``"sd3"``, ``"flux"``) at 16 x 16 pixels; returns its model calls."""
    from tiny_pipelines import count_calls

    pipe, size = family(name)
    with count_calls(pipe.transformer) as calls:
        pipe("a cat", output_type="latent", guidance_scale=1.0, **size, **kwargs)
    return calls


def sigmas_alone(name: str) -> None:
    assert len(flow_levels(name, sigmas=[1.0, 0.6, 0.3])) == 3


def shipped_folder_loads(name: str) -> None:
    """A shipped pipeline folder loads with diffusers' own loader, as saved pipelines do, and samples as it does
    through its own class."""
    from diffusers import DiffusionPipeline

    from mmgibbs import MomentMatchingGibbsPipeline

    folder = CHECKPOINTS / name
    loaded = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    own = MomentMatchingGibbsPipeline.from_pretrained(folder)
    for pipe in (loaded, own):
        pipe.set_progress_bar_config(disable=True)
    if isinstance(loaded, MomentMatchingGibbsPipeline):
        assert type(loaded.scheduler).__name__ == "MMGibbsScheduler"
        kwargs = {"batch_size": 2, "num_inference_steps": 3, "output_type": "latent"}
        a, b = loaded(**kwargs, generator=_generator(11)).images, own(**kwargs, generator=_generator(11)).images
        assert torch.equal(a, b)


SHIPPED = sorted(path.parent.name for path in CHECKPOINTS.glob("*/model_index.json"))


def _from_pipe_ddpm(**kwargs: Any) -> Any:
    from tiny_pipelines import tiny_ddpm_pipeline

    from mmgibbs import MomentMatchingGibbsPipeline

    return MomentMatchingGibbsPipeline.from_pipe(tiny_ddpm_pipeline(), **kwargs)


# ------------------------------------------------------------------------------------------ model families
@cache
def inpainting_unet_pipeline() -> Any:
    from tiny_sdxl import tiny_sd_inpaint_pipeline

    return over(tiny_sd_inpaint_pipeline())


@cache
def dit() -> Any:
    from tiny_dit import tiny_dit_pipeline

    return over(tiny_dit_pipeline())


def images(n: int, seed: int = 7) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=_generator(seed))


def one_image_per_prompt(mask: bool) -> None:
    """Two images for two prompts, two images per prompt: image i goes with prompt i (diffusers' img2img host
    tiles the images, [i0, i1, i0, i1], against the prompts' [p0, p0, p1, p1]); with per-image generators each
    prompt's pair is what that prompt and image give alone."""
    pipe = stable_diffusion()
    extra = {"mask_image": torch.ones(2, 1, 16, 16)} if mask else {"strength": 0.5}
    both = latent(pipe, prompt=["a red cat", "a blue dog"], image=images(2), num_images_per_prompt=2,
                  generator=[_generator(s) for s in range(4)], num_inference_steps=2, **extra)  # fmt: skip
    for k, prompt in enumerate(["a red cat", "a blue dog"]):  # the prompt's image once per generated image
        one = {key: value[[k, k]] for key, value in extra.items() if isinstance(value, torch.Tensor)}
        alone = latent(pipe, prompt=prompt, image=images(2)[[k, k]], num_images_per_prompt=2,
                       generator=[_generator(2 * k + s) for s in range(2)], num_inference_steps=2,
                       **{**extra, **one})  # fmt: skip
        torch.testing.assert_close(both[2 * k : 2 * k + 2], alone, rtol=1e-4, atol=1e-5)


def prompt_embeddings(name: str, argument: str, value: Callable[[torch.Tensor], Any]) -> Any:
    """``name``'s pipeline called with ``argument`` (an embedding the host's ``encode_prompt`` made, changed by
    ``value``) and the embeddings it needs beside it."""
    pipe, size = (stable_diffusion(), {}) if name == "sd" else family(name)
    host = pipe.family(pipe.scheduler).host
    if name == "sd":
        embeds = {"prompt_embeds": host.encode_prompt("a cat", "cpu", 1, False)[0]}
    elif name == "sdxl":
        positive, _, pooled, _ = host.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
        embeds = {"prompt_embeds": positive, "pooled_prompt_embeds": pooled}
    elif name == "sd3":
        positive, _, pooled, _ = host.encode_prompt("a cat", None, None, do_classifier_free_guidance=False)
        embeds = {"prompt_embeds": positive, "pooled_prompt_embeds": pooled}
    elif name == "flux":
        positive, pooled, _ = host.encode_prompt("a cat", None, max_sequence_length=8)
        embeds = {"prompt_embeds": positive, "pooled_prompt_embeds": pooled}
    else:
        positive, mask, _, _ = host.encode_prompt("a cat", False, clean_caption=False, max_sequence_length=8)
        embeds = {"prompt_embeds": positive, "prompt_attention_mask": mask}
    embeds[argument] = value(embeds[argument])
    return latent(pipe, guidance_scale=1.0, **size, **embeds)


def same_start(image: Any, reference: Any, mask: bool = False) -> None:
    """Image-to-image (or inpainting) from ``image`` draws what it draws from ``reference``, and a float image
    in [0, 1] is not ``image`` itself read as floats."""
    keep_left = torch.zeros(1, 1, 16, 16)
    keep_left[..., 8:] = 1.0  # repaint the right half: the image's left half is kept, so the image matters
    extra = {"mask_image": keep_left} if mask else {"strength": 0.5}

    def run(start: Any) -> torch.Tensor:
        return latent(stable_diffusion(), prompt="a cat", image=start, num_inference_steps=2,
                      generator=_generator(6), **extra)  # fmt: skip

    torch.testing.assert_close(run(image), run(reference), rtol=1e-5, atol=1e-6)


def uint8_image(kind: str) -> None:
    from PIL import Image

    rgb = (torch.rand(16, 16, 3, generator=_generator(8)) * 255).round().to(torch.uint8)
    rgba = torch.cat([rgb, torch.full((16, 16, 1), 77, dtype=torch.uint8)], dim=-1)
    unit = rgb.float() / 255  # the same picture in [0, 1], HWC
    if kind == "numpy":
        same_start(rgb.numpy()[None], unit.numpy()[None])
    elif kind == "tensor":
        same_start(rgb.permute(2, 0, 1)[None], unit.permute(2, 0, 1)[None])
    elif kind == "inpaint":
        same_start(rgb.numpy()[None], unit.numpy()[None], mask=True)
    elif kind == "rgba-pil":
        same_start(Image.fromarray(rgba.numpy(), "RGBA"), Image.fromarray(rgb.numpy(), "RGB"))
    elif kind == "rgba-numpy":
        same_start(rgba.numpy()[None], unit.numpy()[None])
    else:  # grayscale PIL: read as RGB, as diffusers' do_convert_rgb would
        gray = Image.fromarray(rgb.numpy()[..., 0], "L")
        same_start(gray, gray.convert("RGB"))


def sdxl_negative_prompt_2() -> None:
    """`negative_prompt_2` alone is used, with "" for the first text encoder (the host zeroed the negative branch
    when `negative_prompt` was None and force_zeros_for_empty_prompt, dropping it)."""
    pipe, _ = family("sdxl")

    def run(**kwargs: Any) -> torch.Tensor:
        return latent(pipe, prompt="a cat", guidance_scale=5.0, generator=_generator(9), **kwargs)

    alone = run(negative_prompt_2="a dog")
    assert torch.equal(alone, run(negative_prompt="", negative_prompt_2="a dog"))
    assert not torch.equal(alone, run())


def dit_labels(labels: Any) -> torch.Tensor:
    return latent(dit(), class_labels=labels, generator=_generator(5))


def prompt_and_embeds() -> None:
    """Both forms of a prompt, refused by calibration and by the call alike, before any model call (the case's
    error is the call's)."""
    pipe, embeds = stable_diffusion(), torch.zeros(1, 77, 32)
    for calibrate, negative in ((True, False), (False, True)):
        arguments = {"negative_prompt": "x", "negative_prompt_embeds": embeds} if negative else {}
        arguments |= {"prompt": "a cat"} if negative else {"prompt": "a cat", "prompt_embeds": embeds}
        try:
            if calibrate:
                pipe.calibrate_covariance(1, samples=torch.zeros(2, 4, 8, 8), num_clusters=1, **arguments)
            else:
                latent(pipe, **arguments)
        except ValueError as err:
            expected = "`negative_prompt` or `negative_prompt_embeds`" if negative else "`prompt` or `prompt_embeds`"
            assert f"Pass {expected}, not both" in str(err), err
        else:
            raise AssertionError(f"{arguments} was not refused")
    latent(pipe, prompt="a cat", prompt_embeds=embeds)


def numpy_label() -> None:
    assert torch.equal(dit_labels(np.int64(3)), dit_labels(3))
    assert torch.equal(dit_labels(np.array([3])), dit_labels([3]))


def energy_model() -> Any:
    from tiny_pipelines import tiny_unet2d

    from mmgibbs import NetworkEnergy

    return NetworkEnergy.from_network(tiny_unet2d(sample_size=4), "quadratic")


def energy_call(**kwargs: Any) -> Any:
    """One single-level sweep of a tiny energy model; an error must come before the network is called."""
    from tiny_pipelines import count_calls

    from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline

    model = energy_model()
    pipe = quiet(MomentMatchingGibbsPipeline(unet=model, scheduler=MMGibbsScheduler(noise_family="ve",
                 schedule="single_level", sigma=0.5)))  # fmt: skip
    with count_calls(model.network) as calls:
        try:
            return latent(pipe, batch_size=2, **kwargs)
        except ValueError:
            assert calls == [], f"{len(calls)} model calls before the error"
            raise


def energy_full() -> None:
    from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline

    pipe = quiet(MomentMatchingGibbsPipeline(unet=energy_model(), scheduler=MMGibbsScheduler(noise_family="ve",
                 schedule="single_level", sigma=0.5)))  # fmt: skip
    out = pipe(batch_size=2, num_inference_steps=1, covariance="full", output_type="latent")
    assert out.images.shape == (2, 1, 4, 4) and torch.isfinite(out.images).all()
    assert (out.num_forward, out.num_backward) == (1, 16)


def network_energy(**kwargs: Any) -> Any:
    from mmgibbs import NetworkEnergy

    return NetworkEnergy(**{"network_config": {"in_channels": 1, "out_channels": 1, "sample_size": 4}, **kwargs})


def _family_cases() -> list[Case]:
    f = FAMILIES
    mask = torch.ones(1, 1, 16, 16)
    nine = [
        ("a 9-channel inpainting UNet called with a prompt only", {}),
        ("a 9-channel inpainting UNet called with `image` but no `mask_image`", {"image": images(1)}),
    ]
    cases = [
        Case(f, "Stable Diffusion, SDXL (before the host's `prepare_latents`)", i, "This UNet takes 9 input channels "
             "(latents, mask, masked-image latents: an inpainting UNet); pass `mask_image` (and `image`)",
             lambda _, kw=kw: latent(inpainting_unet_pipeline(), prompt="a cat", num_inference_steps=2, **kw))
        for i, kw in nine
    ]  # fmt: skip
    cases += [
        Case(f, "Stable Diffusion, SDXL (image-to-image)", "two images for one prompt", "`image` holds 2 images for 1 "
             "generated image (1 prompt x num_images_per_prompt=1): pass one, one per prompt or one per generated "
             "image",
             lambda _: latent(stable_diffusion(), prompt="a cat", image=images(2), num_inference_steps=2)),
        Case(f, "Stable Diffusion, SDXL (inpainting)", "two images for one prompt, inpainting", "`image` holds 2 "
             "images for 1 generated image", lambda _: latent(stable_diffusion(), prompt="a cat", image=images(2),
             mask_image=mask)),
        Case(f, "Stable Diffusion, SDXL (inpainting)", "three masks for two prompts", "`mask_image` holds 3 images "
             "for 2 generated images (2 prompts x num_images_per_prompt=1)", lambda _: latent(stable_diffusion(),
             prompt=["a", "b"], image=images(2), mask_image=torch.ones(3, 1, 16, 16))),
        Case(f, "Stable Diffusion, SDXL (image-to-image)", "two images for two prompts, `num_images_per_prompt=2`",
             "image i goes with prompt i (the host paired them [i0, i1, i0, i1] with [p0, p0, p1, p1])",
             lambda _: one_image_per_prompt(mask=False), None),
        Case(f, "Stable Diffusion, SDXL (inpainting)", "two images and masks for two prompts, "
             "`num_images_per_prompt=2`, inpainting", "image and mask i go with prompt i",
             lambda _: one_image_per_prompt(mask=True), None),
    ]  # fmt: skip
    numpy, flat, narrow = "as a numpy array", "of another shape", "of the wrong width"
    embeds: list[tuple[str, str, str, str, Callable[[torch.Tensor], Any], str, type[BaseException]]] = [
        ("sd", "Stable Diffusion", "prompt_embeds", numpy, lambda e: e.detach().numpy(), "`prompt_embeds` must be a "
         "torch.Tensor; got ndarray", TypeError),
        ("sd", "Stable Diffusion", "prompt_embeds", "2-d", lambda e: e[0], "`prompt_embeds` must be a 3-d tensor "
         "(batch, sequence, width); got shape (16, 32)", ValueError),
        ("sd", "Stable Diffusion", "prompt_embeds", narrow, lambda e: e[..., :5], "`prompt_embeds` must have width "
         "32 (the unet's cross_attention_dim); got 5", ValueError),
        ("sdxl", "SDXL", "prompt_embeds", narrow, lambda e: e[..., :5], "`prompt_embeds` must have width 64 (the "
         "unet's cross_attention_dim); got 5", ValueError),
        ("sdxl", "SDXL", "pooled_prompt_embeds", flat, lambda e: e[None], "`pooled_prompt_embeds` must be a 2-d "
         "tensor (batch, width)", ValueError),
        ("sd3", "SD3", "prompt_embeds", narrow, lambda e: e[..., :5], "`prompt_embeds` must have width 64 (the "
         "transformer's joint_attention_dim); got 5", ValueError),
        ("sd3", "SD3", "pooled_prompt_embeds", narrow, lambda e: e[..., :5], "`pooled_prompt_embeds` must have "
         "width 64 (the transformer's pooled_projection_dim); got 5", ValueError),
        ("flux", "Flux", "prompt_embeds", narrow, lambda e: e[..., :5], "`prompt_embeds` must have width 32 (the "
         "transformer's joint_attention_dim); got 5", ValueError),
        ("pixart", "PixArt", "prompt_embeds", narrow, lambda e: e[..., :5], "`prompt_embeds` must have width 32 (the "
         "transformer's caption_channels); got 5", ValueError),
    ]  # fmt: skip
    cases += [
        Case(f, f"{host} (before the host's `check_inputs`)", f"{host}: `{argument}` {what}", m,
             lambda _, n=name, a=argument, v=value: prompt_embeddings(n, a, v), e)
        for name, host, argument, what, value, m, e in embeds
    ]  # fmt: skip
    pixels = [
        ("a uint8 numpy `image` (N, H, W, 3) in [0, 255]", "numpy"),
        ("a uint8 tensor `image` (N, 3, H, W) in [0, 255]", "tensor"),
        ("a uint8 numpy `image` for inpainting", "inpaint"),
    ]
    cases += [
        Case(f, "Stable Diffusion, SDXL (`mmgibbs.checks.pixel_images`)", i, "scaled from [0, 255]: the same as "
             "the float image / 255 (it was normalised as if in [0, 1], to values up to 509)",
             lambda _, k=k: uint8_image(k), None)
        for i, k in pixels
    ]  # fmt: skip
    cases += [
        Case(f, "Stable Diffusion, SDXL (`mmgibbs.checks.pixel_images`)", "an RGBA PIL `image`", "converted to RGB "
             "(alpha dropped), as the RGB image (it was taken as four latent channels)",
             lambda _: uint8_image("rgba-pil"), None),
        Case(f, "Stable Diffusion, SDXL (`mmgibbs.checks.pixel_images`)", "a uint8 numpy RGBA `image` (N, H, W, 4)",
             "the RGB channels, scaled from [0, 255]", lambda _: uint8_image("rgba-numpy"), None),
        Case(f, "Stable Diffusion, SDXL (`mmgibbs.checks.pixel_images`)", "a grayscale PIL `image`", "converted to "
             "RGB (it failed inside the VAE's first convolution)", lambda _: uint8_image("gray"), None),
        Case(f, "SDXL", "`negative_prompt_2` without `negative_prompt`", "used, with \"\" for the first text encoder "
             "(the host dropped it and zeroed the negative branch)", lambda _: sdxl_negative_prompt_2(), None),
    ]  # fmt: skip
    cases += [
        Case(f, "DiT", "`class_labels=1.0`", "`class_labels` must be class ids in [0, 10) or words of the "
             "pipeline's `id2label`; got [1.0]", lambda _: dit_labels(1.0)),
        Case(f, "DiT", "`class_labels=['goldfish', 'cat']` with a word not in `id2label`", "`class_labels`: 'cat' "
             "is not a word of the pipeline's `id2label` (its 5 words: 'Tinca tinca', 'goldfish', 'great white "
             "shark', ...)", lambda _: dit_labels(["goldfish", "cat"])),
        Case(f, "SDXL (`Family.check_embeddings`, every family's embeddings; before any model call)",
             "`pooled_prompt_embeds` of 2 rows beside `prompt_embeds` of 1",
             "The prompt embeddings must have one row per prompt each; got `prompt_embeds` 1, "
             "`negative_prompt_embeds` 1, `pooled_prompt_embeds` 2", lambda _: sdxl_call(embeds=True)),
        Case(f, "SDXL (before any model call)", "`prompt='a cat', prompt_2=['a', 'b']`", "`prompt_2` holds 2 "
             "prompts and `prompt` 1", lambda _: sdxl_call(prompt="a cat", prompt_2=["a", "b"])),
        Case(f, "DiT", "`class_labels=np.int64(3)` (and a numpy array of ids)", "class 3, as `class_labels=3`",
             lambda _: numpy_label(), None),
        Case(f, "`__call__`, `calibrate_covariance` (`mmgibbs.checks.check_host_arguments`)", "`prompt` and "
             "`prompt_embeds` together (and `negative_prompt` with `negative_prompt_embeds`)", "Pass `prompt` or "
             "`prompt_embeds`, not both", lambda _: prompt_and_embeds()),
        Case(f, "`__call__`", "`device='cpu'` as a call argument", "`device` is not a call argument: the pipeline "
             "runs where its components are (move them with `pipe.to(device)`, or offload with "
             "`pipe.enable_model_cpu_offload()`)",
             lambda _: latent(stable_diffusion(), prompt="a cat", device="cpu")),
        Case(f, "`__call__`", "`scheduler=...` as a call argument", "`scheduler` is not a call argument: set it "
             "with `from_pipe(pipe, scheduler=...)`", lambda _: latent(unconditional(), scheduler=ddpm_scheduler())),
    ]  # fmt: skip
    cases += [
        Case(f, "energy models (before the first model call)", "an energy model with `jacobian='forward'`",
             "jacobian='forward' cannot differentiate an energy model: its Jacobian products are Hessian-vector "
             "products by double backward", lambda _: energy_call(covariance="diagonal", jacobian="forward")),
        Case(f, "energy models (before the first model call)", "an energy model with `product_batch=4`",
             "product_batch=4: batched Jacobian products (torch.func.vmap) cannot differentiate through the "
             "torch.autograd.grad inside an energy model's score", lambda _: energy_call(covariance="full",
             product_batch=4)),
        Case(f, "energy models", "an energy model with `covariance='full'`", "draws from sigma^2 J, J = I - "
             "sigma^2 Hess E, from d = 16 Hessian-vector products per level", lambda _: energy_full(), None),
        Case(f, "energy models (`MMGibbsScheduler.step`)", "an energy per sample passed to the drop-in `step`",
             "one scalar per sample: an energy model? an energy model's output is an energy per sample, not a "
             "prediction: the drop-in MMGibbsScheduler", lambda _: stepped(energy_model()(torch.randn(2, 1, 4, 4),
             torch.tensor(10)).energy, torch.randn(2, 1, 4, 4))),
        Case(f, "energy models (a standard loop)", "`model(x, t).sample` of an energy model", "the drop-in "
             "MMGibbsScheduler (or any standard diffusers loop) cannot sample it", lambda _: energy_model()(
             torch.randn(2, 1, 4, 4), torch.tensor(10)).sample, TypeError),
        Case(f, "`NetworkEnergy`", "`NetworkEnergy(form='square')`", "`form` must be one of 'sum', 'quadratic'",
             lambda _: network_energy(form="square")),
        Case(f, "`NetworkEnergy`", "`NetworkEnergy(scale=-1)`", "`scale` must be a positive finite number",
             lambda _: network_energy(scale=-1.0)),
        Case(f, "`NetworkEnergy`", "form='quadratic' around a network with out_channels != in_channels",
             "form='quadratic' needs f(y) of y's shape", lambda _: network_energy(network_config={
             "in_channels": 1, "out_channels": 2, "sample_size": 4})),
    ]  # fmt: skip
    return cases


# ------------------------------------------------------------------------------------------ calibration
def calibrate(**kwargs: Any) -> Any:
    """``calibrate_covariance`` of a fresh tiny unconditional pipeline ((1, 8, 8) samples, d = 64): 8 samples, 2
    levels, 2 clusters, rank 2 unless ``kwargs`` say otherwise. An error must come before any model call."""
    from tiny_pipelines import count_calls, tiny_unet2d

    pipe = quiet(pipeline(unet=tiny_unet2d(), scheduler=ddpm_scheduler()))
    arguments = {"num_inference_steps": 2, "samples": torch.randn(8, 1, 8, 8), "num_clusters": 2, "rank": 2}
    arguments.update(kwargs)
    with count_calls(pipe.unet) as calls:
        try:
            return pipe.calibrate_covariance(**arguments)
        except Exception:
            assert calls == [], f"{len(calls)} model calls before the error"
            raise


def own_samples(**kwargs: Any) -> Any:
    """:func:`calibrate` on the model's own samples (2 of them, 2 sampler steps unless ``kwargs`` say otherwise)."""
    return calibrate(**{"samples": None, "num_samples": 2, "sampler_steps": 2, **kwargs})


def calibration_function(samples: Any = None, sigmas: Any = (1.0,), **kwargs: Any) -> Any:
    """``mmgibbs.calibration.calibrate_covariance`` with a denoiser that counts its calls (none before an error)."""
    from mmgibbs.calibration import calibrate_covariance

    calls: list[int] = []

    def denoiser(y: torch.Tensor, i: int) -> torch.Tensor:
        calls.append(i)
        return 0.5 * y

    samples = torch.randn(8, 4) if samples is None else samples
    try:
        return calibrate_covariance(denoiser, sigmas, samples, **{"num_clusters": 2, "rank": 2, **kwargs})
    except Exception:
        assert calls == [], f"{len(calls)} model calls before the error"
        raise


def rank_above_the_cluster_sizes() -> None:
    table = calibration_function(torch.randn(8, 64, generator=_generator()), num_clusters=3, rank=16)
    level = table.levels[0]
    assert level.factor.shape[:2] == (3, 64) and level.factor.shape[-1] <= 16
    assert torch.isfinite(level.dense()).all()


def steps_as_a_tuple() -> None:
    from mmgibbs import MMGibbsScheduler

    table = calibrate(num_inference_steps=(2, 3))
    for steps in (2, 3):
        schedule = MMGibbsScheduler.from_config(ddpm_scheduler().config)
        schedule.set_timesteps(steps)
        assert all(table.find(sigma) is not None for sigma in schedule.ve_sigmas())


def before_any_call(module: Any, run: Callable[[], Any]) -> Any:
    """``run()``, whose error must come before ``module``'s first call began (``count_calls``)."""
    from tiny_pipelines import count_calls

    with count_calls(module) as calls:
        try:
            return run()
        except Exception:
            assert calls == [], f"{len(calls)} model calls began before the error"
            raise


def calibrated_sd(**kwargs: Any) -> Any:
    """A tiny Stable Diffusion Gibbs pipeline calibrated (calibrated covariance, eta 0) for 2 steps, one prompt,
    8 random latents at the default size; ``kwargs`` go to ``from_pipe``."""
    pipe = over(tiny_stable_diffusion(), covariance="calibrated", eta=0.0, **kwargs)
    pipe.calibrate_covariance(2, samples=torch.randn(8, 4, 8, 8), prompt="a cat", num_clusters=1, rank=2)
    return pipe


def tiny_stable_diffusion() -> Any:
    from tiny_pipelines import tiny_stable_diffusion_pipeline

    return tiny_stable_diffusion_pipeline()


def sd_table_on_sdxl() -> Any:
    """A Stable Diffusion table (condition keys of its one text encoder) set on an SDXL pipeline of the same
    latent size."""
    from tiny_sdxl import tiny_sdxl_pipeline

    table = calibrated_sd().scheduler.covariance_table
    sdxl = over(tiny_sdxl_pipeline(), covariance="calibrated", eta=0.0)
    sdxl.scheduler.set_covariance_table(table)
    return before_any_call(sdxl.unet, lambda: latent(sdxl, prompt="a cat", num_inference_steps=2, guidance_scale=7.5))


def sd_at_another_size() -> Any:
    pipe = calibrated_sd()
    return before_any_call(pipe.unet, lambda: latent(pipe, prompt="a cat", num_inference_steps=2, height=32, width=32))


def drop_in_table_without_the_runs_levels() -> Any:
    """The drop-in scheduler holding a 2-step table in StableDiffusionPipeline's own loop at 3 steps."""
    from mmgibbs import MMGibbsScheduler

    table = calibrated_sd().scheduler.covariance_table
    host = tiny_stable_diffusion()
    host.scheduler = MMGibbsScheduler.from_config(host.scheduler.config, covariance="calibrated", eta=0.0)
    host.scheduler.set_covariance_table(table)
    host.set_progress_bar_config(disable=True)
    return before_any_call(host.unet, lambda: host("a cat", num_inference_steps=3, output_type="latent"))


def default_steps() -> None:
    assert len(calibrate(num_inference_steps=None).levels) == 50


def sketch_as_wide_as_the_dimension() -> None:
    table = calibrate(streaming=True, sketch=64)
    assert len(table.levels) == 2 and all(torch.isfinite(lv.dense()).all() for lv in table.levels)


def sdxl_call(**kwargs: Any) -> Any:
    from tiny_sdxl import tiny_sdxl_pipeline

    pipe = over(tiny_sdxl_pipeline())
    if kwargs.pop("embeds", False):
        host = tiny_sdxl_pipeline()
        positive, negative, pooled, negative_pooled = host.encode_prompt("a cat", device="cpu")
        kwargs = {"prompt_embeds": positive, "negative_prompt_embeds": negative, "pooled_prompt_embeds":
                  pooled.repeat(2, 1), "negative_pooled_prompt_embeds": negative_pooled}  # fmt: skip
    return before_any_call(pipe.unet, lambda: latent(pipe, num_inference_steps=2, **kwargs))


def flux_drop_in(**settings: Any) -> Any:
    """FluxPipeline's own loop with the drop-in scheduler configured by ``settings``."""
    from tiny_flux import tiny_flux_pipeline

    from mmgibbs import MMGibbsScheduler

    host = tiny_flux_pipeline()
    host.scheduler = MMGibbsScheduler.from_config(host.scheduler.config, **settings)
    host.set_progress_bar_config(disable=True)
    return before_any_call(host.transformer, lambda: host("a cat", num_inference_steps=2, output_type="latent"))


def table_of_another_model() -> Any:
    from mmgibbs import MMGibbsScheduler
    from mmgibbs.calibration import calibrate_covariance

    pipe = quiet(pipeline(unet=tiny_unet(), scheduler=MMGibbsScheduler(covariance="calibrated")))
    pipe.scheduler.set_timesteps(2)
    sigmas = pipe.scheduler.ve_sigmas()
    pipe.scheduler.set_covariance_table(
        calibrate_covariance(lambda y, i: 0.5 * y, sigmas, torch.randn(8, 16), num_clusters=1)
    )
    return latent(pipe, num_inference_steps=2)


def _calibration_cases() -> list[Case]:
    c = CALIBRATION
    x = torch.randn(8, 1, 8, 8)
    nan, inf = x.clone(), x.clone()
    nan[3, 0, 2, 2], inf[0, 0, 0, 0] = float("nan"), float("inf")
    where = "`calibrate_covariance`, before any model call"
    call: list[tuple[str, dict[str, Any], str, type[BaseException]]] = [
        ("`samples` of shape (8, 64) for a (1, 8, 8) model", {"samples": torch.randn(8, 64)}, "`samples` must have "
         "shape (N, 1, 8, 8): N samples of the model's sample shape (1, 8, 8); got (8, 64)", ValueError),
        ("`samples` with a NaN", {"samples": nan}, "`samples` contains NaN or infinite values (1 of 512 entries)",
         ValueError),
        ("`samples` with an inf", {"samples": inf}, "`samples` contains NaN or infinite values", ValueError),
        ("numpy `samples`", {"samples": x.numpy()}, "`samples` must be a torch.Tensor; got ndarray (convert it with "
         "torch.from_numpy)", TypeError),
        ("`samples` as a list", {"samples": x.tolist()}, "`samples` must be a torch.Tensor; got list", TypeError),
        ("integer `samples`", {"samples": x.long()}, "`samples` must be a floating-point tensor; got torch.int64",
         TypeError),
        ("1 sample for `num_clusters=2`", {"samples": x[:1]}, "`samples` holds 1 sample for `num_clusters`=2: "
         "k-means needs at least one sample per cluster", ValueError),
        ("`num_inference_steps=[]`", {"num_inference_steps": []}, "`num_inference_steps` must be a positive integer "
         "or a non-empty sequence of them; got []", ValueError),
        ("`num_inference_steps=2.5`", {"num_inference_steps": 2.5}, "`num_inference_steps` must be a positive "
         "integer or a non-empty sequence of them; got 2.5", ValueError),
        ("`num_inference_steps=[2, 0]`", {"num_inference_steps": [2, 0]}, "`num_inference_steps` must be a "
         "positive integer or a non-empty sequence of them; got [2, 0]", ValueError),
        ("`num_clusters=0`", {"num_clusters": 0}, "`num_clusters` must be an integer >= 1; got 0", ValueError),
        ("`num_clusters=-2`", {"num_clusters": -2}, "`num_clusters` must be an integer >= 1; got -2", ValueError),
        ("`rank=-1`", {"rank": -1}, "`rank` must be an integer in [1, 64] (the sample dimension is 64); got -1",
         ValueError),
        ("`rank=0`", {"rank": 0}, "`rank` must be an integer in [1, 64]", ValueError),
        ("`rank=65` (above the dimension)", {"rank": 65}, "`rank` must be an integer in [1, 64] (the sample "
         "dimension is 64); got 65", ValueError),
        ("`shrinkage=-1.0`", {"shrinkage": -1.0}, "`shrinkage` must be a finite number >= 0; got -1.0", ValueError),
        ("`shrinkage=nan`", {"shrinkage": float("nan")}, "`shrinkage` must be a finite number >= 0; got nan",
         ValueError),
        ("`batch_size=-1`", {"batch_size": -1}, "`batch_size` must be an integer >= 1 (or None: all samples at "
         "once); got -1", ValueError),
        ("`batch_size=0`", {"batch_size": 0}, "`batch_size` must be an integer >= 1", ValueError),
        ("`factor_iterations=0`", {"factor_iterations": 0}, "`factor_iterations` must be an integer >= 1; got 0",
         ValueError),
        ("`generator=0`", {"generator": 0}, "`generator` must be a torch.Generator or None (the calibration noise of "
         "every sample and the clustering come from one stream); got int", TypeError),
        ("`generator=[torch.Generator()]`", {"generator": [torch.Generator()]}, "`generator` must be a "
         "torch.Generator or None", TypeError),
        ("`sampler_steps=2` beside `samples`", {"sampler_steps": 2}, "`sampler_steps` sets how the model's own "
         "samples are drawn; with `samples` none are drawn", ValueError),
        ("`num_samples=100` beside 8 `samples`", {"num_samples": 100}, "`num_samples` sets how the model's own "
         "samples are drawn", ValueError),
        ("`streaming=\"yes\"`", {"streaming": "yes"}, "`streaming` must be True, False or None (decide by size); "
         "got 'yes'", ValueError),
        ("`cluster_samples=0`", {"cluster_samples": 0, "streaming": True}, "`cluster_samples` must be an integer "
         ">= 1; got 0", ValueError),
        ("`sketch=-1`", {"sketch": -1, "streaming": True}, "`sketch` must be an integer >= 0 (0: exact second "
         "moments); got -1", ValueError),
        ("`streaming=True` with `factor_iterations=2`", {"streaming": True, "factor_iterations": 2},
         "`factor_iterations` > 1 refits the diagonal against the whole second moment", ValueError),
        ("`sketch=3` with `streaming=False`", {"sketch": 3, "streaming": False}, "`sketch` sets the streaming fit, "
         "and this calibration does not stream (`streaming`=False", ValueError),
        ("`cluster_samples=4` at a size that does not stream", {"cluster_samples": 4}, "`cluster_samples` sets the "
         "streaming fit", ValueError),
    ]  # fmt: skip
    cases = [Case(c, where, i, m, lambda _, kw=kw: calibrate(**kw), e) for i, kw, m, e in call]
    own: list[tuple[str, dict[str, Any], str]] = [
        ("`sampler_steps=0`", {"sampler_steps": 0}, "`sampler_steps` must be an integer >= 1 (or None: every "
         "training step); got 0"),
        ("`num_samples=0`", {"num_samples": 0}, "`num_samples` must be an integer >= 1; got 0"),
        ("`num_samples=1.5`", {"num_samples": 1.5}, "`num_samples` must be an integer >= 1; got 1.5"),
        ("`num_samples=1` for `num_clusters=2`", {"num_samples": 1}, "`num_samples` holds 1 sample for "
         "`num_clusters`=2"),
        ("`sampler_covariance='bad'`", {"sampler_covariance": "bad"}, "`sampler_covariance` must be one of 'none'"),
    ]  # fmt: skip
    cases += [Case(c, f"{where} (own samples)", i, m, lambda _, kw=kw: own_samples(**kw)) for i, kw, m in own]
    function: list[tuple[str, dict[str, Any], str, type[BaseException]]] = [
        ("`sigmas=[]`", {"sigmas": []}, "`sigmas` must be a non-empty sequence of noise levels; got []", ValueError),
        ("`sigmas=[1.0, -0.5]`", {"sigmas": [1.0, -0.5]}, "`sigmas[1]` must be a finite number > 0; got -0.5",
         ValueError),
        ("`rank=5` for 4-dimensional samples", {"rank": 5}, "`rank` must be an integer in [1, 4]", ValueError),
        ("`samples` of shape (8,)", {"samples": torch.randn(8)}, "`samples` must hold N >= 1 samples, batch first",
         ValueError),
    ]  # fmt: skip
    cases += [
        Case(c, "`mmgibbs.calibration.calibrate_covariance`", f"`calibrate_covariance(denoiser, ...)`: {i}", m,
             lambda _, kw=kw: calibration_function(**kw), e)
        for i, kw, m, e in function
    ]  # fmt: skip
    cases += [
        Case(c, "`mmgibbs.calibration.calibrate_level`", "`rank=16` for 8 samples in 3 clusters",
             "each cluster's factor (at most `rank` columns, as many as its samples allow) is zero-padded to one "
             "width (it failed in torch.stack)", lambda _: rank_above_the_cluster_sizes(), None),
        Case(c, where, "`num_inference_steps=(2, 3)` (a tuple)", "the levels of both schedules",
             lambda _: steps_as_a_tuple(), None),
        Case(c, "`calibrate_covariance`", "`calibrate_covariance` of a Stable Diffusion pipeline without a prompt",
             "needs its conditioning to calibrate: pass `prompt` or `negative_prompt` or `prompt_embeds`",
             lambda _: stable_diffusion().calibrate_covariance(2, num_samples=2, sampler_steps=2)),
        Case(c, "`MMGibbsScheduler.set_covariance_table`", "`set_covariance_table('x')`", "`table` must be a "
             "CovarianceTable (from `calibrate_covariance` or CovarianceTable.load) or None; got str",
             lambda _: scheduler().set_covariance_table("x"), TypeError),
        Case(c, "sampling with the table", "a table calibrated for 16-dimensional samples, sampling a (1, 8, 8) "
             "model", "has dimension 16, the samples have 64 ((1, 8, 8)): the table was calibrated for another model",
             lambda _: table_of_another_model()),
        Case(c, "sampling with the table, before any model call", "an SD table, sampling at another `height` / "
             "`width`", "the samples have 1024 ((4, 16, 16)): the table was calibrated for another model or sample "
             "size (a latent model: another `height` / `width`)", lambda _: sd_at_another_size()),
        Case(c, "sampling with the table, before any model call (`CovarianceTable.group_of`)", "a Stable Diffusion "
             "table set on an SDXL pipeline of the same latent size", "the table was calibrated for another model's "
             "conditioning (another text encoder or family)", lambda _: sd_table_on_sdxl()),
        Case(SCHEDULER, "`MMGibbsScheduler.set_timesteps`", "the drop-in with `schedule='single_level'` in "
             "FluxPipeline's loop", "a pipeline that passes its own `sigmas`, as FluxPipeline does, cannot run a "
             "single-level chain in its loop", lambda _: flux_drop_in(schedule="single_level", sigma=0.5)),
        Case(c, "`MMGibbsScheduler.scale_model_input`, before the host's first model call", "the drop-in holding a "
             "2-step table in StableDiffusionPipeline's loop at 3 steps", "No calibrated covariance for sigma=",
             lambda _: drop_in_table_without_the_runs_levels()),
        Case(c, "`calibrate_covariance(streaming=True)`", "`sketch=64` for 64-dimensional samples", "the exact "
             "second moments (a sketch as wide as d failed in a Cholesky factorisation after every model call)",
             lambda _: sketch_as_wide_as_the_dimension(), None),
        Case(c, where, "`num_inference_steps=None`", "the default 50 steps' levels (or custom `timesteps`)",
             lambda _: default_steps(), None),
    ]  # fmt: skip
    return cases


def _command_line_cases() -> list[Case]:
    c = COMMAND_LINES
    sample: list[tuple[list[str], str, str]] = [
        (["--out", "{tmp}/missing/a.png"], "--out missing/a.png", "missing does not exist"),
        (["--out", "{tmp}"], "--out <a folder>", "is a folder; pass an image file name"),
        (["--out", "{tmp}/grid"], "--out grid", "no extension is not an image format PIL writes"),
        (["--out", "{tmp}/grid.txt"], "--out grid.txt", ".txt is not an image format PIL writes"),
        (["--out", "{tmp}/file.txt/a.png"], "--out file.txt/a.png", "file.txt does not exist"),
        (["--out", "/proc/a.png"], "--out /proc/a.png", "--out /proc/a.png: cannot write to /proc"),
        (["--model", "./missing"], "--model ./missing", "--model './missing' is neither an existing folder nor a Hub "
         "id"),
        (["--model", "a/b/c"], "--model a/b/c", "--model 'a/b/c' is neither an existing folder nor a Hub id"),
        (["--model", ""], "--model ''", "--model '' is neither an existing folder nor a Hub id"),
        (["--model", "{tmp}"], "--model <a folder without model_index.json>", "has no model_index.json"),
        (["--model", "{tmp}/file.txt"], "--model file.txt", "file.txt is a file; pass a pipeline folder"),
        (["--prompt", "a cat"], "--prompt 'a cat' (the digits DDPM)", "(DDPMPipeline) has no text encoder"),
        (["--mode", "drop-in", "--covariance", "full"], "--mode drop-in --covariance full",
         "--covariance full needs the model's Jacobian"),
        (["--model", str(DSM), "--mode", "drop-in"], "--model examples/checkpoints/digits-dsm-sigma0.5 --mode drop-in",
         "is a MomentMatchingGibbsPipeline: use --mode pipeline"),
        (["--sigma", "1e6"], "--sigma 1e6", "the sampler settings do not fit"),
        (["--sigma", "-1"], "--sigma -1", "argument --sigma: '-1' is not a finite number > 0"),
        (["--sigma", "nan"], "--sigma nan", "argument --sigma: 'nan' is not a finite number > 0"),
        (["--steps", "0"], "--steps 0", "argument --steps: '0' is not a finite number >= 1"),
        (["--batch-size", "-2"], "--batch-size -2", "argument --batch-size: '-2' is not a finite number >= 1"),
        (["--gibbs-sweeps", "1.5"], "--gibbs-sweeps 1.5", "argument --gibbs-sweeps: '1.5' is not an integer"),
        (["--eta", "2"], "--eta 2", "argument --eta: '2' is not a finite number in [0, 1]"),
        (["--num-probes", "2"], "--num-probes 2 (covariance isotropic)", "--num-probes sets the Hutchinson probes of "
         "--covariance diagonal or the Jacobian products of calibrated_jacobian, not isotropic"),
        (["--transition", "gibbs", "--eta", "0.5"], "--transition gibbs --eta 0.5", "--eta sets the ancestral "
         "transition's noise"),
        (["--guidance-scale", "3"], "--guidance-scale 3 (no --prompt)", "--guidance-scale needs --prompt or "
         "--class-labels"),
        (["--class-labels", "1"], "--class-labels 1 (the digits DDPM)", "is not class-conditional; it takes no "
         "class labels"),
        (["--covariance", "calibrated"], "--covariance calibrated (a folder saved without a table)",
         "--covariance calibrated needs a calibrated covariance table"),
    ]  # fmt: skip
    cases = [
        Case(c, "`sample.py`, `distributed_sample.py`", f"`sample.py {shown}`", m, main_job(argv), CommandLineError)
        for argv, shown, m in sample
    ]
    cases += [
        Case(c, "`sample.py`", "`sample.py --model <a Stable Diffusion folder>` (no --prompt)",
             "(StableDiffusionPipeline) is a text-to-image pipeline: pass --prompt",
             text_to_image_folder_without_prompt, CommandLineError),
        Case(c, "`sample.py` (after the loader)", "`sample.py --model <an SD folder calibrated at guidance 3>` "
             "without `--guidance-scale 3`", "--guidance-scale: the table in", sd_table_guidance(None),
             CommandLineError),
        Case(c, "`calibrate.py`", "`calibrate.py --model <a Stable Diffusion folder>` (no --prompt)",
             "is a text-to-image pipeline: pass --prompt (the prompts to calibrate for)",
             sd_calibration(["--num-samples", "8", "--clusters", "1"]), CommandLineError),
        Case(c, "`calibrate.py`", "`calibrate.py --model <a Stable Diffusion folder> --prompt a b c --num-samples "
             "8`", "--prompt: 3 conditions for 8 samples: each takes an equal block",
             sd_calibration(["--prompt", "a", "b", "c", "--num-samples", "8", "--clusters", "1"]), CommandLineError),
        Case(c, "`calibrate.py`", "`calibrate.py --prompt a` (the digits DDPM folder)", "--prompt: "
             "examples/checkpoints/digits-ddpm (DDPMPipeline) has no text encoder", calibrate_job(["--prompt", "a",
             "--model", "examples/checkpoints/digits-ddpm"]), CommandLineError),
        Case(c, "`calibrate.py`", "`calibrate.py --guidance-scale 3` (no --prompt)", "--guidance-scale needs "
             "--prompt or --class-labels", calibrate_job(["--guidance-scale", "3"]), CommandLineError),
        Case(c, "`sample.py`", "`sample.py --model <a DiT folder>` (no --class-labels)", "(DiTPipeline) is "
             "class-conditional: pass --class-labels", dit_folder_job("sample", []), CommandLineError),
        Case(c, "`calibrate.py`", "`calibrate.py --model <a DiT folder> --class-labels 1 2 3 --num-samples 4`",
             "--class-labels: 3 conditions for 4 samples: each takes an equal block", dit_folder_job("calibrate",
             ["--class-labels", "1", "2", "3", "--num-samples", "4", "--clusters", "1", "--out", "{tmp}/new"]),
             CommandLineError),
        Case(c, "`sample.py` (after the loader)", "`sample.py --model google/ddpm-cifar10-32` offline",
             "a message saying to pass a local folder as --model", offline_hub_id, None),
    ]  # fmt: skip
    calibrate: list[tuple[list[str], str, str]] = [
        (["--out", "{tmp}/taken"], "--out <a folder that is not empty>", "exists and is not an empty folder"),
        (["--digits", "--model", "google/ddpm-cifar10-32"], "--digits --model google/ddpm-cifar10-32",
         "--digits calibrates the shipped digits DDPM"),
        (["--out", "{tmp}/a/b"], "--out a/b (a missing folder)", "/a does not exist"),
        (["--samples", "{tmp}/missing.pt"], "--samples missing.pt", "missing.pt: pass an existing .pt or .npy file"),
        (["--steps", "0"], "--steps 0", "argument --steps: '0' is not a finite number >= 1"),
        (["--digits", "--num-samples", "100"], "--digits --num-samples 100", "--num-samples sets how the model's own "
         "samples are drawn; with --digits none are drawn"),
        (["--digits", "--sampler-steps", "10"], "--digits --sampler-steps 10", "--sampler-steps sets how the model's "
         "own samples are drawn"),
    ]  # fmt: skip
    cases += [
        Case(c, "`calibrate.py`", f"`calibrate.py {shown}`", m, calibrate_job(argv), CommandLineError)
        for argv, shown, m in calibrate
    ]
    nan = digits_like()
    nan[0, 0, 0, 0] = float("nan")
    files: list[tuple[str, str, Any, str]] = [
        ("flat.pt", "an (8, 64) tensor", torch.randn(8, 64), "flat.pt: `--samples` must have shape (N, 1, "
         "8, 8): N samples of the model's sample shape (1, 8, 8); got (8, 64)"),
        ("nan.pt", "samples with a NaN", nan, "`--samples` contains NaN or infinite values (1 of 512 entries)"),
        ("dict.pt", "a dict of tensors", {"x": digits_like()}, "dict.pt: the file holds a dict, not a "
         "tensor of samples"),
        ("labels.npy", "an int64 array", np.zeros((8, 1, 8, 8), np.int64), "`--samples` must be a floating-point "
         "tensor; got torch.int64"),
        ("one.pt", "1 sample, `--clusters 2`", digits_like(1), "`--samples` holds 1 sample for `num_clusters`=2"),
    ]  # fmt: skip
    cases += [
        Case(c, "`calibrate.py` (before the model is loaded)", f"`calibrate.py --samples {name}` ({what})", m,
             samples_file(name, value), CommandLineError)
        for name, what, value, m in files
    ]  # fmt: skip
    cases += [
        Case(c, "`calibrate.py`", "`calibrate.py --out /proc/calibrated` (a folder no file can be created in)",
             "--out /proc/calibrated: cannot write to /proc", calibrate_job(["--out", "/proc/calibrated"]),
             CommandLineError),
        Case(c, "`calibrate.py`", "`calibrate.py --rank 100` (digits: 64 dimensions)", "`rank` must be an integer "
             "in [1, 64]", calibrate_job(["--digits", "--rank", "100"]), CommandLineError),
        Case(c, "`distributed_sample.py`", "`distributed_sample.py --save-array missing/images.npy`",
             "missing does not exist",
             distributed_job(["--save-array", "{tmp}/missing/images.npy", "--out", "{tmp}/a.png"]), CommandLineError),
        Case(c, "`distributed_sample.py`", "`distributed_sample.py --save-array images.txt`", "pass a .npy file "
             "name (numpy writes .npy files)", distributed_job(["--save-array", "{tmp}/images.txt", "--out",
             "{tmp}/a.png"]), CommandLineError),
        Case(c, "`sample.py` (after the loader)", "`sample.py --model <a folder calibrated for 2 steps> --covariance "
             "calibrated --steps 3`", "the sampler refused this run: No calibrated covariance for sigma=",
             calibrated_folder_at_other_steps, CommandLineError),
        Case(c, "`distributed_sample.py`", "`distributed_sample.py --save-array <a folder>`", "is a folder",
             distributed_job(["--save-array", "{tmp}", "--out", "{tmp}/a.png"]), CommandLineError),
        Case(c, "`sample.py`", "`sample.py --covariance calibrated_jacobian --num-probes 2` (a calibrated folder)",
             "accepted: 2 Jacobian products per level (it was refused as a Hutchinson-only flag)",
             calibrated_jacobian_probes, None),
    ]  # fmt: skip
    return cases


CASES: list[Case] = [
    *_scheduler_cases(),
    *_pipeline_cases(),
    *_family_cases(),
    *_calibration_cases(),
    *_command_line_cases(),
]

# ------------------------------------------------------------------------------------------ the page
INTRO = """\
# Bad inputs

This page answers what happens when an input is wrong or unusual: for every input below, the error it gets (and
where it is checked), or the right result it gives.

Every input is refused where it is passed, with an error that names the argument (or the flag), instead of running
on with a broadcast or an ignored value, or failing inside torch or diffusers. Errors are `ValueError` for a wrong
value or shape and `TypeError` for a wrong type, as diffusers raises them; a few accepted-but-risky inputs warn
(`UserWarning`). "What happens" quotes a fragment of the message. The page is written from the table in
`tests/bad_input_cases.py`; `tests/test_bad_inputs.py` runs every row and checks that this page lists exactly them.
"""

SECTION_NOTES = {
    FAMILIES: "What the model families (`mmgibbs.families`) check before the host pipeline's own methods run, and the "
    "inputs the hosts read wrong or drop that they read right.",
    CALIBRATION: "Every argument of `calibrate_covariance` is checked before its first model call (each case below "
    "also asserts that no model call happened).",
    COMMAND_LINES: "Checked while parsing the command line, before any model is loaded, as argparse errors (exit code "
    "2). `distributed_sample.py` takes the flags of `sample.py`; with fewer samples than processes, the processes "
    "without samples sample nothing and take part in the gather.",
}

OUTRO = """\
## Left to diffusers

In a standard pipeline's own loop (`--mode drop-in`, `pipe.scheduler = MMGibbsScheduler...`) the pipeline checks
its own arguments before the scheduler sees anything: `DDPMPipeline` fails inside `randn_tensor` on `generator=0`
or a short generator list, `StableDiffusionPipeline` runs `latents` of any shape and fails inside its loop on a
callback that returns no dict. These behave as with diffusers' own schedulers. So do an `image` of an unsupported
type (diffusers' image processor says which types it takes), a float numpy `image` outside [0, 1] (read as given)
and an unknown device string in `pipe.to(...)` (torch's message).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(cases: list[Case] = CASES) -> str:
    """docs/bad-inputs.md: one table per section, in the order of :data:`SECTIONS`, rows in table order."""
    parts = [INTRO]
    for section in SECTIONS:
        rows = [case for case in cases if case.section == section]
        parts.append(f"## {section}\n")
        if section in SECTION_NOTES:
            parts.append(SECTION_NOTES[section] + "\n")
        lines = ["| input | what happens | checked in |", "|---|---|---|"]
        lines += [f"| {_cell(r.input)} | {_cell(r.happens())} | {_cell(r.where)} |" for r in rows]
        parts.append("\n".join(lines) + "\n")
    parts.append(OUTRO)
    return "\n".join(parts)


def check(case: Case, tmp: Path) -> None:
    """Run ``case``: its error (or warning) with the message fragment, or its right result."""
    if case.error is None:
        case.run(tmp)
        return
    if issubclass(case.error, Warning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case.run(tmp)
        messages = [str(w.message) for w in caught if issubclass(w.category, case.error)]
        assert any(case.outcome in m for m in messages), f"no {case.error.__name__} with {case.outcome!r}: {messages}"
        return
    try:
        case.run(tmp)
    except case.error as err:
        assert case.outcome in str(err), f"{type(err).__name__}: {err}\ndoes not contain: {case.outcome}"
        return
    raise AssertionError(f"no {case.error.__name__} for {case.input}")


if __name__ == "__main__":
    sys.stdout.write(render())
