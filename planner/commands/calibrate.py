"""`planner calibrate`: fit a hardware profile's efficiencies to measured bundle runs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from profiles.errors import InputError

from ..output import get_output
from ._common import common_options

__all__ = ["calibrate_cmd"]


@click.command("calibrate")
@click.option("--profile", "-p", "profile_path", required=True,
              help="The hardware profile the bundles were planned for (a name or a YAML file).")
@click.option("--runs", "-r", "runs", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Run records to fit (planner verify BUNDLE --checkpoint CKPT --out RUN.json); repeatable.")
@click.option("--holdout", multiple=True, type=click.Path(dir_okay=False),
              help="Run records kept out of the fit, to report the error on; repeatable.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Write the calibrated profile here.")
@click.option("--max-evaluations", type=click.IntRange(min=10), default=200, show_default=True,
              help="Simulations the fit may run.")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@common_options
def calibrate_cmd(profile_path, runs, holdout, out, max_evaluations, force) -> None:
    """Fit the profile's efficiency parameters to measured runs; report the error before and after.

    For every compute device the runs used: memory-bandwidth fraction, compute efficiency
    curve (max fraction and half-saturation tokens), overhead per kernel call and framework
    overhead per layer and step; plus one factor on link bandwidths. Least squares on
    log(predicted/measured) TPOT and TTFT, within bounds.

    \b
    Examples:
      planner verify bundle/ -c ckpt/ --prompt "the cat" --out run1.json
      planner calibrate -p my-machine.yaml -r run1.json -r run2.json --holdout run3.json -o my-machine.cal.yaml
    """
    from profiles.hardware import bundled_profiles
    from profiles.yamlio import load_yaml
    from simulator.calibrate import calibrate_profile, load_run, save_profile

    if Path(out).exists() and not force:
        raise InputError("output file exists", file=out, fix="pass --force to overwrite it, or choose another path")
    path = bundled_profiles().get(profile_path, Path(profile_path))
    doc, _ = load_yaml(path)
    if not isinstance(doc, dict):
        raise InputError("not a hardware profile", file=path, fix="pass a profile YAML")
    fit = [load_run(r) for r in runs]
    held = [load_run(r) for r in holdout]
    output = get_output()
    with output.log.status("fitting..."):
        result = calibrate_profile(doc, fit, held, max_evaluations=max_evaluations)
    save_profile(result.profile, out, f"calibrated by planner calibrate from {len(fit)} run(s) on {path}")
    data = {"summary": result.summary(), "parameters": result.parameters, "evaluations": result.evaluations,
            "fit_before": result.fit_before, "fit_after": result.fit_after, "holdout_before": result.holdout_before,
            "holdout_after": result.holdout_after, "written": str(out)}

    def render(console):
        from rich.table import Table

        table = Table(title="Prediction error (predicted / measured - 1)")
        for col in ("run", "set", "TPOT before", "TPOT after", "TTFT before", "TTFT after"):
            table.add_column(col, justify="left" if col in ("run", "set") else "right")
        for label, before, after in (("fit", result.fit_before, result.fit_after),
                                     ("held out", result.holdout_before, result.holdout_after)):
            for b, a in zip(before, after):
                table.add_row(b["run"], label, f"{b['tpot_s']['error']:+.1%}", f"{a['tpot_s']['error']:+.1%}",
                              f"{b['ttft_s']['error']:+.1%}", f"{a['ttft_s']['error']:+.1%}")
        console.print(table)
        console.print(json.dumps(result.parameters, indent=1), highlight=False)
        console.print(f"wrote {out} ({result.evaluations} simulations)", highlight=False)

    output.emit(data, render)
