"""What every SAE architecture shares: parameters, decoding, and the on-disk format.

Parameters (M latents, d inputs): W_enc [M, d], b_enc [M], W_dec [M, d], b_dec [d].
On disk a folder holds ``cfg.json`` and ``sae_weights.safetensors`` with the tensor
names and layouts SAELens uses (W_enc [d, M], W_dec [M, d], b_enc [M], b_dec [d]).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sae.atomic_io import replace_files_atomic, save_tensors
from sae.config import SAEConfig, sae_config
from sae.errors import CheckpointError, ConfigError, StorageError

CONFIG_FILE = "cfg.json"


@dataclass(frozen=True)
class BatchTotals:
    """The whole batch's size and total variance sum_n |x_n - mean(x)|^2, when each process
    holds a share of it: losses then divide by these, so shares' losses and gradients sum
    to the whole batch's. reduce_min: the minimum of a 0-d tensor over the processes."""

    n: int
    var: torch.Tensor
    reduce_min: Callable[[torch.Tensor], torch.Tensor]


WEIGHTS_FILE = "sae_weights.safetensors"


def stored_settings(cfg: SAEConfig, d_in: int) -> dict:
    """The start of an SAE's cfg.json in our format: architecture, d_in and its settings
    with num_latents fixed for that width (so no expansion_factor)."""
    values = asdict(cfg.for_width(d_in))
    del values["architecture"], values["expansion_factor"]
    return {"architecture": cfg.architecture, "d_in": d_in, **values}


def total_variance(x: torch.Tensor) -> torch.Tensor:
    """sum_n |x_n - mean(x)|^2 over a batch x [N, d] (0-d): the denominator of FVU
    (docs/design.md §3). Split batches use ``BatchTotals`` instead."""
    return (x - x.mean(0)).pow(2).sum()


