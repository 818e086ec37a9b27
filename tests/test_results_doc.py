"""The benchmark's tables in the docs (``examples/results_doc.py`` and each section's renderer): rendered from a
results file alone, written between their markers, and found stale when the page and the file disagree. Small
synthetic results files: the figures below are what the renderers must compute from them."""

from __future__ import annotations

import json

import benchmark
import image_mixture
import pytest
import results_doc
import speed
from background import result as background_run


def _digits_record(fd: float, kl: float = 0.01, forwards: int = 10, backward: int = 0) -> dict:
    return {"fd": fd, "kl": kl, "forwards": forwards, "backward": backward, "jvps": 0, "seconds": 1.5}


def digits_data() -> dict:
    rows = [
        {"name": "DDIM", "kind": "diffusers", "steps": 10, "settings": {}, "keys": ["a0", "a1"]},
        {"name": "Langevin PC", "kind": "pc", "steps": 5, "settings": {"snr": 0.08}, "keys": ["p0", "p1"]},
        {"name": "MMGibbs d", "kind": "mmgibbs", "steps": 10, "settings": {"covariance": "diagonal"},
         "keys": ["m0", "m1"]},
    ]  # fmt: skip
    results = {
        "a0": _digits_record(0.5),
        "a1": _digits_record(0.7),
        "p0": _digits_record(2.0),
        "p1": _digits_record(3.0),
        "m0": _digits_record(0.4, backward=10),
        "m1": _digits_record(0.6, backward=10),
    }
    calibration = [
        {
            "name": "data",
            "num_samples": 1400,
            "source": "given samples",
            "levels": 60,
            "sample_forwards": 84000,
            "sampler_sample_forwards": 0,
            "seconds": 70.2,
        }
    ]
    costs = {"backward": 1.27, "jvp": 3.15, "forward_s": 0.59}
    return {"section": "digits", "num_samples": 2000, "seeds": [0, 1], "floor_fd": 0.368, "costs": costs,
            "calibration": calibration, "rows": rows, "results": results}  # fmt: skip


def test_digits_renderer() -> None:
    text = benchmark.render_digits(digits_data())
    assert text.startswith("### Digits DDPM (2000 samples per seed, seeds [0, 1])\n\nFloor (1400 train digits")
    assert "FD 0.368" in text and "a backward pass 1.27, a forward-mode JVP 3.15 forwards" in text
    assert "| DDIM | 10 | 0.600 ± 0.141 | 0.500 / 0.700 | 0.010 | 10 | 0 | 0 | 10 | 1.5 |" in text
    assert "| Langevin PC (snr=0.08) | 5 | 2.500 ± 0.707 |" in text
    assert "| MMGibbs d | 10 | 0.500 ± 0.141 | 0.400 / 0.600 | 0.010 | 10 | 10 | 0 | 30 | 1.5 |" in text
    assert (
        "baseline DDIM 10 steps, FD 0.600 ± 0.141; MMGibbs d 10 steps, FD 0.500 ± 0.141. Paired by seed, MMGibbs "
        "minus baseline: -0.100 / -0.100 (MMGibbs lower on 2 of 2 seeds)."
    ) in text
    assert (
        "Calibrated covariance `data` (once per model, not in the equivalents): 1400 samples (given samples), 60"
        in text
    )
    assert "84000 single-sample forwards, plus 0 to draw own samples; 70 s." in text


def test_levers_renderer_pairs_the_best_mmgibbs_row_with_unipc_and_the_best_diffusers_per_budget() -> None:
    data = digits_data()
    data["section"] = "digits-levers"
    data["rows"].insert(
        1, {"name": "UniPC (bh2)", "kind": "diffusers", "steps": 10, "settings": {}, "keys": ["u0", "u1"]}
    )
    data["results"].update(u0=_digits_record(0.45), u1=_digits_record(0.65))
    text = benchmark.render_levers(data)
    assert text.startswith("### Digits DDPM, the real-data levers (2000 samples per seed")
    assert (
        "- 10 calls: MMGibbs d FD 0.500 ± 0.141 against UniPC (UniPC (bh2)) 0.550 ± 0.141; paired by seed "
        "-0.050 / -0.050 (MMGibbs lower on 2 of 2)."
    ) in text
    assert "against the best diffusers sampler (UniPC (bh2)) 0.550" in text
    assert benchmark.renderers()["digits-levers"] is benchmark.render_levers


def test_single_level_renderer() -> None:
    data = digits_data()
    data["rows"] = data["rows"][2:]
    text = benchmark.render_single_level({**data, "section": "single-level"})
    assert text.startswith("### One noise level: the DSM model at sigma 0.5 (2000 samples per seed, seeds [0, 1])")
    assert text.count("| MMGibbs d |") == 1 and "Langevin's step is step * sigma^2" in text


