"""`pigeon bench` sub-commands (filled in by the benchmark module)."""

from __future__ import annotations

import typer

bench_app = typer.Typer(
    no_args_is_help=True, help="Benchmarks against a running or spawned server."
)
