"""Streaming calibration (``mmgibbs.streaming``): the exact statistics give the exact path's table, the Nystrom
sketch its leading directions, the pipeline streams every family, and 2 accelerate processes give 1 process's table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_dit import tiny_dit_pipeline

from mmgibbs import MomentMatchingGibbsPipeline
from mmgibbs.calibration import CovarianceTable, calibrate_covariance
from mmgibbs.streaming import nystrom_eigenpairs, stream_covariance

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _chunks(x: torch.Tensor, keys: torch.Tensor | None, batch: int, maps: list[torch.Tensor]):
    """Per chunk of ``batch`` samples a denoiser that ignores its noisy input: mu = x A_j at level j, so that the
    exact and the streamed paths see the same residuals whatever noise each draws."""

    def denoiser_of(chunk: torch.Tensor):
        return lambda y, j: chunk.flatten(1) @ maps[j]

    starts = range(0, len(x), batch)
    denoisers = [denoiser_of(x[s : s + batch]) for s in starts]
    sizes = [len(x[s : s + batch]) for s in starts]

    def source(c: int):
        s = c * batch
        return x[s : s + batch], denoisers[c], None if keys is None else keys[s : s + batch]

    return denoisers, sizes, source


def test_exact_statistics_give_the_exact_paths_table() -> None:
    """Two condition groups, one cluster each, 7 chunks of which the first 3 form the cluster subsample: the streamed
    second moments fit the same table as the exact path (to float rounding), per group and level."""
    d, n = 12, 210
    x = torch.randn(n, d, generator=_gen(0), dtype=F64) @ torch.randn(d, d, generator=_gen(1), dtype=F64)
    keys = (torch.arange(n) % 2).double()[:, None]
    maps = [0.3 * torch.eye(d, dtype=F64), 0.8 * torch.eye(d, dtype=F64) + 0.01]
    denoisers, sizes, source = _chunks(x, keys, 30, maps)
    exact = calibrate_covariance(
        denoisers, [2.0, 0.5], x, batch_size=30, num_clusters=1, rank=5, conditions=keys, generator=_gen(2)
    )
    streamed = stream_covariance(
        source, sizes, [2.0, 0.5], (d,), key_dim=1, num_clusters=1, rank=5, cluster_samples=80, dtype=F64
    )
    assert streamed.settings["streaming"]["cluster_samples"] == 90 and streamed.sample_forwards == 2 * n
    assert torch.equal(streamed.conditions, exact.conditions)
    for a, b in zip(streamed.levels, exact.levels, strict=True):
        assert a.sigma == b.sigma and a.groups.tolist() == b.groups.tolist() == [0, 1]
        torch.testing.assert_close(a.dense(), b.dense(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.diagonal + a.factor.pow(2).sum(-1), b.diagonal + b.factor.pow(2).sum(-1))


def test_nystrom_sketch_recovers_the_leading_directions() -> None:
    """d = 600 > 512: the sketch (width 32) of a rank-8 + isotropic second moment (its flat tail holds a seventh of
    the trace) gives its 8 leading directions (principal cosines > 0.98) and eigenvalues to 20% (Nystrom falls
    short by the tail's share; 6% at width 64, 2% at 128), and the streamed table (sketch + exact diagonal sums)
    the exact path's covariance to 6% (Frobenius), its diagonal exactly."""
    d, n = 600, 400
    basis = torch.linalg.qr(torch.randn(d, 8, generator=_gen(3), dtype=F64))[0]
    r = torch.randn(n, 8, generator=_gen(4), dtype=F64) * torch.linspace(3, 1, 8, dtype=F64) @ basis.T
    r = r + 0.1 * torch.randn(n, d, generator=_gen(5), dtype=F64)
    moment = r.T @ r / n
    omega = torch.randn(d, 32, generator=_gen(6), dtype=F64)
    evals, evecs = nystrom_eigenpairs(moment @ omega, omega, 8)
    assert float(torch.linalg.svdvals(evecs.T @ basis).min()) > 0.98  # the leading subspace
    exact = torch.linalg.eigvalsh(moment).flip(0)[:8]
    assert float(((evals - exact) / exact).abs().max()) < 0.2
    x = r + 1.0  # residual r = x - mu with mu = 1
    denoisers, sizes, source = _chunks(x, None, 100, [torch.zeros(d, d, dtype=F64)])
    shift = lambda den: lambda y, j: den(y, j) + 1.0  # noqa: E731
    table_exact = calibrate_covariance(
        [shift(den) for den in denoisers], [1.0], x, batch_size=100, num_clusters=1, rank=8
    )
    streamed = stream_covariance(
        lambda c: (source(c)[0], shift(source(c)[1]), None),
        sizes,
        [1.0],
        (d,),
        num_clusters=1,
        rank=8,
        dtype=F64,
        sketch=32,
    )
    assert streamed.settings["streaming"]["sketch"] == 32
    a, b = streamed.levels[0].dense()[0], table_exact.levels[0].dense()[0]
    assert float((a - b).norm() / b.norm()) < 0.06
    torch.testing.assert_close(a.diagonal(), b.diagonal())  # the diagonal sums are exact


def test_the_pipeline_streams_a_conditional_calibration_with_a_progress_bar(capsys) -> None:
    """DiT, own samples drawn per batch: the streamed table has the exact path's structure (a group per class) and
    serves the family's call; the progress bar runs over the subsample's levels and the other batches."""
    pipe = MomentMatchingGibbsPipeline.from_pipe(tiny_dit_pipeline(), covariance="calibrated", eta=0.0)
    pipe.set_progress_bar_config(disable=False)
    table = pipe.calibrate_covariance(
        3, class_labels=[1, 5] * 6, generator=_gen(7), sampler_steps=2, num_clusters=2, rank=3, batch_size=4,
        streaming=True, cluster_samples=4,
    )  # fmt: skip
    assert table.settings["streaming"] == {"cluster_samples": 4, "sketch": 0, "processes": 1}
    assert "seeded per batch" in table.settings["source"] and table.settings["sampler_sample_forwards"] == 2 * 12
    assert len(table.conditions) == 2 and table.num_forward == 3 * 3 and table.sample_forwards == 3 * 12
    assert "100%" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1, 5], num_inference_steps=3, output_type="latent")
    assert torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="`factor_iterations` > 1"):
        pipe.calibrate_covariance(3, class_labels=[1] * 4, streaming=True, factor_iterations=2, num_clusters=1)