class SparseAutoencoder(nn.Module):
    """Base class; a subclass sets ``Config`` (its subclass of ``sae.config.SAEConfig``:
    every setting it reads, with help and bounds) and implements ``activation`` and
    ``training_loss``.

    The class attributes below are the architecture's training recipe, read by the
    trainer, and how SAELens names it.
    """

    Config: ClassVar[type[SAEConfig]]
    apply_b_dec_to_input: ClassVar[bool] = (
        True  # encode (x - b_dec); b_dec starts at the geometric median
    )
    unit_norm_decoder: ClassVar[bool] = True  # decoder rows kept on the unit sphere during training
    scale_inputs: ClassVar[bool] = (
        False  # train on x * s with E|x * s| = sqrt(d); s folded in on save
    )
    grad_clip: ClassVar[float | None] = None  # max global gradient norm
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    init_decoder_norm: ClassVar[float] = 1.0
    init_encoder_scale: ClassVar[float] = 1.0  # W_enc = this x W_dec at init
    # A short run of S steps uses default_lr x (8192 / S) ** power, at most x cap
    # (sae.training.trainer.short_run_lr_scale)
    short_run_lr_cap: ClassVar[float] = 8.0
    short_run_lr_power: ClassVar[float] = 0.5
    uses_workspace: ClassVar[bool] = False  # training_loss can reuse an N x M buffer
    shards_latents: ClassVar[bool] = False  # trains with distributed.mode: latents (sharded_topk)
    saelens_writes: ClassVar[str | None] = (
        None  # the SAELens architecture it is written as (None: not)
    )
    saelens_reads: ClassVar[tuple[str, ...]] = ()  # SAELens architectures read as this one

    def __init__(
        self,
        cfg: SAEConfig,
        d_in: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        """An SAE for inputs of width d_in, initialised (``reset_parameters``); a null
        cfg.num_latents becomes cfg.expansion_factor * d_in."""
        super().__init__()
        self.cfg, self.d_in = cfg.for_width(d_in), d_in
        M, d = self.cfg.num_latents, d_in
        kw = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(torch.empty(M, d, **kw))
        self.b_enc = nn.Parameter(torch.zeros(M, **kw))
        self.W_dec = nn.Parameter(torch.empty(M, d, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d, **kw))
        self.reset_parameters()

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @classmethod
    def default_lr(cls, num_latents: int) -> float:
        """Gao et al.'s scaling rule: 2e-4 at 2^14 latents, falling as 1/sqrt(M)."""
        return 2e-4 / math.sqrt(num_latents / 2**14)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows random directions of norm ``init_decoder_norm``, encoder = decoder
        times ``init_encoder_scale`` (transpose init), biases zero. A module on the meta
        device (built to be loaded, see ``from_stored``) is left alone."""
        if self.W_dec.is_meta:
            return
        with torch.no_grad():
            W = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
            self.W_dec.copy_(nn.functional.normalize(W, dim=1) * self.init_decoder_norm)
            self.W_enc.copy_(self.W_dec * self.init_encoder_scale)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [N, M] for x [N, d]."""
        return ((x - self.b_dec) if self.apply_b_dec_to_input else x) @ self.W_enc.t() + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense latents [N, M] from pre-activations [N, M] (inference rule)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents [N, M] for x [N, d]."""
        return self.activation(self.pre_activations(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction [N, d] from dense latents z [N, M]."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def after_step(self) -> None:
        """Projections after each optimizer step (e.g. JumpReLU keeps thresholds >= 0)."""

    def resamples_dead(self) -> bool:
        """Whether the trainer gives this SAE's dead latents new directions every dead
        window (``sae.training.resample``): for losses that pass a silent latent no gradient."""
        return False

    def training_loss(
        self,
        x: torch.Tensor,
        dead: torch.Tensor | None = None,
        workspace: torch.Tensor | None = None,
        progress: float = 1.0,
        totals: BatchTotals | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, batch FVU, fires) for x [N, d]. fires: int64 [M], tokens each latent was
        active on. dead: bool [M] or None; workspace: reusable memory for the N x M
        pre-activations (architectures that can use it); progress: share of training done
        in [0, 1] (for warmups of sparsity penalties); totals: the whole batch's, when x is
        one process's share (loss and FVU are then that share's part)."""
        raise NotImplementedError

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        """Make an SAE trained on x * s take x: same latents, reconstruction divided by s."""
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)

    # ---- on disk -------------------------------------------------------------------

    def disk_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as stored: SAELens names and layouts (W_enc transposed to [d, M])."""
        return {
            "W_enc": self.W_enc.detach().t(),
            "W_dec": self.W_dec.detach(),
            "b_enc": self.b_enc.detach(),
            "b_dec": self.b_dec.detach(),
        }

    @torch.no_grad()
    def load_disk_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of ``disk_tensors``; shapes were checked by the caller."""
        self.W_enc.copy_(tensors["W_enc"].t())
        for name in ("W_dec", "b_enc", "b_dec"):
            getattr(self, name).copy_(tensors[name])

    def native_cfg(self, metadata: dict | None = None) -> dict:
        """The cfg.json of this SAE in our format: architecture, d_in, its config fields
        (num_latents fixed, so no expansion_factor), and the keys SAELens also reads
        (d_sae, apply_b_dec_to_input, dtype, metadata)."""
        return {
            **stored_settings(self.cfg, self.d_in),
            "d_sae": self.cfg.num_latents,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "dtype": str(self.W_dec.dtype).removeprefix("torch."),
            "metadata": metadata or {},
        }

    @classmethod
    def disk_shapes(cls, cfg: SAEConfig, d_in: int) -> dict[str, tuple[int, ...]]:
        """{tensor name: shape} of ``disk_tensors`` for an SAE of these settings and width
        (built on the meta device: nothing is allocated)."""
        return {
            name: tuple(t.shape) for name, t in cls(cfg, d_in, device="meta").disk_tensors().items()
        }

    @classmethod
    def saelens_fields(cls, native: dict) -> dict:
        """The architecture's own keys of the SAELens cfg.json written for ``native`` (our
        cfg.json), besides d_in, d_sae and the encoding flags."""
        return {}

    @classmethod
    def fields_from_saelens(cls, cfg: dict, where: str) -> dict:
        """Our config fields read from a SAELens cfg.json of an architecture in
        ``saelens_reads`` (besides num_latents); CheckpointError naming ``where`` if missing."""
        return {}

    def save(self, folder: str | Path, metadata: dict | None = None) -> None:
        """Write cfg.json + sae_weights.safetensors into ``folder`` (other files there are kept)."""
        write_sae_folder(
            Path(folder),
            {CONFIG_FILE: self.native_cfg(metadata)},
            {WEIGHTS_FILE: self.disk_tensors()},
        )

    @classmethod
    def from_stored(
        cls,
        cfg: dict,
        tensors: dict[str, torch.Tensor],
        where: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SparseAutoencoder:
        """The SAE that a cfg.json in our format and its tensors (``disk_tensors`` names and
        layouts) describe, as ``dtype`` on ``device``. ``where`` names the files in errors.

        ``apply_b_dec_to_input`` is read from cfg: SAEs trained elsewhere may differ from
        this architecture's recipe (a SAELens ReLU SAE usually subtracts b_dec).
        """
        fields = {
            f: cfg[f]
            for f in cls.Config.__dataclass_fields__
            if f in cfg and f not in ("architecture", "expansion_factor")
        }
        try:  # built on the meta device: no random init of weights that are overwritten next
            settings = sae_config(cls.Config.architecture, **fields)
            sae = cls(settings, cfg.get("d_in"), device="meta", dtype=dtype)
        except (ConfigError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{where}: not a valid {cls.Config.architecture} SAE config ({e})"
            ) from None
        for name, t in sae.disk_tensors().items():
            got = tuple(tensors[name].shape) if name in tensors else None
            if got != tuple(t.shape):
                raise CheckpointError(
                    f"{where}: {name} has shape {got}, cfg.json says {tuple(t.shape)}"
                )
            if not tensors[name].is_floating_point():
                raise CheckpointError(
                    f"{where}: {name} holds {str(tensors[name].dtype).removeprefix('torch.')}; "
                    "SAE weights must be float32, bfloat16, float16 or float64"
                )
        sae = sae.to_empty(device=device)
        sae.load_disk_tensors(tensors)
        for name, t in sae.disk_tensors().items():  # checked where it is fast: in dtype, on device
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{where}: {name} holds NaN or inf; the file is damaged")
        apply = bool(cfg.get("apply_b_dec_to_input", cls.apply_b_dec_to_input))
        if apply != cls.apply_b_dec_to_input:
            sae.apply_b_dec_to_input = apply
        return sae


# Every file name an SAE folder of a format we read may hold (ours, SAELens, sparsify):
# writing an SAE replaces these and nothing else, so a report or statistics cache beside
# it survives, and no file of another format is left to confuse format detection.
SAE_FILES = (
    "cfg.json",
    "sae_weights.safetensors",
    "sae.safetensors",
    "sae_cfg.json",
    "activation_scaler.json",
)


def write_sae_folder(
    folder: Path, json_files: dict[str, dict], tensor_files: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Write these JSON and safetensors files into ``folder``, each replaced atomically
    (tensors first, JSON last), and drop SAE files of other formats; the rest of the
    folder is left alone."""
    writers: dict[str, Callable[[Path], None]] = {}
    for name, tensors in tensor_files.items():
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        writers[name] = lambda tmp, cpu=cpu: save_tensors(cpu, tmp)
    for name, doc in json_files.items():
        writers[name] = lambda tmp, doc=doc: tmp.write_text(json.dumps(doc, indent=1) + "\n")
    try:
        replace_files_atomic(folder, writers, remove=SAE_FILES)
    except OSError as e:
        raise StorageError(f"cannot write the SAE folder {str(folder)!r}: {e.strerror}") from None


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; one line naming the file if it is missing or broken."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable SAE config ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: not a readable SAE config (a JSON object was expected)")
    return doc


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; one line naming the file if it cannot be read."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot read SAE weights ({e})") from None
