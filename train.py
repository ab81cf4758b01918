"""Train SAEs: `python train.py [CONFIG] [--set KEY=VALUE ...]`. Same as the `sae-train` command."""

from sae.cli import train

if __name__ == "__main__":
    train()
