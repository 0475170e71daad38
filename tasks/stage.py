"""The one Prefect task of a build: run a stage of the registry in the flow's run."""

from __future__ import annotations

import dataclasses

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from salient.errors import UserError
from salient.stage import Run, Stage, execute


def _worth_retrying(task_: Task, task_run: TaskRun, state: State) -> bool:
    """A stage is retried after a failure of the machinery, not after a user's mistake."""
    return not isinstance(state.result(raise_on_failure=False), UserError)


def _summary_markdown(summary: dict) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in summary.items() if not isinstance(v, (list, dict)))


@task(name="stage", cache_policy=NO_CACHE, retry_delay_seconds=5, retry_condition_fn=_worth_retrying)
def _run_stage(stage: Stage, run: Run) -> dict:
    summary = execute(stage, dataclasses.replace(run, log=get_run_logger()))
    create_markdown_artifact(key=f"{stage.name}-summary", markdown=_summary_markdown(summary), description=f"{stage.name} summary")
    return summary


def run_stage(stage: Stage, run: Run) -> dict:
    """Run ``stage`` as a Prefect task named after it, with its retries; returns its summary."""
    return _run_stage.with_options(name=stage.name, retries=stage.retries)(stage, run)
