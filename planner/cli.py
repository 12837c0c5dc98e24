"""The ``planner`` command: one click group, noun-verb subcommands.

Exit codes: 0 ok, 1 bad input (a bad value of an option or argument included), 2 usage error
(no such command or option, a missing argument), 3 infeasible plan. User errors print one line
to stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from profiles.errors import UserError

from . import __version__
from .commands import COMMANDS
from .commands.formats import formats as formats_cmd
from .output import Output, get_output

__all__ = ["cli", "main"]


class PlannerGroup(click.Group):
    """Turns :class:`UserError` and click's usage errors into one line on stderr and their exit code."""

    def invoke(self, ctx: click.Context):  # noqa: D102
        try:
            return super().invoke(ctx)
        except UserError as exc:
            out = ctx.obj if isinstance(ctx.obj, Output) else Output()
            if out.debug:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:  # one line too: exit 1 for a bad value, 2 for bad usage
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            message = " ".join(exc.format_message().split())
            click.echo(f"error: {message} (see `{where} --help`)", err=True)
            ctx.exit(_exit_code(exc))


def _exit_code(exc: click.UsageError) -> int:
    """A value the user gave that click refuses (out of range, not a choice, not a number) is
    bad input, exit 1, as every other bad value; a command line click cannot parse (no such
    command or option, a missing argument) is a usage error, exit 2."""
    bad_value = isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter)
    return 1 if bad_value else exc.exit_code


@click.group(cls=PlannerGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--json", "json_mode", is_flag=True, help="Print only JSON on stdout (tables and logs go to stderr).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="moe-planner")
@click.pass_context
def cli(ctx: click.Context, json_mode: bool, debug: bool) -> None:
    """moe-planner: plan, simulate and export Mixture-of-Experts deployments.

    Describe the hardware (a profile), name a model (a preset or an HF config.json) and a
    workload; the planner decides where every expert lives, at which bitwidth, and how
    big each layer's expert cache is.

    \b
    Examples:
      planner optimize --compare --out plan.json     # plan the bundled default
      planner simulate --plan plan.json              # replay its workload in the simulator
      planner sweep examples/whatif_sweep/desktop-4090-upgrade.yaml --jobs 2
      planner export plan.json --checkpoint ckpt/ --out bundle/ && planner verify bundle/ -c ckpt/
      planner profile probe --out my-machine.yaml    # measure this machine
      planner profiles list
      planner --json models list
    """
    out = get_output()
    out.json_mode = out.json_mode or json_mode
    out.debug = out.debug or debug


for _command in COMMANDS:
    cli.add_command(_command)
cli.add_command(COMMANDS[[c.name for c in COMMANDS].index("profiles")], name="profile")  # `planner profile probe`
cli.add_command(formats_cmd)


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(prog_name="planner")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
