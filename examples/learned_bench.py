"""The harness of the learned-model sections of ``benchmark.py`` (``learned-mixture``, ``mnist``): rows as data.

A section is a learned unconditional DDPM (a ``UNet2DModel`` and its scheduler config), clean data for the
calibrated covariance, a scorer of sample sets and its rows:

* the diffusers baselines :data:`BASELINE_NAMES` (``image_mixture.BASELINES``: DDIM, DPM-Solver++ (2M), UniPC (bh2),
  DDPM), each at its own diffusers defaults on the model's scheduler config, at :data:`BUDGETS` model calls, and DDPM
  over all the model's training steps (the model's own limit, :data:`LIMIT_STEPS`);
* the MMGibbs rows, one :class:`MMGibbsRow` each: a name, ``MMGibbsScheduler`` settings (the layout of the levels
  among them: ``timestep_spacing``, or ``source_scheduler`` for another diffusers scheduler's levels), an optional
  calibrated covariance table (calibrated on the section's clean data for the row's budgets) and the budgets.
  A section's rows are its ``MMGIBBS_ROWS`` list: add research settings there, e.g.
  ``MMGibbsRow("calibrated, eta 1", {"covariance": "calibrated", "eta": 1.0}, calibration=CALIBRATED)``.

Paired seeds: for a seed every sampler starts from the same noise, ``randn_tensor((n, *shape),
generator=torch.Generator().manual_seed(seed), dtype=unet.dtype)`` (MomentMatchingGibbsPipeline's draw and
``image_mixture.run_diffusers``'s), so per-seed differences between rows are the samplers'.

Model calls: forwards per sample, a backward pass or a JVP counted as 2 (``image_mixture.equivalents``). The
calibration is paid once per model and schedule and reported apart. Results are cached per (row, budget, seed,
samples) in ``out_dir/<section>.json`` (``--force`` recomputes; the cache key is the row's settings, not its name).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from image_mixture import equivalents, run_diffusers

from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline
from mmgibbs.calibration import CovarianceTable

#: the diffusers samplers of the learned sections (keys of ``image_mixture.BASELINES``)
BASELINE_NAMES = ("DDIM", "DPM-Solver++ (2M)", "UniPC (bh2)", "DDPM")
BUDGETS = (10, 20, 50)
#: DDPM over every training step: the model's own limit
LIMIT_STEPS = 1000
#: MMGibbsScheduler settings that change the draws but not the levels (rows differing in these share a table)
SAMPLING_ONLY = frozenset(
    (
        "covariance",
        "eta",
        "transition",
        "mean_order",
        "corrector",
        "final_output",
        "variance_bound",
        "num_probes",
        "jacobian",
        "product_batch",
    )
)
#: the MMGibbsScheduler settings that lay out the levels (a calibrated table is fitted at those levels)
LAYOUT_SETTINGS = ("source_scheduler", "timestep_spacing")


def layout_of(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`LAYOUT_SETTINGS` among ``settings``: what a calibrated table for them must be fitted with."""
    return {k: settings[k] for k in LAYOUT_SETTINGS if k in settings}


#: the calibrated table of the ``calibrated`` rows (``pipe.calibrate_covariance`` keywords)
CALIBRATED: Mapping[str, Any] = {"num_clusters": 16, "rank": 16}


@dataclass(frozen=True)
class MMGibbsRow:
    """One MMGibbs setting of a section.

    Args:
        name: the row's label (``"MMGibbs "`` is prefixed in the tables).
        settings: ``MMGibbsScheduler.from_config(model config, **settings)`` keywords: ``covariance``, ``eta``,
            ``transition``, ``gibbs_sweeps``, ``variance_bound``, ``final_output``, ... and the layout of the levels
            (``timestep_spacing``, or ``source_scheduler="DPMSolverMultistepScheduler"`` for that scheduler's levels;
            default: the model's own scheduler's layout for the budget).
        calibration: ``None`` (no table), or ``pipe.calibrate_covariance`` keywords (``num_clusters``, ``rank``,
            ``shrinkage``, ``factor_iterations``): a table calibrated on the section's clean data for the levels of
            ``budgets`` under ``settings``' layout, once, set on the scheduler.
        budgets: the numbers of levels (= model calls for forward-only covariances) the row runs at.
    """

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Any] | None = None
    budgets: tuple[int, ...] = (10, 20)

    @property
    def label(self) -> str:
        return f"MMGibbs {self.name}"

    def table_key(self) -> str:
        """What decides the table: its structure, the budgets and every setting that may move the levels (all but
        :data:`SAMPLING_ONLY`), so rows differing only in how they draw share one table."""
        layout = {k: v for k, v in self.settings.items() if k not in SAMPLING_ONLY}
        return json.dumps(
            {"calibration": dict(self.calibration or {}), "layout": layout, "budgets": list(self.budgets)},
            sort_keys=True,
        )

    def key(self, budget: int) -> str:
        spec = {"settings": dict(self.settings), "calibration": dict(self.calibration or {})}
        if self.calibration is not None:
            spec["calibrated_for"] = list(self.budgets)
        return f"mmgibbs|{json.dumps(spec, sort_keys=True)}|{budget}"