def test_toy_renderer() -> None:
    data = {
        "section": "toy",
        "num_samples": 500,
        "seeds": [0, 1],
        "single": [
            {"sigma": 0.3, "sweeps": 10, "name": "clean (floor)", "mmd": [1.0, 3.0], "variance": [0.04, 0.042]}
        ],
        "annealed": [
            {"name": "DDPM", "steps": 10, "equiv": 10, "mmd": [1, 2], "energy": [3, 5], "variance": [0.1, 0.2]},
            {"name": "clean samples (floor)", "steps": 0, "equiv": 0, "mmd": [0, 0], "energy": [0, 0],
             "variance": [1, 1]},
        ],
    }  # fmt: skip
    text = benchmark.render_toy(data)
    assert "| 0.3 | 10 | clean (floor) | 2.00 ± 1.41 | 0.0410 ± 0.0014 |" in text
    assert "| DDPM | 10 | 10 | 1.50 ± 0.71 | 4.00 ± 1.41 | 0.1500 ± 0.0707 |" in text
    assert "| clean samples (floor) | - | 0 |" in text and "#### Exact toy as a VP diffusion model" in text


def _mixture_record(kl: float, fd: float, equiv: float) -> dict:
    return {"kl": kl, "tv": 0.02, "fd": fd, "vr_small": 1.1, "vr_mid": 1.0, "vr_large": 0.9, "equiv": equiv}


def test_image_mixture_renderer() -> None:
    data = {
        "section": "image-mixture",
        "num_samples": 4000,
        "seeds": [0, 1],
        "floor_keys": ["f0", "f1"],
        "rows": [
            {"name": "DDIM", "budget": 10, "keys": ["d0", "d1"]},
            {"name": "MMGibbs calibrated", "budget": 10, "keys": ["c0", "c1"]},
        ],
        "results": {
            "f0": _mixture_record(2.8, 0.04, 0),
            "f1": _mixture_record(2.84, 0.05, 0),
            "d0": _mixture_record(22.82, 0.6, 10),
            "d1": _mixture_record(24.82, 0.7, 10),
            "c0": _mixture_record(5.82, 0.07, 10),
            "c1": _mixture_record(5.82, 0.08, 10),
        },
        "calibration_notes": ["- `data`: a note"],
        "seconds": 12.3,
        "torch": "2.13.0+cpu",
    }
    text = image_mixture.render(data)
    assert "per-mode KL 2.82 ± 0.03 nats, weight TV 0.020, FD 0.045" in text
    assert "| DDIM | 10 | 10 | 21.00 ± 1.41 (20.00 / 22.00) | 0.020 | 0.650 ± 0.071 | 1.10 / 1.00 / 0.90 |" in text
    assert "| MMGibbs calibrated | 10 | 10 | 3.00 ± 0.00 (3.00 / 3.00) |" in text
    assert "- **10 equivalents**: best MMGibbs `MMGibbs calibrated` excess KL 3.00 / 3.00 vs best diffusers" in text
    assert "(at most half on 2 of 2 seeds)" in text and "- `data`: a note" in text
    assert text.rstrip().endswith("(12 s with cached rows; torch 2.13.0+cpu)")


def _speed_row(name: str, seconds: list[float], reference: str | None, passes: str = "1 / 0 / 0") -> dict:
    return {"name": name, "levels": 4, "passes": passes, "reference": reference, "seconds": seconds, "peak_mb": 14.2}


def test_speed_renderer() -> None:
    native, base = "DDPMScheduler, diffusers' pipeline loop", "Gibbs pipeline, none"
    rows = [
        _speed_row(native, [1.0, 2.0], None),
        _speed_row("MMGibbsScheduler drop-in, none", [1.02, 2.04], native),
        _speed_row("MMGibbsScheduler drop-in, isotropic", [1.1, 2.2], native),
        _speed_row(base, [1.0, 2.0], None),
        _speed_row("diagonal, reverse, K=1 (1 probe)", [2.5, 5.0], base, "1 / 1 / 0"),
    ]
    case = {"name": "digits DDPM", "description": "the digits", "levels": 4, "full_levels": 2, "reps": 2,
            "full": False, "dim": 256, "shape": [4, 4, 16, 16], "rows": rows,
            "steps": {"DDPMScheduler": [1e-4, 2e-4, 3e-4]}}  # fmt: skip
    data = {"section": "speed", "environment": "torch x", "cases": [case], "end": "Load average at the end: 1."}
    text = speed.render_speed(data)
    assert text.startswith("### Speed and memory (`--section speed`)\n\ntorch x.\n")
    assert (
        "| diagonal, reverse, K=1 (1 probe) | 1 / 1 / 0 | 3750.0 | 2500.0-5000.0 | 2.500 (2.500-2.500) | 14.2 |"
        in text
    )
    assert "drop-in overhead per step, isotropic: +10.0%" in text and "MISSED" in text
    assert "The scheduler step alone on a (4, 4, 16, 16) sample: DDPMScheduler 200 µs (100-300)." in text
    assert "`full` is not timed here: d = 256 Jacobian products per level (about 512 forward equivalents)." in text


