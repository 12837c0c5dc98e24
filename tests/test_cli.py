"""CLI conventions: --help everywhere, exit codes, --json puts only JSON on stdout."""

import json

import click
import pytest

from planner.cli import cli


def all_commands(group: click.Group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path", [()] + list(all_commands(cli)), ids=lambda p: " ".join(p) or "planner")
def test_every_command_has_help(run_cli, path):
    result = run_cli(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_usage_error_is_exit_2(run_cli):
    assert run_cli("no-such-command").exit_code == 2
    assert run_cli("profiles", "show").exit_code == 2  # missing argument


def test_a_bad_option_value_is_exit_1(run_cli):
    """A value click refuses is bad input (exit 1, one line); only unparseable usage is 2."""
    result = run_cli("optimize", "--max-watts", "-5")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("text, seconds", [("2", 2.0), ("2s", 2.0), ("100ms", 0.1), ("1.5", 1.5)])
def test_optimize_slos_take_seconds_or_a_time_with_its_unit(text, seconds):
    """`optimize --slo-ttft/--slo-tpot` read 2 and 2s alike, as `planner sweep`'s SLOs read 2s."""
    from planner.commands._common import Seconds

    assert Seconds().convert(text, None, None) == pytest.approx(seconds)
    for bad in ("0", "-1", "nan", "abc", "5 fortnights"):
        with pytest.raises(click.BadParameter):
            Seconds().convert(bad, None, None)


def test_json_mode_prints_only_json_on_stdout(run_cli):
    for args in (("--json", "profiles", "list"), ("profiles", "list", "--json"),
                 ("--json", "profiles", "show", "desktop-4090")):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
        json.loads(result.stdout)  # nothing but JSON


def test_profiles_show_json_has_devices_links_and_routes(run_cli):
    data = json.loads(run_cli("--json", "profiles", "show", "desktop-4090").stdout)
    assert {d["kind"] for d in data["devices_detail"]} == {"cpu", "gpu", "nvme"}
    route = next(r for r in data["routes"] if r["src"].endswith("nvme0"))
    assert route["bottleneck_bytes_per_s"] == 3e9 and route["hops"] == 2


def test_profiles_validate_ok_and_yaml_template_round_trips(run_cli, tmp_path):
    template = run_cli("profiles", "show", "desktop-4090", "--yaml").stdout
    mine = tmp_path / "mine.yaml"
    mine.write_text(template)
    result = run_cli("profiles", "validate", mine)
    assert result.exit_code == 0 and result.stdout.startswith("ok: ")


def test_schema_is_json(run_cli):
    schema = json.loads(run_cli("profiles", "schema").stdout)
    assert "nodes" in schema["properties"]


def test_debug_shows_the_traceback(run_cli):
    result = run_cli("--debug", "profiles", "show", "no-such-profile")
    assert result.exit_code != 0 and result.exception is not None
    quiet = run_cli("profiles", "show", "no-such-profile")
    assert quiet.exit_code == 1 and quiet.stderr.startswith("error: unknown hardware profile")