@pytest.mark.slow  # two accelerate processes, then the same calibration in this one
def test_two_processes_give_one_processs_table(tmp_path) -> None:
    """examples/calibrate.py on the digits DDPM (1400 train digits, 14 batches, clusters from the first 300) under
    ``accelerate launch`` with 2 CPU processes (each every other batch, one reduction) and in one process: the same
    table, level by level."""
    from background import _free_port

    argv = ["--digits", "--steps", "2", "--clusters", "2", "--rank", "4", "--batch-size", "100"]
    argv += ["--cluster-samples", "300", "--streaming"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]  # fmt: skip
    result = subprocess.run(
        [*launch, "examples/calibrate.py", *argv, "--out", str(tmp_path / "two")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "streamed: 2 process(es), clusters from 300 samples" in result.stdout
    import calibrate

    calibrate.main([*argv, "--out", str(tmp_path / "one")])
    two = CovarianceTable.load(tmp_path / "two" / "scheduler" / "covariance_table.safetensors")
    one = CovarianceTable.load(tmp_path / "one" / "scheduler" / "covariance_table.safetensors")
    assert two.sigmas == one.sigmas and two.settings["streaming"]["processes"] == 2
    for a, b in zip(two.levels, one.levels, strict=True):
        torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=0)
        torch.testing.assert_close(a.dense(), b.dense(), rtol=1e-5, atol=1e-7)


def _gloo_worker(rank: int, port: int, out: str) -> None:
    """One of 2 gloo processes whose global RNGs differ (seeded per rank, as scripts often do): a streamed, clustered,
    conditional calibration with no generator; each process saves its table."""
    import torch.distributed as dist

    from mmgibbs.streaming import Shards

    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        d, n = 6, 96
        x = torch.randn(n, d, generator=_gen(0), dtype=F64) * torch.linspace(0.5, 2, d, dtype=F64)
        keys = (torch.arange(n) % 2).double()[:, None]

        def source(c: int):
            return x[c * 16 : (c + 1) * 16], lambda y, j: 0.5 * y, keys[c * 16 : (c + 1) * 16]

        table = stream_covariance(source, [16] * 6, [1.0, 0.3], (d,), key_dim=1, num_clusters=3, rank=2,
                                  cluster_samples=48, dtype=F64, shards=Shards.from_environment())  # fmt: skip
        table.save(Path(out) / f"rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_agree_without_a_generator(tmp_path) -> None:
    """Without a generator each process's own RNG would pick its own noise seeds, test matrix and k-means start, and
    the summed statistics would belong to no one table: the seeds are agreed (process 0's), so both hold one."""
    import torch.multiprocessing as mp
    from background import _free_port

    mp.start_processes(_gloo_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    a, b = (CovarianceTable.load(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert a.settings["streaming"]["processes"] == 2 and len(a.levels) == 2
    for la, lb in zip(a.levels, b.levels, strict=True):
        assert torch.equal(la.centroids, lb.centroids) and torch.equal(la.factor, lb.factor)


def test_streaming_holds_one_batch_past_the_cluster_subsample() -> None:
    """Memory independent of the number of samples: past the cluster subsample (the first 2 batches), when batch c
    is asked for, no batch before c - 1 is still held (reference counts free them; no residuals are kept)."""
    import weakref

    d, refs, alive = 5, {}, []

    def source(c: int):
        x = torch.randn(8, d, generator=_gen(c), dtype=F64)
        alive.append([k for k, ref in refs.items() if ref() is not None])
        refs[c] = weakref.ref(x)
        return x, lambda y, j: 0.5 * y, None

    stream_covariance(source, [8] * 8, [1.0, 0.5], (d,), num_clusters=1, rank=2, cluster_samples=16, dtype=F64)
    assert len(alive) == 8 and all(set(held) <= {c - 1} for c, held in enumerate(alive) if c >= 3), alive
