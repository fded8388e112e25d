"""One evaluation's outcome: accuracy, and for MoRA what the task's tokens activated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mora_runtime.experts.stats import SequenceRouting


@dataclass(frozen=True)
class TaskResult:
    """Accuracy in points (0-100) of one method on one task at one stage.

    `purity`: the share of activated ranks that belong to the task's own expert set (None
    before that set exists); `active_ranks`: mean experts active per (token, adapted layer).
    `alt_accuracy`: the same predictions scored over a second, smaller label space (CLIP:
    without the base model's labels), or None.
    """

    accuracy: float
    alt_accuracy: float | None = None
    purity: float | None = None
    active_ranks: float | None = None
    set_shares: dict[str, float] | None = None


def routing_result(
    accuracy: float,
    routings: Sequence[SequenceRouting],
    own_set: str | None,
    alt_accuracy: float | None = None,
) -> TaskResult:
    """Pool all sequences of a task: purity = own activations / all activations."""
    total = SequenceRouting()
    for routing in routings:
        total = total.merge(routing)
    shares = total.set_shares()
    purity = None
    if own_set is not None:
        purity = 100.0 * shares.get(own_set, 0.0) if shares else 0.0
    return TaskResult(
        accuracy,
        alt_accuracy=alt_accuracy,
        purity=purity,
        active_ranks=total.mean_active_ranks,
        set_shares={name: round(100.0 * share, 2) for name, share in shares.items()},
    )
