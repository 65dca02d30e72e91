"""Reading Prometheus text exposition (Triton's /metrics): every sample by name and labels, and sums over
label subsets. Used by the launcher's users (scripts, benchmarks, tests); stdlib only."""

from __future__ import annotations

import re
from typing import Mapping

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?\s*$")


def _parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    """'{a="x",b="y\\"z"}' -> (("a","x"),("b",'y"z')), sorted by name."""
    body = text[1:-1]
    labels: dict[str, str] = {}
    i, n = 0, len(body)
    while i < n:
        while i < n and body[i] in " ,":
            i += 1
        if i >= n:
            break
        eq = body.index("=", i)
        name = body[i:eq].strip()
        if body[eq + 1] != '"':
            raise ValueError(f"bad label value in {text!r}")
        j = eq + 2
        value = []
        while body[j] != '"':
            if body[j] == "\\":
                j += 1
                value.append({"n": "\n", "\\": "\\", '"': '"'}.get(body[j], "\\" + body[j]))
            else:
                value.append(body[j])
            j += 1
        labels[name] = "".join(value)
        i = j + 1
    return tuple(sorted(labels.items()))


def parse_metrics(text: str) -> Metrics:
    """Prometheus text exposition -> {(name, ((label, value), ...sorted)): value}.

    Histogram series appear under their own names (x_bucket with an "le" label, x_sum, x_count)."""
    out: Metrics = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        try:
            v = float(value)
        except ValueError:
            continue
        out[(name, _parse_labels(labels) if labels else ())] = v
    return out


_MISSING = object()


def metric_value(metrics: Mapping, name: str, default=_MISSING, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (a subset match).

    Raises KeyError when no sample matches, unless a default is given."""
    want = {k: str(v) for k, v in labels.items()}
    total, found = 0.0, False
    for (n, lab), v in metrics.items():
        if n != name:
            continue
        d = dict(lab)
        if all(d.get(k) == val for k, val in want.items()):
            total += v
            found = True
    if not found:
        if default is _MISSING:
            raise KeyError(f"no metric {name}{want or ''}")
        return default
    return total
