"""`planner plan`: the Plan's JSON Schema, and checking a plan against hardware and a model."""

from __future__ import annotations

import json

import click

from ..output import get_output
from ._common import common_options

__all__ = ["plan_group"]


@click.group("plan")
def plan_group() -> None:
    """The plan.json format: its schema, and whether a plan fits a machine."""


@plan_group.command("schema")
@common_options
def schema() -> None:
    """Print the JSON Schema of plan.json (every key, type and allowed value).

    \b
    Examples:
      planner plan schema > plan.schema.json
    """
    from ..plan import Plan

    text = json.dumps(Plan.model_json_schema(), indent=1, sort_keys=True)
    click.echo(text)


@plan_group.command("check")
@click.argument("plan_path", metavar="PLAN.json", type=click.Path(dir_okay=False))
@click.option("--hardware", "-H", help="Hardware profile (default: the plan's).")
@click.option("--model", "-m", help="Model (default: the plan's).")
@common_options
def check(plan_path: str, hardware: str | None, model: str | None) -> None:
    """Check a plan against hardware and a model, as simulate, export and verify do.

    Exit 0 when it fits (warnings say when it was made from other inputs), 1 with one line
    naming the layer, expert and figure when it does not.

    \b
    Examples:
      planner plan check plan.json
      planner plan check plan.json -H desktop-3060     # would it fit a 12 GB card?
    """
    from profiles.models import load_model

    from ..plan import load_plan
    from ..plan_check import check_plan
    from .simulate import plan_hardware

    plan = load_plan(plan_path)
    profile, hw = plan_hardware(plan, hardware)
    spec = load_model(model or plan.inputs.model)
    warnings = check_plan(plan, hw, spec, file=plan_path, profile=profile)

    def render(console):
        for w in warnings:
            console.print(f"warning: {w}", highlight=False)
        console.print(f"ok: {plan_path} fits {hw.name} for {spec.name}", highlight=False)

    get_output().emit({"ok": True, "plan": plan_path, "hardware": hw.name, "model": spec.name,
                       "warnings": warnings}, render)
