"""When a study is priority: the ``priority:`` rules of the routes whose models ran on it.

One place decides it for everything that says so: the worklist results (``GET
/worklist-results``), the study results sent to a RIS (HL7, FHIR) and the alerts for priority
findings (webhook, e-mail), which are queued when a job that makes a rule hold finishes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pacsai.config import PriorityRule, Route
from pacsai.operations.results import Finding, ResultOut

__all__ = ["priority_reasons", "rule_reason"]


def rule_reason(rule: PriorityRule, finding: Finding) -> str | None:
    """Why ``rule`` holds on ``finding``, in words; ``None`` when it does not.

    A probability holds at ``min_probability`` (0.5 when not given) and above; a volume holds
    at ``min_volume_ml`` and above, or above zero when not given.
    """
    if finding.label.casefold() != rule.finding.casefold():
        return None
    if finding.probability is not None:
        threshold = 0.5 if rule.min_probability is None else rule.min_probability
        if finding.probability >= threshold:
            return f"{finding.label} probability {finding.probability:.2f} >= {threshold:g}"
        return None
    if finding.volume_ml is None:
        return None
    if rule.min_volume_ml is None:
        return f"{finding.label} present ({finding.volume_ml:.1f} ml)"
    if finding.volume_ml >= rule.min_volume_ml:
        return f"{finding.label} {finding.volume_ml:.1f} ml >= {rule.min_volume_ml:g} ml"
    return None


def priority_reasons(results: Sequence[ResultOut], routes: Mapping[str, Route]) -> list[str]:
    """Why the study is priority: ``route: reason`` for every rule that holds (empty: it is not).

    A result is judged by the rules of the route it came from; routes are looked up by name in
    the configuration (the default routes made when none are configured have no rules).
    """
    reasons: list[str] = []
    for result in results:
        route = routes.get(result.route)
        if route is None:
            continue
        for rule in route.priority or []:
            for finding in result.findings:
                reason = rule_reason(rule, finding)
                if reason is not None:
                    reasons.append(f"{route.name}: {reason}")
    return list(dict.fromkeys(reasons))
