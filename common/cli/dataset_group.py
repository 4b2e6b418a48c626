"""The ``spool dataset ...`` command group; its commands live in the modules that register on it."""

from __future__ import annotations

import typer

from common.cli import app

dataset_app = typer.Typer(help="Datasets: lifecycle, names, manifests.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
