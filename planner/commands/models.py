"""`planner models`: placeholder until the models module lands (being written now)."""
import click


@click.group()
def models() -> None:
    """Bundled model presets and HF config.json files."""
