"""Command-line front ends: ``sae-train`` (``train.py``) and ``sae-analyze`` (``analyze.py``).

Thin wrappers: each reads a RunConfig (YAML file + ``--set KEY=VALUE`` overrides) and
calls the library. Bad input ends the command with one line, ``error: ...``, and exit
status 2.
"""

from sae.cli import features, interventions, serve_command  # noqa: F401  (importing them adds their commands to the group)
from sae.cli.analyze_group import analyze
from sae.cli.train_command import train

__all__ = ["analyze", "train"]