#: the MMGibbs rows every learned section starts with (the lead's research rows are appended per section)
DEFAULT_MMGIBBS_ROWS: tuple[MMGibbsRow, ...] = (
    MMGibbsRow("isotropic, eta 0", {"covariance": "isotropic", "eta": 0.0}),
    MMGibbsRow("calibrated, eta 0", {"covariance": "calibrated", "eta": 0.0}, calibration=CALIBRATED),
)
#: the levers of the real-data issue, one at a time on top of ``isotropic, eta 0`` (docs/results.md, "Why real
#: digits were different"): DPM-Solver's layout of the levels (no call spent at t = 0), the last posterior mean
#: returned instead of a last draw, the second-order mean (``mean_order=2``, DPM-Solver++(2M)'s extrapolated data
#: prediction inside the draw, the draw's variance matched to the step) and UniPC's corrector on it
#: (``corrector=True``); and the calibrated table with the same levers (its last output a draw: a mean erases the
#: small directions the table restores)
DPM_LEVELS: Mapping[str, Any] = {"source_scheduler": "DPMSolverMultistepScheduler"}
LEVER_ROWS: tuple[MMGibbsRow, ...] = (
    MMGibbsRow("isotropic, eta 0, DPM-Solver levels", {"covariance": "isotropic", "eta": 0.0, **DPM_LEVELS}),
    MMGibbsRow(
        "isotropic, eta 0, DPM-Solver levels, final mean",
        {"covariance": "isotropic", "eta": 0.0, "final_output": "mean", **DPM_LEVELS},
    ),
    MMGibbsRow(
        "2nd order, isotropic, eta 0, DPM-Solver levels, final mean",
        {"covariance": "isotropic", "eta": 0.0, "final_output": "mean", "mean_order": 2, **DPM_LEVELS},
    ),
    MMGibbsRow(
        "2nd order, isotropic, eta 0, trailing levels, final mean",
        {
            "covariance": "isotropic",
            "eta": 0.0,
            "final_output": "mean",
            "mean_order": 2,
            "timestep_spacing": "trailing",
        },
    ),
    MMGibbsRow(
        "2nd order + corrector, isotropic, eta 0, DPM-Solver levels, final mean",
        {
            "covariance": "isotropic",
            "eta": 0.0,
            "final_output": "mean",
            "mean_order": 2,
            "corrector": True,
            **DPM_LEVELS,
        },
    ),
    MMGibbsRow(
        "2nd order + corrector, isotropic, eta 0, DPM-Solver levels, final mean, variance_bound 0.5",
        {
            "covariance": "isotropic",
            "eta": 0.0,
            "final_output": "mean",
            "mean_order": 2,
            "corrector": True,
            "variance_bound": 0.5,
            **DPM_LEVELS,
        },
    ),
    MMGibbsRow(
        "2nd order, calibrated, eta 0, DPM-Solver levels",
        {"covariance": "calibrated", "eta": 0.0, "mean_order": 2, **DPM_LEVELS},
        calibration=CALIBRATED,
    ),
    MMGibbsRow(
        "2nd order + corrector, calibrated, eta 0, DPM-Solver levels",
        {"covariance": "calibrated", "eta": 0.0, "mean_order": 2, "corrector": True, **DPM_LEVELS},
        calibration=CALIBRATED,
    ),
)
#: the levers together, isotropic and calibrated (the rows of the mnist and learned-mixture sections)
KEY_LEVER_ROWS: tuple[MMGibbsRow, ...] = tuple(
    r for r in LEVER_ROWS if r.name.startswith("2nd order") and "DPM" in r.name
)


