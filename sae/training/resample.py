"""Resampling dead latents (Anthropic, "Towards Monosemanticity", 2023; docs/design.md §2).

A latent whose pre-activations are negative on every input gets no gradient from the
reconstruction or an L1 penalty, so for ReLU-style SAEs nothing in the loss brings it
back. Every dead window, the trainer gives each dead latent a new direction: the residual
of an input the SAE reconstructs badly, the worst rows going to the dead latents in order.
The encoder row points the same way at 0.2 x the mean norm of the live encoder rows, the
decoder row at the live rows' mean norm, b_enc makes the latent read x - b_dec (0 where
the encoder subtracts b_dec already), and the latent's Adam moments restart.

Two choices differ from the paper, which samples inputs with probability proportional to
their squared loss and takes the input itself as the direction:
- the worst rows are taken in order, with no random draw, so a resumed run stays
  bit-identical without carrying a generator's state;
- the residual (x - x_hat) is the direction, not x: on residual streams whose variance sits
  in a few large directions every input points nearly the same way, and the new latents
  would all copy it.
All of it runs on the device with masks: no host sync, whatever the number of dead latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae.architectures.base import SparseAutoencoder

ENCODER_SCALE = 0.2  # the paper's multiple of the live encoder rows' mean norm


def resample_window(dead_tokens: int, batch_tokens: int) -> int:
    """Steps between resamplings: one dead window, so that a resampled latent has the whole
    window to fire before it can count as dead again."""
    return max(1, dead_tokens // batch_tokens)


@torch.no_grad()
def resample_dead(
    sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor
) -> None:
    """Give every dead latent a new direction from the batch, in place.

    x: [N, d], the batch as the SAE trains on it (scaled); dead: [M] bool. The j-th dead
    latent (in index order) takes the residual of the j-th worst-reconstructed row (cycling
    when there are more dead latents than rows). Live latents, b_dec and their optimizer
    state are untouched."""
    residual = x - sae.decode(sae.encode(x))  # [N, d]
    order = residual.pow(2).sum(1).argsort(descending=True)  # [N]
    rank = (dead.long().cumsum(0) - 1).clamp(min=0) % x.shape[0]  # [M]
    direction = F.normalize(residual[order[rank]].to(sae.W_dec.dtype), dim=1)  # [M, d]
    live = (~dead).to(sae.W_dec.dtype)
    n_live = live.sum().clamp(min=1)
    enc_norm = (sae.W_enc.norm(dim=1) * live).sum() / n_live
    dec_norm = (sae.W_dec.norm(dim=1) * live).sum() / n_live
    rows = dead[:, None]
    sae.W_enc.copy_(torch.where(rows, direction * (ENCODER_SCALE * enc_norm), sae.W_enc))
    sae.W_dec.copy_(torch.where(rows, direction * dec_norm, sae.W_dec))
    # the new latent reads x - b_dec, as in the paper, where every encoder does
    b_enc = 0.0 if sae.apply_b_dec_to_input else -(sae.W_enc @ sae.b_dec)  # [M]
    sae.b_enc.copy_(torch.where(dead, b_enc, sae.b_enc))
    for p in (sae.W_enc, sae.W_dec, sae.b_enc):
        for moment in optimizer.state.get(p, {}).values():
            if moment.shape == p.shape:  # exp_avg, exp_avg_sq; not the step count
                moment.masked_fill_(rows if p.dim() == 2 else dead, 0.0)
