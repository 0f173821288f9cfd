"""Estimator modes behind one interface (estimators/base.py: Estimator, UnitLayout).

To add a mode: write `estimators/<mode>.py` with a class that has `mode`, `layout()` and
`delta_h1()`, and list it in MODES below (and in the request schema's Literal).
"""

from __future__ import annotations

from probe_core.estimators.base import Estimator, UnitLayout
from probe_core.estimators.blocks import BlocksEstimator
from probe_core.estimators.exact import ExactEstimator
from probe_core.estimators.two_batch import TwoBatchEstimator, unconditional_se
from probe_core.estimators.ustat import (BilinearDots, DeltaH1, UnitDots, UnitMeans, UStat,
                                         cross_unit_delta_h1, jackknife_se, u_statistic,
                                         unit_dots)
from probe_core.spec import EstimatorSpec

MODES = {
    "exact": lambda spec: ExactEstimator(),
    "blocks": lambda spec: BlocksEstimator(spec.block_size),
    "two_batch": lambda spec: TwoBatchEstimator(),
}


def estimator_for(spec: EstimatorSpec) -> Estimator:
    """The estimator of a request's `estimator` section."""
    try:
        return MODES[spec.mode](spec)
    except KeyError:
        raise ValueError(f"unknown estimator mode {spec.mode!r}") from None


__all__ = ["BilinearDots", "DeltaH1", "Estimator", "MODES", "UStat", "UnitDots", "UnitLayout",
           "TwoBatchEstimator", "UnitMeans", "cross_unit_delta_h1", "estimator_for", "jackknife_se",
           "u_statistic", "unconditional_se", "unit_dots"]
