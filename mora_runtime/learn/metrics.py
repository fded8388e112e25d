"""Continual-learning metrics of an accuracy matrix (docs/spec.md definitions).

`R[i][j]` is the accuracy (in points, 0-100) on task j after learning tasks 0..i, for T tasks
learned in order (a T x T matrix):

- Transfer: mean accuracy on tasks not learned yet; per task j >= 1 the mean of R[i][j] over
  i < j (the upper triangle), then the mean over those tasks (ZSCL / X-TAIL convention).
- Average:  mean of the whole matrix.
- Last:     mean of the last row (after the final task).
- BWT:      mean drop of a task from just after learning it to the end,
            mean over j < T-1 of R[j][j] - R[T-1][j]; positive means forgetting.

Against the frozen base's matrix Z (the `zero-shot` method, scored in the same label space at
every stage, so Z[i][j] is what R[i][j] would be without learning anything):

- Gain kept: per task j < T-1, (R[T-1][j] - Z[T-1][j]) / (R[j][j] - Z[j][j]) in %, the share
  of what learning the task added over the base that is still there at the end. n/a when the
  learned gain is under `MIN_GAIN` points; the mean is over the tasks where it is defined.
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


# Below this learned gain (points) a task's "gain kept" is n/a: on the built-in suites' test
# sets a few points are a handful of examples, and a ratio of two such small differences is
# noise (or a division by ~0), not a share.
MIN_GAIN = 5.0


@dataclass(frozen=True)
class GainKept:
    """Per task j < T-1 (in order) the % of its learned gain kept at the end, or None (n/a)."""

    per_task: tuple[float | None, ...]
    mean: float | None  # over the tasks with a value; None when there is none

    def as_dict(self, tasks: Sequence[str]) -> dict[str, object]:
        return {
            "per_task": {
                task: (None if v is None else round(v, 2))
                for task, v in zip(tasks, self.per_task, strict=False)
            },
            "mean": None if self.mean is None else round(self.mean, 2),
        }


def gain_kept(matrix: Matrix, zero_shot: Matrix, *, min_gain: float = MIN_GAIN) -> GainKept:
    """Share (%) of each task's gain over the frozen base kept after the last task.

    `zero_shot` is the base's T x T matrix in the same label spaces; a gain under `min_gain`
    points just after learning gives None. Values above 100 (the task improved later) and
    below 0 (it ended under the base) are kept as they are."""
    t = check_matrix(matrix)
    if check_matrix(zero_shot) != t:
        raise ValueError("the zero-shot matrix must have the same shape as the matrix")
    if not min_gain > 0:
        raise ValueError(f"min_gain must be positive, got {min_gain}")
    kept: list[float | None] = []
    for j in range(t - 1):
        learned = matrix[j][j] - zero_shot[j][j]
        end = matrix[t - 1][j] - zero_shot[t - 1][j]
        kept.append(100.0 * end / learned if learned >= min_gain else None)
    values = [v for v in kept if v is not None]
    return GainKept(tuple(kept), _mean(values) if values else None)


def continual_metrics(matrix: Matrix) -> ContinualMetrics:
    return ContinualMetrics(
        transfer(matrix), average(matrix), last(matrix), backward_transfer(matrix)
    )
