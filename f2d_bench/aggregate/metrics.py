"""The metrics of a scored run as its scorers declared them: the one source for which metrics enter
hMean/gMean, which way is better, and which measure identity.

`score` writes each scorer's ``MetricSpec`` (plus the scorer's name, note and whether it reads faces)
into ``scores/scoring.json``; the records, Table 1, the report and its plots read them back from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

#: The per-image combinations of the mean metrics (PROTOCOL.md: Identity x Text), higher is better.
COMBINED = ("hmean", "gmean")
#: The six metrics the protocol combines ("hMean and gMean of the six metrics"): without all of them a
#: run has no hMean or gMean, rather than a mean of fewer metrics under the paper's name.
PROTOCOL_MEAN = ("adaface", "sphereface", "facenet", "clip", "dclip", "siglip")


@dataclass(frozen=True)
class MetricCatalog:
    """Metric declarations, in the order the scorers ran (Table 1's column order for the defaults)."""

    specs: tuple[Mapping, ...] = ()

    @classmethod
    def merged(cls, spec_lists: Iterable[Iterable[Mapping]]) -> "MetricCatalog":
        """The union of several runs' declarations; the first declaration of a name wins."""
        seen: dict[str, Mapping] = {}
        for specs in spec_lists:
            for spec in specs:
                seen.setdefault(spec["name"], spec)
        return cls(tuple(seen.values()))

    @property
    def mean_metrics(self) -> tuple[str, ...]:
        """The metrics combined into hMean and gMean (``in_mean``)."""
        return tuple(s["name"] for s in self.specs if s.get("in_mean"))

    @property
    def combines(self) -> bool:
        """Whether hMean and gMean exist: every metric of ``PROTOCOL_MEAN`` was scored."""
        return set(PROTOCOL_MEAN) <= set(self.mean_metrics)

    @property
    def table1_columns(self) -> tuple[str, ...]:
        return (*self.mean_metrics, *COMBINED) if self.combines else self.mean_metrics

    @property
    def identity_metrics(self) -> tuple[str, ...]:
        """Mean metrics computed on the face found in the image (the detection rate stands beside them)."""
        return tuple(s["name"] for s in self.specs if s.get("in_mean") and s.get("identity"))

    @property
    def text_metrics(self) -> tuple[str, ...]:
        return tuple(s["name"] for s in self.specs if s.get("in_mean") and not s.get("identity"))

    def higher_is_better(self) -> dict[str, bool]:
        out = {c: True for c in COMBINED}
        out.update({s["name"]: bool(s.get("higher_is_better", True)) for s in self.specs})
        return out

    def notes(self) -> dict[str, str]:
        """metric -> note (e.g. "random weights: not meaningful"); metrics without a note are absent."""
        return {s["name"]: s["note"] for s in self.specs if s.get("note")}


#: The face rules of ``scores/scoring.json`` that change identity values (each scorer's own settings,
#: version and precision are recorded per scorer).
FACE_RULES = ("face_policy", "min_face_prob", "identity_clamp", "no_face")


def scoring_signature(info: Mapping) -> dict:
    """What in a ``scores/scoring.json`` decides the values: the face rules and, per scorer, its version,
    settings and precision; not the device, batch size or worker count. JSON-ready."""
    return {
        "rules": {k: info.get(k) for k in FACE_RULES},
        "scorers": {s.get("name"): {k: s.get(k) for k in ("version", "settings", "precision")}
                    for s in info.get("scorers", []) if isinstance(s, Mapping)},
    }


def signature_differences(a: Mapping, b: Mapping, a_name: str, b_name: str) -> list[str]:
    """How two :func:`scoring_signature` values differ, one line each (empty when they agree): a face
    rule, or a scorer both ran with another version, settings or precision."""
    rules_a, rules_b = a.get("rules", {}), b.get("rules", {})
    lines = [f"scoring.{k} is {rules_a.get(k)!r} in {a_name}, {rules_b.get(k)!r} in {b_name}"
             for k in FACE_RULES if rules_a.get(k) != rules_b.get(k)]
    mine, theirs = a.get("scorers", {}), b.get("scorers", {})
    for name in [n for n in mine if n in theirs and mine[n] != theirs[n]]:
        what = ", ".join(k for k in mine[name] if mine[name][k] != theirs[name].get(k))
        lines.append(f"{name}: {what} differ between {a_name} and {b_name}")
    return lines
