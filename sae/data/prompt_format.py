"""How prompt text becomes token ids: plain (BOS + text, as the training contexts were
built) or a chat model's own conversation format.

An instruct model is used through its chat template, so it should be tested that way:

    fmt = PromptFormat(chat=True, system="You are a helpful assistant.")
    fmt.prompt_ids(tokenizer, "Tell me a joke")   # system + user turn + the assistant's header
    fmt.reply_ids(tokenizer, "You are an idiot.")  # (ids, start): the text as the assistant's reply

``prompt_ids`` is what the model continues (generation, attribution, fix tests): with
``chat``, the text is the user's turn and generation starts where the assistant's reply
does. ``reply_ids`` is for reading features (search): with ``chat``, the text is what the
assistant says, after an optional user turn, and only the reply's tokens ``ids[start:]``
count, since those are the tokens an edit acts on while the model speaks.

Prompt text is tokenized without special tokens, but a tokenizer still turns the *text*
"<|im_end|>" into the special token, which would let a prompt file forge turns. Such
prompts are refused in one line; the template adds the model's special tokens itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.data.text import context_bos_id
from sae.errors import ConfigError


@dataclass(frozen=True)
class PromptFormat:
    """chat: wrap prompts in the tokenizer's chat template; system: its system prompt
    (None = the template's default); user: the user's turn before each reply that
    ``reply_ids`` reads (None = no user turn)."""

    chat: bool = False
    system: str | None = None
    user: str | None = None

    def __post_init__(self):
        if not self.chat and (self.system is not None or self.user is not None):
            raise ConfigError("--system / --user: apply to chat prompts only; add --chat")

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
        """Token ids of a prompt the model continues (module docstring)."""
        check_no_special_tokens(tokenizer, text)
        if not self.chat:
            return [context_bos_id(tokenizer), *_text_ids(tokenizer, text)]
        return self._template_ids(tokenizer, [{"role": "user", "content": text}])

    def reply_ids(self, tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], int]:
        """(token ids, first position to read features on) for text the model itself says."""
        check_no_special_tokens(tokenizer, text)
        if not self.chat:
            return [context_bos_id(tokenizer), *_text_ids(tokenizer, text)], 1
        if self.user is not None:
            check_no_special_tokens(tokenizer, self.user)
        turns = [] if self.user is None else [{"role": "user", "content": self.user}]
        head = self._template_ids(tokenizer, turns)
        return head + _text_ids(tokenizer, text), len(head)

    def _template_ids(self, tokenizer: PreTrainedTokenizerBase, turns: list[dict]) -> list[int]:
        """The chat template over (system +) ``turns``, ending with the assistant's header."""
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "--chat: this model's tokenizer has no chat template; leave out --chat for a base model"
            )
        if self.system is not None:
            check_no_special_tokens(tokenizer, self.system)
            turns = [{"role": "system", "content": self.system}, *turns]
        if turns:
            text = _render(tokenizer, turns, add_generation_prompt=True)
        else:
            # A reply with neither system prompt nor user turn: transformers refuses to render
            # an empty conversation, so render the reply as the assistant's only message and
            # keep what comes before it (the template's default system prompt, if it has one,
            # and the assistant's header).
            text = _render(
                tokenizer,
                [{"role": "assistant", "content": _REPLY_MARK}],
                add_generation_prompt=False,
            )
            if _REPLY_MARK not in text:
                raise ConfigError(
                    "--chat: this model's chat template does not show the assistant's reply as "
                    "given; add --user TEXT, a user turn before each reply"
                )
            text = text[: text.index(_REPLY_MARK)]
        # The template writes BOS and the turn markers itself; adding them again would double them.
        return _text_ids(tokenizer, text)

    def describe(self) -> str:
        if not self.chat:
            return "plain prompts (BOS + text)"
        parts = ["chat template"] + ([f"system {self.system!r}"] if self.system is not None else [])
        return ", ".join(parts + ([f"user turn {self.user!r}"] if self.user is not None else []))


PLAIN = PromptFormat()
_REPLY_MARK = "SAE-REPLY-STARTS-HERE"


def _render(
    tokenizer: PreTrainedTokenizerBase, turns: list[dict], add_generation_prompt: bool
) -> str:
    """The chat template's text for ``turns``; a template that refuses them stops in one line."""
    try:
        return tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError (raise_exception), ValueError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        roles = "/".join(t["role"] for t in turns)
        raise ConfigError(
            f"--chat: this model's chat template refuses a conversation of {roles} turns: {first}"
            + ("" if any(t["role"] == "user" for t in turns) else "; add --user TEXT")
        ) from None


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_no_special_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    """Refuse text that spells one of the model's special tokens (module docstring)."""
    for token in _special_strings(tokenizer):
        if token in text:
            short = text if len(text) <= 60 else text[:57] + "..."
            raise ConfigError(
                f"prompt {short!r} contains the model's special token {token!r}; prompts are plain "
                "text (for chat turns use --chat, which adds the template's tokens itself)"
            )


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The strings a tokenizer would read as special tokens, longest first."""
    found = set(tokenizer.all_special_tokens)
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    return sorted((t for t in found if t), key=len, reverse=True)


def check_fits(
    ids: list[int], model: PreTrainedModel, text: str, extra: int = 0, extra_what: str = ""
) -> None:
    """Refuse a prompt longer than the model's context (with ``extra`` tokens still to come)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and len(ids) + extra > limit:
        short = text if len(text) <= 40 else text[:37] + "..."
        more = f" + {extra} {extra_what}" if extra else ""
        raise ConfigError(
            f"prompt {short!r} is {len(ids)} tokens{more}; this model reads at most {limit} "
            "(max_position_embeddings); shorten it"
        )
