"""`planner profiles`: placeholder, being written now."""
import click


@click.group()
def profiles() -> None:
    """Hardware profiles."""
