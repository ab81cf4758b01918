"""``analyze.py serve``: the explorer page over one model and its SAEs (sae/serve)."""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path

import click

from sae.cli.analyze_group import analyze
from sae.cli.common import log, one_line_errors
from sae.errors import ConfigError


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@analyze.command()
@click.argument("sae_paths", metavar="SAE [SAE ...]", nargs=-1, required=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but this machine needs a token (printed once).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change the model or data config, e.g. --set model.device=cuda:1.",
)
@click.option(
    "--tokens",
    type=click.IntRange(1),
    default=2**20,
    show_default=True,
    help="Tokens scanned for the feature cards' statistics (cached; shared with `features`).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where statistics are cached (default: SAE/features/).",
)
@one_line_errors
def serve(sae_paths, port, host, overrides, tokens, cache_dir) -> None:
    """A local web page to explore features and edits live: type a prompt and see each
    token's features, open a feature's card, set ablate / clamp / scale / steer values and
    generate the baseline and the edited text side by side, then export the edits as a
    `generate` / `fix-test` command.

    \b
        python analyze.py serve checkpoints/demo             # then open http://127.0.0.1:8765
        python analyze.py serve run/layers.8 run/layers.16   # several hook points at once
    """
    try:
        import uvicorn

        from sae.serve.app import make_app
    except ImportError as e:
        raise ConfigError(f'serve: {e.name} is not installed; pip install -e ".[serve]"') from None
    from sae.analysis.feature_stats import StatsSettings
    from sae.serve.explorer import Explorer

    local = is_loopback(host)
    token = None if local else secrets.token_urlsafe(24)
    explorer = Explorer.open(
        list(sae_paths), overrides, StatsSettings(tokens=tokens), cache_dir, log=log
    )
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    if not local:
        log(f"warning: listening on {host}, beyond this machine; every request needs the token")
    log(f"explorer: {url}  (Ctrl-C stops it)")
    uvicorn.run(
        make_app(explorer, token, loopback=local), host=host, port=port, log_level="warning"
    )
