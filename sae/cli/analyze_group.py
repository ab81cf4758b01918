"""``sae-analyze`` / ``python analyze.py``: the group, and the commands about models and
saved SAEs (layers, evaluate, convert)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sae.cli.common import (
    OneLineGroup,
    config_options,
    json_option,
    log,
    one_line_errors,
    resolve_config,
)


@click.group(cls=OneLineGroup, context_settings={"max_content_width": 120})
def analyze() -> None:
    """Inspect models and trained SAEs: hook points, held-out metrics, what each feature
    means (features, report), which features lie behind a behaviour (search, attribute,
    patch), and editing them while the model writes (generate, fix-test).

    SAE arguments take an SAE folder in our, SAELens's or sparsify's format, a run folder
    holding one SAE, or a hub repo id with a subfolder (EleutherAI/sae-llama-3-8b-32x/layers.10).
    The model, hook point and data come from the run's config.yaml or the SAE's files, and
    --set changes them (e.g. --set data.split=test). convert rewrites SAEs in another format."""


@analyze.command()
@config_options("model.name_or_path=meta-llama/Llama-3.1-8B")
@json_option
@one_line_errors
def layers(config: Path | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """List a model's decoder layers: the valid layers.N hook points."""
    cfg = resolve_config(config, overrides)
    from sae.models.loading import layer_overview, load_model

    model, _ = load_model(cfg.model)
    overview = layer_overview(model)
    if as_json:
        click.echo(json.dumps({"model": cfg.model.name_or_path, **overview}))
        return
    last = len(overview["hook_points"]) - 1
    click.echo(overview["summary"])
    click.echo(
        f"decoder layers: {overview['layers_module']}[0..{last}] -> hook points layers.0 .. layers.{last}"
    )
    click.echo(f"sub-modules of each layer: {', '.join(overview['sub_modules'])}")


@analyze.command()
@click.argument("run_dir", metavar="RUN_DIR")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change the run's config for this evaluation, e.g. --set data.eval_tokens=200000.",
)
@json_option
@one_line_errors
def evaluate(run_dir: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Held-out metrics of a trained run's SAEs: FVU, L0, dead and dense fractions, and CE
    loss recovered, delta LM loss and KL with each SAE spliced into the model. Printed as a
    table and written to metrics.json beside each SAE. RUN_DIR may also be any SAE folder
    or a SAELens or sparsify run, local or on the hub."""
    from sae.evaluation.heldout import evaluate_saved_run

    results = evaluate_saved_run(run_dir, overrides, log=log if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(results))


@analyze.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["sae", "saelens", "sparsify"]),
    required=True,
    help="Format to write: sae (ours), saelens, or sparsify (TopK SAEs only; one folder per hook point).",
)
@click.option(
    "--hook",
    default=None,
    metavar="HOOK",
    help="Hook point to record, for SAEs whose files name none (e.g. layers.12).",
)
@click.option(
    "--overwrite", is_flag=True, help="Write into DST even if it exists and is not empty."
)
@json_option
@one_line_errors
def convert(
    src: str, dst: Path, fmt: str, hook: str | None, overwrite: bool, as_json: bool
) -> None:
    """Rewrite the SAE (or every SAE of the run) at SRC in another format under DST.

    SRC is an SAE folder or run in any format, or a hub repo id with a subfolder. One SAE
    is written to DST itself, a run's SAEs to sub-folders of the same names; sparsify
    names each SAE's folder after its hook point (DST/layers.10/). Our files converted to
    SAELens or sparsify and back are the same files, tensors bit for bit.

    \b
        python analyze.py convert checkpoints/demo checkpoints/demo-saelens --format saelens
        python analyze.py convert EleutherAI/sae-llama-3-8b-32x/layers.10 checkpoints/llama-l10 --format sae
    """
    from sae.formats import convert as convert_saes
    from sae.formats.hook_names import to_ours

    written = convert_saes(
        src,
        dst,
        fmt,
        hook=(to_ours(hook) or hook) if hook else None,
        overwrite=overwrite,
        log=log if as_json else click.echo,
    )
    if as_json:
        click.echo(
            json.dumps(
                {"format": fmt, "written": {name: str(folder) for name, folder in written.items()}}
            )
        )
