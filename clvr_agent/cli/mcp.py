"""``clvr mcp``: serve the loop over the Model Context Protocol (the server is :mod:`clvr_agent.app.mcp_server`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clvr_agent.cli.common import ModelChoice, fail, with_model_options


@with_model_options
def mcp_command(
    max_iterations: int = typer.Option(8, help="Loop budget when a call gives none."),
    seed: int = typer.Option(0, help="Seed when a call gives none."),
    artifact_dir: Optional[Path] = typer.Option(None, help="Where canvases are written (default: a temp dir)."),
    http: bool = typer.Option(False, "--http", help="Serve streamable HTTP instead of stdio."),
    host: str = typer.Option("127.0.0.1", help="--http: address to listen on."),
    port: int = typer.Option(8000, help="--http: port to listen on."),
    *,
    models: ModelChoice,
) -> None:
    """Serve CLVR over the Model Context Protocol: stdio by default, streamable HTTP with --http."""
    try:
        import mcp  # noqa: F401
    except ImportError:
        fail('clvr mcp needs the mcp package: pip install -e ".[agents]"')
    if not 0 < port < 65536:
        fail(f"--port must be 1-65535, got {port}")
    from clvr_agent.app.api import build_context, create_clvr
    from clvr_agent.app.mcp_server import build_server, log
    from clvr_agent.errors import MissingDependencyError, UnknownBackendError

    settings = dict(max_iterations=max_iterations, seed=seed, artifact_dir=str(artifact_dir) if artifact_dir else None,
                    **models.request)
    try:
        ctx = build_context(models.backend, controller=models.controller, executor_options=models.executor_options,
                            controller_options=models.controller_options, **settings)  # loads the models, once
        runnable = create_clvr(context=ctx)
    except (UnknownBackendError, MissingDependencyError, FileNotFoundError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    server = build_server(runnable, host=host, port=port)
    if http:
        log(f"serving {models.backend} on http://{host}:{port}{server.settings.streamable_http_path}")
        server.run(transport="streamable-http")
    else:
        log(f"serving {models.backend} on stdio")
        server.run(transport="stdio")


def register(app: typer.Typer) -> None:
    """Mount ``clvr mcp`` on the CLI."""
    app.command("mcp")(mcp_command)
