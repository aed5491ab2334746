"""ServingConfig: how the served model answers (tasks, features, K0, probes, Value Model)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from sterling.models.value_model import ValueModel

__all__ = ["ServingConfig"]


@dataclass(frozen=True)
class ServingConfig:
    """How the composed model answers.

    Args:
        tasks (tuple[str, ...]): task names ``T``, in the order of the scores (and of the task
            queries unless ``queries`` names them).
        features (tuple[str, ...]): the user tower's context + user features, in order.
        k0 (int): candidates each task query takes from the index.
        nprobe (int | None): lists probed (None: the index's default).
        primary_task (str): the ranking score when there is no Value Model.
        value_formula (str | None): the Value Model's formula over the task probabilities.
        max_history (int): most recent history events read.
        use_overarch (bool): re-score with the OverArch (when the model has one); False ranks the
            index's candidates by inner product.
        queries (tuple[str, ...]): the task queries the index answers, when they are not ``tasks``
            (a next-item retriever's one query ``next`` under a ranker scoring click, like, ...).
        use_ranker (bool): score the candidates with the request-level ranker (when the model has
            one; it replaces the OverArch); False falls back to the OverArch or inner products.
        retrieval_temperature (float | None): with a ranker, the softmax temperature the retriever
            was trained with: a task's score is then P(engage = candidate) × P(task | shown), the
            first query's softmax over the request's candidates times the ranker's probability
            (:meth:`~sterling.retrieval.model.RetrievalModel.engagement_prior`); None: the
            ranker's probability alone.
    """

    tasks: tuple[str, ...]
    features: tuple[str, ...] = ()
    k0: int = 1000
    nprobe: int | None = None
    primary_task: str | None = None
    value_formula: str | None = None
    max_history: int = 100
    use_overarch: bool = True
    queries: tuple[str, ...] = ()
    use_ranker: bool = True
    retrieval_temperature: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty tuple of distinct names, got {self.tasks!r}")
        if isinstance(self.queries, str) or len(set(self.queries)) != len(self.queries):
            raise ValueError(f"queries must be a tuple of distinct names, got {self.queries!r}")
        if isinstance(self.features, str) or len(set(self.features)) != len(self.features):
            raise ValueError(f"features must be a tuple of distinct names, got {self.features!r}")
        for name in ("k0", "max_history"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.nprobe is not None and (
            isinstance(self.nprobe, bool) or not isinstance(self.nprobe, int) or self.nprobe < 1
        ):
            raise ValueError(f"nprobe must be None or an int >= 1, got {self.nprobe!r}")
        if self.retrieval_temperature is not None and (
            isinstance(self.retrieval_temperature, bool)
            or not isinstance(self.retrieval_temperature, (int, float))
            or not 0 < self.retrieval_temperature < float("inf")
        ):
            raise ValueError(
                f"retrieval_temperature must be None or a finite number > 0, got {self.retrieval_temperature!r}"
            )
        if self.value_formula is not None:
            ValueModel(self.value_formula, self.tasks)  # a FormulaError here, never at query time
        if self.primary_task is not None and self.primary_task not in self.tasks:
            raise ValueError(f"primary task {self.primary_task!r} is not one of the tasks {list(self.tasks)}")

    @property
    def query_tasks(self) -> tuple[str, ...]:
        """The task queries the index answers: ``queries`` if given, else ``tasks``."""
        return self.queries or self.tasks

    @property
    def primary(self) -> int:
        return 0 if self.primary_task is None else self.tasks.index(self.primary_task)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> ServingConfig:
        return cls(
            **{
                **d,
                "tasks": tuple(d["tasks"]),
                "features": tuple(d["features"]),
                "queries": tuple(d.get("queries", ())),
            }
        )
