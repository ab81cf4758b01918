"""From a RunConfig to shuffled activation batches: data -> harvester (-> disk cache) -> buffer.

    model, tokenizer = load_model(cfg.model)
    for batch in activation_batches(cfg, model, tokenizer):
        batch["layers.2"]     # [cfg.train.batch_tokens, d]

With ``harvest.cache_dir`` set, the first run writes the cache while it harvests; a run
after an interruption serves the shards already written and harvests only the rest; once
the cache is complete, later runs read it and never run the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae import corpus
from sae.activation_cache import CacheReader, CacheWriter, tokenizer_fingerprint
from sae.buffer import ShuffleBuffer
from sae.config import RunConfig
from sae.data import context_batches, load_text_dataset
from sae.harvest import Harvester, check_context_length
from sae.hooks import resolve_hooks


def cache_identity(cfg: RunConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Everything that decides which activations a harvest produces."""
    d, h = cfg.data, cfg.harvest
    return {
        "model": cfg.model.name_or_path,
        "hooks": list(cfg.hooks),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "width": model.config.hidden_size,
        "dataset": {"dataset": d.dataset, "subset": d.subset, "split": d.split, "text_column": d.text_column,
                    "context_tokens": d.context_tokens, "token_budget": d.token_budget, "streaming": d.streaming,
                    # the built-in corpus differs between Python versions
                    "builtin_sha256": corpus.fingerprint(d.split) if d.dataset == corpus.NAME else None},
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "masking": {"exclude_special_tokens": h.exclude_special_tokens, "max_norm_ratio": h.max_norm_ratio,
                    # the norm filter's median is per batch of contexts
                    "batch_contexts": h.batch_contexts if h.max_norm_ratio is not None else None},
    }


def contexts_for(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, skip_contexts: int = 0) -> Iterator[torch.Tensor]:
    """The run's packed token contexts, [harvest.batch_contexts, data.context_tokens] per batch."""
    d = cfg.data
    dataset = load_text_dataset(d.dataset, d.split, d.text_column, d.subset, d.streaming)
    return context_batches(dataset, tokenizer, text_column=d.text_column, context_tokens=d.context_tokens,
                           token_budget=d.token_budget, batch_contexts=cfg.harvest.batch_contexts,
                           skip_contexts=skip_contexts)


def make_harvester(cfg: RunConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   skip_contexts: int = 0) -> Harvester:
    h = cfg.harvest
    contexts = contexts_for(cfg, tokenizer, skip_contexts)
    harvester = Harvester(model, tokenizer, contexts, cfg.hooks, exclude_special_tokens=h.exclude_special_tokens,
                          max_norm_ratio=h.max_norm_ratio, prefetch=h.prefetch, expect_data=skip_contexts == 0)
    return harvester


def _complete_then_read(cfg: RunConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        writer: CacheWriter, identity: dict) -> Iterator[dict[str, torch.Tensor]]:
    """First epoch: the shards an interrupted run left, then the rest of the harvest (written
    to the cache as it goes); later epochs read the completed cache."""
    h, skipped = cfg.harvest, writer.contexts_done
    yield from CacheReader(h.cache_dir, cfg.hooks, seed=cfg.train.seed, identity=identity, require_complete=False)
    harvester = make_harvester(cfg, model, tokenizer, skip_contexts=skipped)
    for acts in harvester:
        writer.add(acts, skipped + harvester.contexts_done)
        yield acts
    writer.finish()
    if h.cache_epochs > 1:
        yield from CacheReader(h.cache_dir, cfg.hooks, epochs=h.cache_epochs - 1, seed=cfg.train.seed + 1,
                               identity=identity)


def activation_source(cfg: RunConfig, model: PreTrainedModel,
                      tokenizer: PreTrainedTokenizerBase) -> Iterable[dict[str, torch.Tensor]]:
    """Unshuffled {hook: [n, d]} batches: from the cache if complete, else from the model."""
    h = cfg.harvest
    resolve_hooks(model, cfg.hooks)  # bad hook names fail here, before a cache folder is touched
    check_context_length(model, cfg.data.context_tokens)
    if h.cache_dir is None:
        return make_harvester(cfg, model, tokenizer)
    identity = cache_identity(cfg, model, tokenizer)
    writer = CacheWriter(h.cache_dir, identity, h.cache_shard_tokens)
    if writer.complete:
        return CacheReader(h.cache_dir, cfg.hooks, epochs=h.cache_epochs, seed=cfg.train.seed, identity=identity)
    return _complete_then_read(cfg, model, tokenizer, writer, identity)


def activation_batches(cfg: RunConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> ShuffleBuffer:
    """Shuffled {hook: [train.batch_tokens, d]} batches for training."""
    device = next(model.parameters()).device if cfg.harvest.buffer_device == "model" else torch.device("cpu")
    # No point holding more rows than the whole run will ever see.
    run_tokens = cfg.data.token_budget * cfg.harvest.cache_epochs
    capacity = max(cfg.train.batch_tokens, min(cfg.harvest.buffer_tokens, run_tokens))
    return ShuffleBuffer(activation_source(cfg, model, tokenizer), capacity, cfg.train.batch_tokens,
                         device=device, seed=cfg.train.seed)