@dataclass
class Summary:
    """One row at one budget: ``results`` per seed (the scorer's metrics, ``equiv`` = model calls per sample,
    ``seconds``)."""

    name: str
    budget: int
    num_samples: int
    results: list[dict[str, Any]]
    baseline: bool

    def values(self, metric: str) -> np.ndarray:
        return np.array([r[metric] for r in self.results], dtype=float)

    def as_dict(self) -> dict[str, Any]:
        """For the results file (:meth:`from_dict`); also the shape ``image_mixture.verdicts`` reads."""
        return {
            "name": self.name,
            "budget": self.budget,
            "num_samples": self.num_samples,
            "results": self.results,
            "baseline": self.baseline,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        return cls(data["name"], data["budget"], data["num_samples"], list(data["results"]), data["baseline"])


class LearnedBench:
    """A learned DDPM, its clean data, a scorer and the result cache of one section.

    Args:
        section: the section's name (cache ``out_dir/<section>.json``, tables ``out_dir/<section>_table_*``).
        unet: the model (float32 ``UNet2DModel``).
        config: its scheduler config (the baselines' and MMGibbs's noise schedule).
        clean: ``() -> clean samples`` for the calibrated tables (called once, when a table is first needed).
        clean_id: names the clean data in the tables' file names (e.g. ``"16000 exact samples"``).
        score: ``samples -> metrics`` (a dict of floats).
        num_samples, seeds: samples per seed and the seeds (paired).
        out_dir, force: cache folder; recompute cached results.
        only: keep only the rows whose label contains one of these (None: all).
    """

    def __init__(
        self,
        section: str,
        unet: torch.nn.Module,
        config: Mapping[str, Any],
        clean: Callable[[], torch.Tensor],
        score: Callable[[torch.Tensor], dict[str, float]],
        num_samples: int,
        seeds: Sequence[int],
        out_dir: Path,
        force: bool = False,
        only: Sequence[str] | None = None,
        clean_id: str = "",
    ) -> None:
        self.section, self.unet, self.config = section, unet.eval(), dict(config)
        self.clean, self.score, self.clean_id = clean, score, clean_id
        self.n, self.seeds, self.out_dir, self.force, self.only = num_samples, list(seeds), out_dir, force, only
        out_dir.mkdir(parents=True, exist_ok=True)
        self.cache_path = out_dir / f"{section.replace('-', '_')}.json"
        self.cache: dict[str, Any] = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        # results are keyed by the weights too: a retrained checkpoint does not read the old model's rows
        weights = hashlib.sha1()
        for p in self.unet.parameters():
            weights.update(p.detach().cpu().numpy().tobytes())
        self.model_id = weights.hexdigest()[:12]
        self.tables: dict[str, CovarianceTable] = {}
        self.calibration_notes: list[str] = []
        self._clean: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ results
    def keep(self, label: str) -> bool:
        return not self.only or any(k in label for k in self.only)

    def result(
        self, key: str, seed: int, run: Callable[[int, int], tuple[torch.Tensor, float]], n: int | None = None
    ) -> dict[str, Any]:
        """``run(seed, n) -> (samples, model calls per sample)``, scored and cached under ``key``."""
        n = self.n if n is None else n
        full_key = self._key(key, seed, n)
        if full_key in self.cache and not self.force:
            return self.cache[full_key]
        start = time.perf_counter()
        samples, calls = run(seed, n)
        seconds = time.perf_counter() - start
        res = {**self.score(samples), "equiv": calls, "seconds": seconds}
        self.cache[full_key] = res
        self.cache_path.write_text(json.dumps(self.cache, indent=1))
        return res

    def summary(
        self,
        name: str,
        budget: int,
        key: str,
        run: Callable[[int, int], tuple[torch.Tensor, float]],
        baseline: bool,
        n: int | None = None,
        seeds: Sequence[int] | None = None,
        prepare: Callable[[], Any] | None = None,
    ) -> Summary:
        """The row's results on ``seeds`` (default: all); ``prepare()`` (e.g. a calibration) runs first, outside
        the timed runs, when a result is not cached."""
        seeds = self.seeds if seeds is None else list(seeds)
        n = self.n if n is None else n
        if prepare is not None and (self.force or any(self._key(key, s, n) not in self.cache for s in seeds)):
            prepare()
        return Summary(name, budget, n, [self.result(key, s, run, n) for s in seeds], baseline)

    def _key(self, key: str, seed: int, n: int) -> str:
        return f"{key}|seed={seed}|n={n}|model={self.model_id}"

    # ------------------------------------------------------------------------------------------------ samplers
    def baseline(self, name: str, steps: int) -> Callable[[int, int], tuple[torch.Tensor, float]]:
        """diffusers' ``name`` (``image_mixture.BASELINES``) at its defaults on the model's config."""
        return lambda seed, n: run_diffusers(self.unet, name, steps, n, seed, config=self.config)

    def pipeline(self, row: MMGibbsRow) -> MomentMatchingGibbsPipeline:
        scheduler = MMGibbsScheduler.from_config(self.config, **row.settings)
        pipe = MomentMatchingGibbsPipeline(unet=self.unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        if row.calibration is not None:
            scheduler.set_covariance_table(self.table(row, pipe))
        return pipe

    def mmgibbs(self, row: MMGibbsRow, budget: int) -> Callable[[int, int], tuple[torch.Tensor, float]]:
        def run(seed: int, n: int) -> tuple[torch.Tensor, float]:
            out = self.pipeline(row)(
                batch_size=n,
                num_inference_steps=budget,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
            )
            return out.images, equivalents(out.num_forward, out.num_backward, out.num_jvp)

        return run

    def table(self, row: MMGibbsRow, pipe: MomentMatchingGibbsPipeline) -> CovarianceTable:
        """The row's calibrated table: from memory, from ``out_dir`` (unless ``force``), or calibrated here on the
        clean data for the levels of ``row.budgets`` (generator seed 5, as the digits section)."""
        key = row.table_key()
        if key in self.tables:
            return self.tables[key]
        config = json.dumps(self.config, sort_keys=True, default=str)
        digest = hashlib.sha1(f"{key}|{config}|{self.model_id}|{self.clean_id}".encode()).hexdigest()
        path = self.out_dir / f"{self.section.replace('-', '_')}_table_{digest[:12]}.safetensors"
        if path.exists() and not self.force:
            table = CovarianceTable.load(path)
        else:
            if self._clean is None:
                self._clean = self.clean()
            start = time.perf_counter()
            table = pipe.calibrate_covariance(
                list(row.budgets),
                samples=self._clean,
                generator=torch.Generator().manual_seed(5),
                batch_size=2000,
                **row.calibration,
            )
            table.settings["seconds"] = time.perf_counter() - start
            table.save(path)
        self.tables[key] = table
        self.calibration_notes.append(
            f"- `{row.label}`: {dict(row.calibration or {})}, for {list(row.budgets)} levels: "
            f"{table.num_samples} clean samples x {len(table.levels)} levels = {table.sample_forwards} single-sample "
            f"forwards, {table.settings.get('seconds', float('nan')):.0f} s (once per model and schedule)."
        )
        return table

    # ------------------------------------------------------------------------------------------------ rows
    def run_rows(
        self,
        mmgibbs_rows: Sequence[MMGibbsRow],
        budgets: Sequence[int] = BUDGETS,
        limit_steps: int | None = LIMIT_STEPS,
        limit_samples: int | None = None,
        limit_seeds: int | None = 1,
    ) -> list[Summary]:
        """Every baseline at ``budgets``, the MMGibbs rows at theirs, then DDPM over ``limit_steps`` (None: no limit
        row) with ``limit_samples`` samples (default: the section's) on the first ``limit_seeds`` seeds (None: all)."""
        out: list[Summary] = []
        for budget in budgets:
            for name in BASELINE_NAMES:
                if self.keep(name):
                    out.append(
                        self._log(
                            self.summary(name, budget, f"diffusers|{name}|{budget}", self.baseline(name, budget), True)
                        )
                    )
        for row in mmgibbs_rows:
            if not self.keep(row.label):
                continue
            for budget in row.budgets:
                out.append(
                    self._log(
                        self.summary(
                            row.label,
                            budget,
                            row.key(budget),
                            self.mmgibbs(row, budget),
                            False,
                            prepare=lambda r=row: self.pipeline(r),
                        )
                    )
                )
        if limit_steps is not None and self.keep("DDPM"):
            seeds = self.seeds if limit_seeds is None else self.seeds[:limit_seeds]
            n = min(self.n, limit_samples) if limit_samples else self.n
            out.append(
                self._log(
                    self.summary(
                        "DDPM, all training steps (the model's limit)",
                        limit_steps,
                        f"diffusers|DDPM|{limit_steps}",
                        self.baseline("DDPM", limit_steps),
                        False,
                        n=n,
                        seeds=seeds,
                    )
                )
            )
        return out

    def _log(self, s: Summary) -> Summary:
        metric = next(iter(k for k in s.results[0] if k not in ("equiv", "seconds")))
        print(f"  [{self.section}] {s.name} {s.budget}: {metric} {s.values(metric).mean():.4g}", flush=True)
        return s


# ------------------------------------------------------------------------------------------------ formatting
def spread(values: np.ndarray | Sequence[float]) -> float:
    """Sample standard deviation over seeds (nan for one seed)."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def mean_std_seeds(values: np.ndarray | Sequence[float], digits: int) -> str:
    """``mean ± std (seed 1 / seed 2 / ...)``."""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.{digits}f} ± {spread(v):.{digits}f} ({' / '.join(f'{x:.{digits}f}' for x in v)})"


#: a table column: header and ``results per seed -> cell``
Column = tuple[str, Callable[[list[dict[str, Any]]], str]]


def table_lines(
    columns: Sequence[Column],
    summaries: Sequence[Summary],
    seeds: Sequence[int],
    first: Sequence[tuple[str, list[dict[str, Any]]]] = (),
) -> list[str]:
    """A markdown table: sampler | steps | model calls | ``columns`` | s/seed, the ``first`` rows (name, results;
    floors) then one per summary; a row run on fewer samples or seeds than the section says so in its name."""
    head = ["sampler", "steps", "model calls", *(c[0] for c in columns), "s/seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n = max((s.num_samples for s in summaries), default=0)

    def line(name: str, steps: object, calls: object, results: list[dict[str, Any]]) -> str:
        cells = [name, str(steps), str(calls), *(fn(results) for _, fn in columns)]
        return "| " + " | ".join(cells) + f" | {np.mean([r['seconds'] for r in results]):.1f} |"

    lines += [line(name, "-", 0, results) for name, results in first]
    for s in summaries:
        note = (
            f" ({s.num_samples} samples, seed {list(seeds[: len(s.results)])})"
            if s.num_samples != n or len(s.results) < len(seeds)
            else ""
        )
        lines.append(line(s.name + note, s.budget, f"{s.values('equiv').max():.0f}", s.results))
    return lines


def fd_verdicts(summaries: Sequence[Summary], budgets: Sequence[int], metric: str = "fd") -> list[str]:
    """Per budget: the best MMGibbs row at equal or fewer model calls against the best diffusers sampler by mean
    ``metric``, paired by seed."""
    lines = []
    for budget in budgets:
        base = [s for s in summaries if s.baseline and s.budget == budget]
        ours = [s for s in summaries if not s.baseline and s.budget <= budget and s.values("equiv").max() <= budget]
        if not base or not ours:
            continue
        best_base = min(base, key=lambda s: s.values(metric).mean())
        best = min(ours, key=lambda s: s.values(metric).mean())
        diff = best.values(metric) - best_base.values(metric)
        lines.append(
            f"- **{budget} calls**: best MMGibbs `{best.name}` ({best.budget}) {metric.upper()} "
            f"{' / '.join(f'{v:.3f}' for v in best.values(metric))} vs best diffusers `{best_base.name}` "
            f"{' / '.join(f'{v:.3f}' for v in best_base.values(metric))}; paired difference "
            f"{' / '.join(f'{d:+.3f}' for d in diff)} (MMGibbs no worse on {int((diff <= 0).sum())} of {len(diff)} "
            "seeds)."
        )
    return lines
