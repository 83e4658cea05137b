"""The committed measurements under benchmarks/results/ are well-formed: every row's quantiles
are ordered p20 <= p50 <= p80 (a rate computed from a time's quantiles swaps them unless
`harness.rate_quantiles` is used, as the first GPU run's CSVs showed)."""
import csv
import math
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
CSVS = sorted(p for p in RESULTS.glob("*.csv") if "p20" in p.open().readline())


@pytest.mark.parametrize("path", CSVS, ids=[p.name for p in CSVS])
def test_quantiles_are_ordered(path):
    for line, row in enumerate(csv.DictReader(path.open()), start=2):
        p20, p50, p80 = (float(row[k]) for k in ("p20", "p50", "p80"))
        if not any(math.isnan(v) for v in (p20, p50, p80)):
            assert p20 <= p50 <= p80, f"{path.name}:{line}: p20 {p20} p50 {p50} p80 {p80}"


def test_batch_rows_rates_are_ordered():
    import torch

    from benchmarks import workload

    rows = list(workload.batch_rows("t", "p", "m", "fp32", "s", 4, lambda: sum(range(20_000)),
                                    torch.device("cpu"), warmup=0, reps=9))
    for row in rows:
        assert row.p20 <= row.p50 <= row.p80, row
