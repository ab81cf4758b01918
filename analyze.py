"""Analyze models and SAEs: `python analyze.py COMMAND ...`. Same as the `sae-analyze` command."""

from sae.cli import analyze

if __name__ == "__main__":
    analyze()
