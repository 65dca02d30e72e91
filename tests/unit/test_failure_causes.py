"""One failure-cause enum: every error's cause is a member, every member is a metric label (from the
start, so a dashboard sees zeros), the README's metrics table names each one, and a cause the
metrics do not know still counts (as internal) instead of raising."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mmtransfer
from mmtransfer import BlockPool, FailureCause, TransferError, TransportUnavailable

ROOT = Path(__file__).resolve().parents[2]


class _Metric:
    def __init__(self, labels, buckets=None):
        self.labels, self.value = labels, 0

    def increment(self, n):
        self.value += n

    def set(self, v):
        self.value = v

    def observe(self, v):
        pass


class _Family:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

    def __init__(self, name, description, kind):
        self.name, self.metrics = name, []

    def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' spelling
        metric = _Metric(labels, buckets)
        self.metrics.append(metric)
        _Family.made.setdefault(self.name, []).append(metric)
        return metric


@pytest.fixture
def metrics():
    from mm_triton.metrics import TritonMetrics

    _Family.made = {}
    pool = BlockPool(4, 8, 16, torch.float32, name="m")
    return TritonMetrics(SimpleNamespace(MetricFamily=_Family), "mm_language", "mm_language_0", pool)


def _failures() -> dict[str, _Metric]:
    return {m.labels["cause"]: m for m in _Family.made["mm_transfer_failures_total"]}


def test_every_cause_is_exported_as_a_metric_label(metrics):
    assert sorted(_failures()) == sorted(c.value for c in FailureCause)


def test_every_transfer_error_has_a_cause_of_the_enum():
    errors = [cls for _, cls in inspect.getmembers(mmtransfer, inspect.isclass) if issubclass(cls, TransferError)]
    assert TransportUnavailable in errors and len(errors) > 10
    for cls in errors:
        assert isinstance(cls.cause, FailureCause), cls


def test_transport_unavailable_is_counted_as_transport_not_internal(metrics):
    metrics.transfer_failed(TransportUnavailable("no GPU on the sender").cause)
    metrics.transfer_failed("no-such-cause")
    counted = {cause: m.value for cause, m in _failures().items() if m.value}
    assert counted == {"transport": 1, "internal": 1}


def test_the_readme_metrics_table_names_every_cause():
    row = next(
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("| `mm_transfer_failures_total")
    )
    named = set(re.findall(r"`([a-z_]+)`", row.split("|")[3]))
    assert named == {c.value for c in FailureCause}
