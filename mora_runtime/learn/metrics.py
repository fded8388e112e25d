"""Continual-learning metrics of an accuracy matrix (docs/spec.md definitions).

`R[i][j]` is the accuracy (in points, 0-100) on task j after learning tasks 0..i, for T tasks
learned in order (a T x T matrix):

- Transfer: mean accuracy on tasks not learned yet; per task j >= 1 the mean of R[i][j] over
  i < j (the upper triangle), then the mean over those tasks (ZSCL / X-TAIL convention).
- Average:  mean of the whole matrix.
- Last:     mean of the last row (after the final task).
- BWT:      mean drop of a task from just after learning it to the end,
            mean over j < T-1 of R[j][j] - R[T-1][j]; positive means forgetting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

Matrix = Sequence[Sequence[float]]


@dataclass(frozen=True)
class ContinualMetrics:
    transfer: float | None  # None with a single task (nothing is ever "not learned yet")
    average: float
    last: float
    bwt: float | None  # None with a single task

    def as_dict(self) -> dict[str, float | None]:
        return {k: (None if v is None else round(v, 2)) for k, v in asdict(self).items()}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def check_matrix(matrix: Matrix) -> int:
    """The number of tasks T; ValueError unless `matrix` is T x T of finite numbers."""
    t = len(matrix)
    if t == 0 or any(len(row) != t for row in matrix):
        raise ValueError("the accuracy matrix must be square and non-empty (T x T)")
    for row in matrix:
        for value in row:
            if not isinstance(value, int | float) or value != value:
                raise ValueError(f"accuracy {value!r} is not a number")
    return t


def transfer(matrix: Matrix) -> float | None:
    t = check_matrix(matrix)
    if t < 2:
        return None
    return _mean([_mean([matrix[i][j] for i in range(j)]) for j in range(1, t)])


def average(matrix: Matrix) -> float:
    check_matrix(matrix)
    return _mean([value for row in matrix for value in row])


def last(matrix: Matrix) -> float:
    check_matrix(matrix)
    return _mean(matrix[-1])


def backward_transfer(matrix: Matrix) -> float | None:
    t = check_matrix(matrix)
    if t < 2:
        return None
    return _mean([matrix[j][j] - matrix[t - 1][j] for j in range(t - 1)])


def continual_metrics(matrix: Matrix) -> ContinualMetrics:
    return ContinualMetrics(
        transfer(matrix), average(matrix), last(matrix), backward_transfer(matrix)
    )
