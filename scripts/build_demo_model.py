"""Rebuild the demo model and tokenizer shipped in ``sae/models/demo_model/``.

    python scripts/build_demo_model.py            # ~25 min on 2 CPU cores

1. Trains a byte-level BPE tokenizer on the train split of ``builtin:python-docs``.
2. Trains a small ``LlamaForCausalLM`` on the packed train split, keeping the weights with
   the lowest held-out loss.
3. Saves model (bf16 safetensors) and tokenizer with ``save_pretrained``, reloads them
   with ``from_pretrained`` exactly as a user would, measures the held-out loss and the
   unigram entropy of the held-out tokens, and writes both to ``card.json``.

Everything is seeded; the wall-clock budget (``--minutes``) decides how many steps run.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import click
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from sae.data import corpus
from sae.data.text import pack
from sae.evaluation.lm_metrics import next_token_loss, unigram_entropy
from sae.models.demo_model import CARD_FILE, DEMO_MODEL_DIR, EVAL_CONTEXT_LEN, heldout_contexts

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama 3: the tokenizer puts BOS in front of every encoded text.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=EVAL_CONTEXT_LEN * 2,
    )


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@click.command()
@click.option("--vocab-size", default=4096, show_default=True)
@click.option("--hidden", default=256, show_default=True)
@click.option("--layers", default=4, show_default=True)
@click.option("--batch", default=16, show_default=True, help="Contexts per step.")
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--steps", default=600, show_default=True, help="Schedule length in steps.")
@click.option(
    "--minutes", default=40.0, show_default=True, help="Stop early after this wall-clock time."
)
@click.option("--eval-every", default=100, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=DEMO_MODEL_DIR, show_default=True)
def main(vocab_size, hidden, layers, batch, lr, steps, minutes, eval_every, seed, out):
    t_start = time.time()
    torch.manual_seed(seed)
    train_texts = list(corpus.load("train")["text"])
    tokenizer = train_tokenizer(train_texts, vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens ({time.time() - t_start:.0f}s)")

    docs = tokenizer(train_texts, add_special_tokens=False, verbose=False)["input_ids"]
    train = pack(docs, EVAL_CONTEXT_LEN, tokenizer.bos_token_id, tokenizer.eos_token_id)
    heldout = heldout_contexts(tokenizer)
    print(
        f"train: {train.numel():,} tokens in {len(train)} contexts; held-out: {heldout.numel():,} tokens"
    )

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=EVAL_CONTEXT_LEN * 2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    cursor, best, best_state, step = 0, float("inf"), None, 0
    for step in range(steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(train), generator=gen), 0
        x = train[order[cursor : cursor + batch]]
        cursor += batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=100)
        model.train()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out_of_time = time.time() - t_start > minutes * 60
        if (step + 1) % eval_every == 0 or step == steps - 1 or out_of_time:
            model.eval()
            val, _ = next_token_loss(model, heldout)
            if val < best:
                best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
            print(
                f"step {step + 1}: train {loss.item():.3f}  held-out {val:.3f}  ({time.time() - t_start:.0f}s)",
                flush=True,
            )
        if out_of_time:
            print(f"stopping: {minutes} minute budget reached")
            break
    model.load_state_dict(best_state)

    # Save to a temporary folder, then swap in: an interrupted build never leaves half a model.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".build-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is package data
    model.to(torch.bfloat16).save_pretrained(tmp)  # bf16 keeps the package under 10 MB
    tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    reloaded_heldout = heldout_contexts(AutoTokenizer.from_pretrained(tmp))
    assert torch.equal(reloaded_heldout, heldout), "tokenizer changed on save/load"
    loss, n_tokens = next_token_loss(reloaded, heldout)
    card = {
        "heldout_loss_nats": round(loss, 5),
        "heldout_unigram_entropy_nats": round(unigram_entropy(heldout[:, 1:]), 5),
        "heldout_tokens": n_tokens,
        "eval_context_len": EVAL_CONTEXT_LEN,
        "train_tokens_per_epoch": train.numel(),
        "steps": step + 1,
        "tokens_seen": (step + 1) * batch * EVAL_CONTEXT_LEN,
        "build_minutes": round((time.time() - t_start) / 60, 1),
        "python": corpus.python_version(),
        "torch": torch.__version__,
        "corpus_test_fingerprint": corpus.fingerprint("test"),
        "command": "python scripts/build_demo_model.py",
    }
    (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
