"""Ray Tune's Optuna searcher with Optuna's TPE sampler, fed only the reports that carry the metric.

Imported by `orchestration.search` for `tune.search = "tpe"` only (it imports Ray and Optuna).
"""
from __future__ import annotations

from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch


class MetricOnlyOptunaSearch(OptunaSearch):
    """`OptunaSearch` with `optuna.samplers.TPESampler(seed=seed)`. The engine reports a
    checkpoint before its first evaluation without the metric; Optuna's intermediate values
    are recorded from the reports that have it (OptunaSearch itself would fail on the others)."""

    def __init__(self, seed: int) -> None:
        super().__init__(sampler=optuna.samplers.TPESampler(seed=seed))

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)
