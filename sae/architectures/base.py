"""What every SAE architecture shares: parameters, decoding, and the on-disk format.

Parameters (M latents, d inputs): W_enc [M, d], b_enc [M], W_dec [M, d], b_dec [d].
On disk a folder holds ``cfg.json`` and ``sae_weights.safetensors`` with the tensor
names and layouts SAELens uses (W_enc [d, M], W_dec [M, d], b_enc [M], b_dec [d]).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sae.errors import ConfigError

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


class SparseAutoencoder(nn.Module):
    """Base class; subclasses set ``architecture`` and ``Config`` and implement ``encode``
    and ``training_loss``."""

    architecture: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, cfg, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        M, d = cfg.num_latents, cfg.d_in
        kw = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(torch.empty(M, d, **kw))
        self.b_enc = nn.Parameter(torch.zeros(M, **kw))
        self.W_dec = nn.Parameter(torch.empty(M, d, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d, **kw))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows random unit vectors, encoder = decoder (transpose init), biases zero."""
        with torch.no_grad():
            W = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
            self.W_dec.copy_(nn.functional.normalize(W, dim=1))
            self.W_enc.copy_(self.W_dec)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents [N, M] for x [N, d]."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction [N, d] from dense latents z [N, M]."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ---- on disk -------------------------------------------------------------------

    def save(self, folder: str | Path, metadata: dict | None = None) -> None:
        """Write cfg.json + sae_weights.safetensors into ``folder``, replacing it whole."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        tensors = {"W_enc": self.W_enc.detach().t().contiguous(), "W_dec": self.W_dec.detach().contiguous(),
                   "b_enc": self.b_enc.detach().contiguous(), "b_dec": self.b_dec.detach().contiguous()}
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        cfg = {"architecture": self.architecture, **asdict(self.cfg), "d_sae": self.cfg.num_latents,
               "dtype": str(self.W_dec.dtype).removeprefix("torch."), "metadata": metadata or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
        tmp.chmod(0o755)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load_folder(cls, folder: Path, cfg: dict, device, dtype) -> SparseAutoencoder:
        fields = {f: cfg[f] for f in cls.Config.__dataclass_fields__ if f in cfg}
        sae = cls(cls.Config(**fields), device=device, dtype=dtype)
        try:
            tensors = load_file(str(folder / WEIGHTS_FILE))
        except (OSError, SafetensorError) as e:
            raise ConfigError(f"{folder / WEIGHTS_FILE}: cannot read SAE weights ({e})") from None
        expected = {"W_enc": (sae.cfg.d_in, sae.cfg.num_latents), "W_dec": (sae.cfg.num_latents, sae.cfg.d_in),
                    "b_enc": (sae.cfg.num_latents,), "b_dec": (sae.cfg.d_in,)}
        for name, shape in expected.items():
            got = tuple(tensors[name].shape) if name in tensors else None
            if got != shape:
                raise ConfigError(f"{folder / WEIGHTS_FILE}: {name} has shape {got}, cfg.json says {shape}")
        with torch.no_grad():
            sae.W_enc.copy_(tensors["W_enc"].t())
            for name in ("W_dec", "b_enc", "b_dec"):
                getattr(sae, name).copy_(tensors[name])
        return sae
