"""The recommended Gibbs settings per model family and budget: one table, read by ``mmgibbs.compare`` and the docs.

The recommendation and the measurements behind it are in ``docs/guide.md`` ("Which setting for which budget");
``tests/test_docs.py`` checks that the page's table says what :func:`recommended_settings` returns. To change a
recommendation, edit :data:`RECOMMENDED` (and, where a family differs, :data:`FAMILY_RECOMMENDED`) and that table.

A budget is the number of model calls per sample (forward equivalents: a forward 1, a backward pass or a JVP 2).
The settings hold no level count: the levels follow from the budget and the settings' cost per level
(:func:`mmgibbs.compare.levels_for_budget`).
"""

from __future__ import annotations

from typing import Any

#: measured budgets -> {"calibrated": settings when the pipeline holds a calibrated table, "uncalibrated": else};
#: figures: docs/guide.md. Between measured budgets the largest measured budget not above the asked one applies
#: (below the smallest: the smallest).
#: at 10-20 calls, without a table: the isotropic draw centred on the 2nd-order mean with UniPC's corrector, the last
#: posterior mean as the output, and levels that spend no call at t = 0 (``trailing``; flow schedules have none to
#: spend there and ignore it): the setting that beats UniPC on the digits DDPM and ties it on the MNIST DDPM
FEW_CALLS: dict[str, Any] = {
    "covariance": "isotropic",
    "eta": 0.0,
    "mean_order": 2,
    "corrector": True,
    "final_output": "mean",
    "timestep_spacing": "trailing",
}
RECOMMENDED: dict[int, dict[str, dict[str, Any]]] = {
    10: {
        "calibrated": {"covariance": "calibrated", "eta": 0.0},
        "uncalibrated": dict(FEW_CALLS),
    },
    20: {
        "calibrated": {"covariance": "calibrated", "eta": 0.0},
        "uncalibrated": dict(FEW_CALLS),
    },
    50: {
        "calibrated": {"covariance": "calibrated", "eta": 0.0},
        "uncalibrated": {"covariance": "isotropic", "eta": 1.0},
    },
}
#: per-family replacements of :data:`RECOMMENDED` (family class name -> the same layout). Unconditional models are
#: pixel-space images in [-1, 1] (per-pixel variance about 0.3): a variance bound of 0.5 instead of the range's 1 keeps
#: the isotropic draw nearer their posterior variance at high noise; measured at 10 / 20 calls, digits DDPM FD
#: 0.500 / 0.482 (0.497 / 0.485 with 1; UniPC 0.554 / 0.500), MNIST DDPM 2.245 / 2.284 (2.309 / 2.310; UniPC 2.261 /
#: 2.337), research/exp_corrector.py and the digits-levers / mnist benchmark sections
FAMILY_RECOMMENDED: dict[str, dict[int, dict[str, dict[str, Any]]]] = {
    "Unconditional": {
        budget: {
            **settings,
            "uncalibrated": {**settings["uncalibrated"], "variance_bound": 0.5}
            if settings["uncalibrated"].get("mean_order") == 2
            else settings["uncalibrated"],
        }
        for budget, settings in RECOMMENDED.items()
    }
}

#: the estimator that reads each table structure (``CovarianceTable.structure``), in place of the recommendation's
#: ``calibrated`` when the table is of that structure
TABLE_READERS = {"low_rank": "calibrated", "stationary": "calibrated_stationary"}


def family_key(family: Any) -> str:
    """The class name of a family given as a class (``mmgibbs.families.Unconditional``), an instance or a name."""
    if isinstance(family, str):
        return family
    return family.__name__ if isinstance(family, type) else type(family).__name__


def recommended_settings(
    family: Any, model_calls: int, calibrated: bool = False, structure: str = "low_rank"
) -> dict[str, Any]:
    """The recommended Gibbs settings for ``family`` at ``model_calls`` model calls per sample.

    Args:
        family: the model family: a class of ``mmgibbs.families`` (or an instance, or its class name, e.g.
            ``"Unconditional"``, ``"StableDiffusion"``).
        model_calls: the budget, model-evaluation equivalents per sample (a positive integer).
        calibrated: whether the pipeline holds a calibrated covariance table (``calibrate_covariance``; every
            family calibrates, a conditional one per conditioning and guidance).
        structure: with ``calibrated``, the table's structure (``CovarianceTable.structure``): the estimator that
            reads it (:data:`TABLE_READERS`) replaces ``calibrated``.

    Returns a new dict of ``MMGibbsScheduler`` settings (``covariance``, ``eta``, ...), without the level count.
    """
    if isinstance(model_calls, bool) or not isinstance(model_calls, int) or model_calls < 1:
        raise ValueError(f"`model_calls` must be a positive integer; got {model_calls!r}.")
    if structure not in TABLE_READERS:
        raise ValueError(f"`structure` must be one of {', '.join(map(repr, TABLE_READERS))}; got {structure!r}.")
    table = FAMILY_RECOMMENDED.get(family_key(family), RECOMMENDED)
    measured = sorted(table)
    budget = max((b for b in measured if b <= model_calls), default=measured[0])
    settings = dict(table[budget]["calibrated" if calibrated else "uncalibrated"])
    if calibrated and settings.get("covariance") == "calibrated":
        settings["covariance"] = TABLE_READERS[structure]
    return settings


__all__ = ["FAMILY_RECOMMENDED", "RECOMMENDED", "TABLE_READERS", "family_key", "recommended_settings"]
