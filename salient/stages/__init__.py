"""The stages of a build, in the order a rebuild runs them: the one registry that the command
line, the pre-flight, ``salient run`` and the Prefect flow all take their stage list from.

Adding a stage is one module under ``salient/stages/`` and one line here (see docs/stages.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from salient.config import Config
from salient.errors import ConfigError
from salient.stage import Stage
from salient.stages.activations import Activations
from salient.stages.aggregate import Aggregate
from salient.stages.discover import Discover
from salient.stages.evaluate import Evaluate
from salient.stages.generalize import Generalize
from salient.stages.ingest import Ingest
from salient.stages.report import Report
from salient.stages.simulate import Simulate

STAGES: tuple[Stage, ...] = (
    Activations(),
    Aggregate(),
    Discover(),
    Simulate(),
    Ingest(),
    Generalize(),
    Evaluate(),
    Report(),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def _check_registry() -> None:
    """Every stage is complete and named once; a broken registry fails when it is imported."""
    if len(BY_NAME) != len(STAGES):
        raise TypeError(f"two stages share a name: {[s.name for s in STAGES]}")
    for stage in STAGES:
        missing = [a for a in ("name", "help", "code_version") if not isinstance(getattr(stage, a, None), str)]
        if missing:
            raise TypeError(f"stage {type(stage).__name__} does not set {', '.join(missing)}")
        kind = type(stage)
        if kind.worker is Stage.worker and kind.make is Stage.make and kind.compute is Stage.compute and kind.plan is not Stage.plan:
            raise TypeError(f"stage {stage.name} plans items but has no worker, make() or compute()")


_check_registry()


def select(config: Config, names: Sequence[str] | None = None) -> list[Stage]:
    """The stages ``names`` in registry order, or every stage that applies to ``config``;
    ``ConfigError`` for a name that is no stage."""
    if names is None:
        return [s for s in STAGES if s.applies(config)]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ConfigError([f"stages = {unknown}: unknown; use some of {', '.join(NAMES)}"])
    return [s for s in STAGES if s.name in set(names)]