def test_families_renderer() -> None:
    rows = [_speed_row("host", [0.9, 1.8], None)] + [
        _speed_row(c, [k * 1.0, k * 2.0], None) for k, c in enumerate(speed.FAMILY_COVARIANCES, start=1)
    ]
    data = {"section": "families", "environment": "torch x", "levels": 4, "reps": 2, "end": "Load average: 1.",
            "families": [{"name": "SD3", "denoiser": "SD3Transformer2DModel (41.9 k)", "rows": rows}]}  # fmt: skip
    text = speed.render_families(data)
    assert "| SD3 | SD3Transformer2DModel (41.9 k) | host | 1 / 0 / 0 | 1350.0 | 900.0-1800.0 | 0.90 | 14.20 |" in text
    assert "| SD3 | SD3Transformer2DModel (41.9 k) | diagonal | 1 / 0 / 0 | 4500.0 |" in text and "| 3.00 |" in text
    assert "4 levels per call, 2 interleaved repetitions" in text


def test_write_section_replaces_only_its_block_and_saves_the_file_it_renders(tmp_path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / results_doc.RESULTS_PAGE
    page.write_text(
        "# R\n\nbefore\n<!-- benchmark:toy -->\nold\n<!-- /benchmark:toy -->\nbetween\n"
        "<!-- benchmark:digits -->\nkept\n<!-- /benchmark:digits -->\nafter\n"
    )
    renderers = {"toy": lambda d: f"rows: {d['n']}", "digits": lambda d: "kept"}
    body = results_doc.write_section("toy", {"n": 3}, renderers["toy"], docs)
    assert body == "rows: 3"
    assert page.read_text() == (
        "# R\n\nbefore\n<!-- benchmark:toy -->\nrows: 3\n<!-- /benchmark:toy -->\nbetween\n"
        "<!-- benchmark:digits -->\nkept\n<!-- /benchmark:digits -->\nafter\n"
    )
    assert json.loads((docs / "results" / "toy.json").read_text()) == {"n": 3}
    assert results_doc.stale_blocks(renderers, docs) == {}
    (docs / "results" / "toy.json").write_text('{"n": 4}')  # the file changed, the page did not
    assert "differs" in results_doc.stale_blocks(renderers, docs)["toy"]
    (docs / "results" / "speed.json").write_text("{}")
    assert "no block" in results_doc.stale_blocks(renderers, docs)["speed"]
    with pytest.raises(ValueError, match="no block for section 'speed'"):
        results_doc.write_section("speed", {"new": 1}, lambda d: "x", docs)
    assert (docs / "results" / "speed.json").read_text() == "{}"  # nothing written when the block is missing


def test_benchmark_refuses_to_write_the_docs_from_a_partial_run() -> None:
    with pytest.raises(SystemExit):
        benchmark.main(["--section", "toy", "--quick", "--write-docs"])


@pytest.mark.slow  # every tiny family pipeline timed once (about 15 s)
@pytest.mark.background("families-section")
def test_benchmark_writes_a_section_into_the_docs_and_it_checks_clean() -> None:
    """``--write-docs`` end to end on the quickest section: the results file and the block it renders to. The run
    (``examples/benchmark.py --section families --quick --threads 1 --out-dir <folder>/bench --write-docs
    --docs-dir <folder>/docs`` on a results page holding an empty families block, ``background.RUNS``) is the one
    test_speed_benchmark checks the report of."""
    result, folder = background_run("families-section")
    assert result.returncode == 0, result.stderr[-3000:]
    docs = folder / "docs"
    data = json.loads((docs / "results" / "families.json").read_text())
    assert [f["name"] for f in data["families"]][:2] == ["unconditional (DDPM)", "Stable Diffusion 1.x/2.x"]
    body = results_doc.blocks((docs / results_doc.RESULTS_PAGE).read_text())["families"]
    assert "| SDXL | UNet2DConditionModel" in body and "| diagonal | 1 / 1 / 0 |" in body
    assert results_doc.stale_blocks(benchmark.renderers(), docs) == {}
    assert (folder / "bench" / "results_families.json").read_text() == (docs / "results" / "families.json").read_text()
