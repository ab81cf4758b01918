"""What the explorer page asks of one model and its SAEs, as plain JSON-ready values
(docs/design.md §6). ``sae.serve.app`` puts it on the web; everything here is callable
and testable without a server.

    ex = Explorer.open(["checkpoints/demo"])
    ex.prompt_features("If the key is missing")   # tokens and their strongest features
    ex.card(0, 93)                                 # a feature's report card (statistics cached)
    for step in ex.generation({"prompt": "...", "edits": [...], "seed": 0}): ...

Requests are dicts as the page sends them and are checked here, each bad value refused with
one ``ConfigError`` line that names it (the page shows the line). An edit is
``{"sae": i, "kind": "ablate" | "clamp" | "scale" | "steer", "feature": f, "value": x}``.
"""

from __future__ import annotations

import math
import shlex
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from sae.activations.capture import special_token_ids
from sae.activations.hooks import ActivationCapture, resolve_hooks
from sae.analysis.feature_search import contrast_search, features_in_text, prompts_from_text
from sae.analysis.feature_stats import FeatureStats, StatsSettings, check_feature
from sae.analysis.logit_effects import norm_linearisation
from sae.analysis.report import StringTable, block_cards, round_sig, token_pieces
from sae.analysis.target import (
    Target,
    cached_feature_stats,
    cached_feature_stats_steps,
    open_target,
)
from sae.data.prompt_format import PLAIN, check_fits
from sae.errors import ConfigError
from sae.interventions.edits import Ablate, Clamp, Edit, FeatureEdit, Scale, Steer
from sae.interventions.live_generation import live_continuations
from sae.models.generation import Sampling

MAX_PROMPT_CHARS = 20_000
MAX_NEW_TOKENS = 256
MAX_SEARCH_PROMPTS = 500
EDIT_KINDS = {"ablate": Ablate, "clamp": Clamp, "scale": Scale, "steer": Steer}
# |value| above this is a typo, not an experiment (activations are O(1..100)).
MAX_EDIT_VALUE = 1e4


@dataclass
class Explorer:
    """One model and the SAEs it is explored with (each a ``Target`` sharing the model)."""

    targets: list[Target]
    paths: list[str]
    settings: StatsSettings = field(default_factory=StatsSettings)
    cache_dir: Path | None = None
    _stats: dict[int, FeatureStats] = field(default_factory=dict)
    _stats_lock: threading.Lock = field(default_factory=threading.Lock)
    _scans: dict[int, StatsScan] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        paths: Sequence[str | Path],
        overrides: Sequence[str] = (),
        settings: StatsSettings = StatsSettings(),
        cache_dir: Path | None = None,
        log=print,
    ) -> Explorer:
        """Load the first SAE's model once and every SAE onto it; SAEs of another model
        (by their config's model name) are refused."""
        if not paths:
            raise ConfigError("serve: give at least one SAE folder")
        first = open_target(paths[0], overrides, log=log)
        targets = [first]
        for p in paths[1:]:
            t = open_target(p, overrides, model=first.model, tokenizer=first.tokenizer, log=log)
            if t.cfg.model.name_or_path != first.cfg.model.name_or_path:
                raise ConfigError(
                    f"serve: {str(p)!r} is an SAE of {t.cfg.model.name_or_path}, not of "
                    f"{first.cfg.model.name_or_path}; serve one model's SAEs together"
                )
            targets.append(t)
        return cls(targets, [str(p) for p in paths], settings, cache_dir)

    @property
    def model(self):
        return self.targets[0].model

    @property
    def tokenizer(self):
        return self.targets[0].tokenizer

    def info(self) -> dict:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return {
            "model": self.targets[0].cfg.model.name_or_path,
            "context": limit,
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "max_new_tokens": MAX_NEW_TOKENS,
            "saes": [
                {
                    "index": i,
                    "path": p,
                    "hook": t.hook,
                    "architecture": t.sae.cfg.architecture,
                    "features": t.sae.cfg.num_latents,
                }
                for i, (t, p) in enumerate(zip(self.targets, self.paths))
            ],
        }

    # ---- checks ----------------------------------------------------------------------------

    def prompt_ids(self, prompt, extra: int = 0) -> list[int]:
        """The prompt's token ids (BOS first), refused if empty or too long."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("prompt: empty; type some text")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ConfigError(
                f"prompt: {len(prompt):,} characters; the explorer takes at most {MAX_PROMPT_CHARS:,}"
            )
        ids = PLAIN.prompt_ids(self.tokenizer, prompt)
        check_fits(ids, self.model, prompt, extra, "new tokens")
        return ids

    def sae_index(self, value) -> int:
        n = len(self.targets)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise ConfigError(f"sae: {value!r} is not an SAE of this explorer; use 0..{n - 1}")
        return value

    def feature(self, sae: int, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"feature: {value!r} is not a feature number")
        return check_feature(value, self.targets[sae].sae.cfg.num_latents)

    # ---- prompt -> features ----------------------------------------------------------------

    @torch.no_grad()
    def prompt_features(self, prompt, top: int = 5) -> dict:
        """{"tokens": [token text], "special": [bool], "saes": [{"top": [[[feature,
        activation], ...] per token], "max": largest activation}]} with each token's ``top``
        strongest active features per SAE (none at special tokens: the SAEs never saw them)."""
        ids = self.prompt_ids(prompt)
        points = resolve_hooks(self.model, list(dict.fromkeys(t.hook for t in self.targets)))
        device = self.targets[0].device
        acts = ActivationCapture(self.model, points).run(
            input_ids=torch.tensor([ids], device=device)
        )
        special = torch.isin(torch.tensor(ids), special_token_ids(self.tokenizer))
        saes = []
        for t in self.targets:
            z = t.encode(acts[t.hook][0]).float().cpu()  # [T, M]
            z[special] = 0
            vals, feats = z.topk(min(top, z.shape[1]), dim=1)
            vals = round_sig(vals, 3)
            rows = [
                [[f, v] for f, v in zip(fr, vr) if v > 0]
                for fr, vr in zip(feats.tolist(), vals.tolist())
            ]
            saes.append({"top": rows, "max": float(z.max()) if z.numel() else 0.0})
        return {
            "tokens": token_pieces(self.tokenizer, ids),
            "special": special.tolist(),
            "saes": saes,
        }

    # ---- feature cards ---------------------------------------------------------------------

    def stats(self, sae: int) -> FeatureStats:
        """The SAE's feature statistics: read from the cache, or scanned (and cached) the
        first time a card of it is asked for. Blocks for the whole scan; the server runs a
        ``scan`` on its model worker instead."""
        with self._stats_lock:
            if sae not in self._stats:
                self._stats[sae] = cached_feature_stats(
                    self.targets[sae], self.settings, self.cache_dir
                )
            return self._stats[sae]

    def has_stats(self, sae: int) -> bool:
        return sae in self._stats

    def scan(self, sae: int) -> StatsScan:
        """The statistics scan of SAE ``sae``: the one under way, or a new one that nothing
        runs yet (``started`` False). A failed scan is reported once, as a ConfigError
        with its line, and dropped, so asking again retries it."""
        scan = self._scans.get(sae)
        if scan is not None and scan.error is not None:
            del self._scans[sae]
            raise ConfigError(f"feature statistics of SAE {sae}: {scan.error}")
        if scan is None:
            scan = self._scans[sae] = StatsScan(self, sae)
        return scan

    def card(self, sae, feature, examples: int = 10) -> dict:
        """A feature's card in the report's layout (``sae.analysis.report``), with its own
        string table: {"sae", "feature", "card", "strings", "bytes", "edges", "stats"}."""
        sae = self.sae_index(sae)
        f = self.feature(sae, feature)
        stats = self.stats(sae)
        strings = StringTable(self.tokenizer)
        card = block_cards(stats, [f], min(examples, stats.settings.top_examples), strings)
        return {
            "sae": sae,
            "feature": f,
            "card": card[str(f)],
            "strings": strings.strings,
            "bytes": strings.bytes,
            "edges": round_sig(stats.hist_edges(), 4).tolist(),
            "stats": {
                "density": float(stats.density[f]),
                "max": float(stats.act_max[f]),
                "mean": float(stats.mean_act[f]),
                "tokens": stats.tokens,
            },
        }

    # ---- search ----------------------------------------------------------------------------

    def top_count(self, request: dict) -> int:
        top = request.get("top", 20)
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= 200:
            raise ConfigError(f"top: {top!r} must be a whole number in 1..200")
        return top

    def search_text(self, request: dict) -> dict:
        """Features by text: {"ranking": [[feature, largest activation]]} over the tokens
        covering ``focus`` in ``prompt`` (all of it without one)."""
        sae, top = self.sae_index(request.get("sae", 0)), self.top_count(request)
        prompt, focus = request.get("prompt"), request.get("focus") or None
        self.prompt_ids(prompt)
        if focus is not None and not isinstance(focus, str):
            raise ConfigError(f"focus: {focus!r} is not text")
        found = features_in_text(self.targets[sae], prompt, focus, top)
        return {"ranking": [[f, round(v, 4)] for f, v in found.ranking], "focus": found.focus}

    def search_contrast(self, request: dict) -> dict:
        """Features by contrast between two prompt lists ``a`` and ``b``: {"ranking": [[feature,
        effect size, AUROC, mean in a, mean in b]]}, largest effect first."""
        sae, top = self.sae_index(request.get("sae", 0)), self.top_count(request)
        lists = [prompt_list(request.get(k), k) for k in ("a", "b")]
        for text in lists[0] + lists[1]:
            self.prompt_ids(text)
        result = contrast_search(self.targets[sae], *lists, progress=False)
        rows = [result.row(f) for f in result.ranking("effect")[:top]]
        keys = ("effect", "auroc", "mean_target", "mean_baseline")
        return {"ranking": [[r["feature"], *(round(r[k], 4) for k in keys)] for r in rows]}

    def upload(self, request: dict) -> dict:
        """A prompt file uploaded for a contrast list, read as ``analyze.py contrast`` reads
        one (``prompts_from_text``): {"name", "text"} -> {"prompts": [prompt]}."""
        name, text = request.get("name"), request.get("text")
        if not isinstance(name, str) or not isinstance(text, str):
            raise ConfigError('upload: give {"name": file name, "text": its contents}')
        if name.endswith((".yaml", ".yml")):
            raise ConfigError(
                f"upload: {name!r} is a dataset prompt set; the page takes .txt (one prompt "
                "per line) or .jsonl; pass prompt sets to analyze.py contrast"
            )
        prompts = prompts_from_text(text, name, "upload")
        return {"prompts": prompt_list(prompts, f"upload {name!r}")}

    @torch.no_grad()
    def search_token(self, request: dict) -> dict:
        """Features by output token: {"token_id", "ranking": [[feature, logit effect]]}, the
        features whose decoder direction most promotes ``token`` (one token of text)."""
        sae, top = self.sae_index(request.get("sae", 0)), self.top_count(request)
        text = request.get("token")
        ids = self.tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) else []
        if len(ids) != 1:
            pieces = token_pieces(self.tokenizer, ids)
            raise ConfigError(f"token: {text!r} is {len(ids)} tokens {pieces}; give exactly one")
        W_U = self.model.get_output_embeddings().weight  # [V, d]
        fold, _ = norm_linearisation(self.model)
        W_dec = self.targets[sae].sae.W_dec.detach()
        effect = fold(W_dec.to(W_U.device, torch.float32)) @ W_U[ids[0]].float()  # [M]
        vals, feats = effect.topk(min(top, effect.shape[0]))
        return {
            "token_id": ids[0],
            "ranking": [[f, round(v, 4)] for f, v in zip(feats.tolist(), vals.tolist())],
        }

    # ---- edit -> generate ------------------------------------------------------------------

    def edits(self, items) -> list[Edit]:
        """The page's edit list as one ``Edit`` per SAE that has any (module docstring)."""
        if not isinstance(items, list):
            raise ConfigError("edits: must be a list of {sae, kind, feature, value}")
        per_sae: dict[int, list[FeatureEdit]] = {}
        for item in items:
            if not isinstance(item, dict):
                raise ConfigError(f"edits: {item!r} is not an edit; e.g. {{'kind': 'ablate', ...}}")
            sae = self.sae_index(item.get("sae", 0))
            per_sae.setdefault(sae, []).append(self.one_edit(sae, item))
        return [Edit(self.targets[s].sae, self.targets[s].hook, e) for s, e in per_sae.items()]

    def one_edit(self, sae: int, item: dict) -> FeatureEdit:
        kind = item.get("kind")
        if kind not in EDIT_KINDS:
            raise ConfigError(f"edit kind: {kind!r} is not one of {', '.join(EDIT_KINDS)}")
        f = self.feature(sae, item.get("feature"))
        if kind == "ablate":
            return Ablate([f])
        value = number(item.get("value"), f"{kind} value of feature {f}", MAX_EDIT_VALUE)
        return Steer(f, value) if kind == "steer" else EDIT_KINDS[kind]([f], value)

    def sampling(self, request: dict) -> Sampling:
        new = request.get("max_new_tokens", 40)
        if isinstance(new, bool) or not isinstance(new, int) or not 1 <= new <= MAX_NEW_TOKENS:
            raise ConfigError(
                f"max_new_tokens: {new!r} must be a whole number in 1..{MAX_NEW_TOKENS}"
            )
        seed = request.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ConfigError(f"seed: {seed!r} must be a whole number >= 0")
        temperature = number(request.get("temperature", 1.0), "temperature", 100)
        top_p = number(request.get("top_p", 1.0), "top_p", 1)
        return Sampling(new, temperature, top_p, seed)

    def generation(self, request: dict) -> Iterator[dict]:
        """Steps {"baseline": text or null, "edited": text or null, "kl": nats or null} of
        the two continuations (``live_continuations``); everything is checked before the
        first step."""
        if not isinstance(request, dict):
            raise ConfigError("generate: the request must be a JSON object")
        sampling = self.sampling(request)
        edits = self.edits(request.get("edits", []))
        prompt = request.get("prompt")
        self.prompt_ids(prompt, sampling.max_new_tokens)
        return self._steps(prompt, edits, sampling)

    def _steps(self, prompt: str, edits: list[Edit], sampling: Sampling) -> Iterator[dict]:
        piece = lambda t: None if t is None else token_pieces(self.tokenizer, [t])[0]
        for step in live_continuations(self.model, self.tokenizer, prompt, edits, sampling):
            kl = None if step.kl is None else round(step.kl, 5)
            yield {"baseline": piece(step.baseline), "edited": piece(step.edited), "kl": kl}

    # ---- carry it on -----------------------------------------------------------------------

    def export(self, request: dict) -> dict:
        """The edit set as command lines (`generate`, `fix-test`: one SAE per command) and
        as the YAML that ``--edits FILE`` reads, per SAE: {"commands": [...], "yaml": [...]}."""
        sampling = self.sampling(request)
        edits = self.edits(request.get("edits", []))
        prompt = request.get("prompt") or ""
        if not edits:
            raise ConfigError("export: no edits to export; add an ablation, clamp, scale or steer")
        out: dict[str, list] = {"commands": [], "yaml": []}
        for e in edits:
            sae = self.paths[self.targets.index(next(t for t in self.targets if t.sae is e.sae))]
            options = edit_options(e.edits)
            sample = [
                f"--seed {sampling.seed}",
                f"--temperature {sampling.temperature:g}",
                f"--max-new-tokens {sampling.max_new_tokens}",
            ]
            if sampling.top_p < 1:
                sample.append(f"--top-p {sampling.top_p:g}")
            head = f"python analyze.py generate {shlex.quote(sae)} --prompt {shlex.quote(prompt)}"
            out["commands"].append(" ".join([head, *options, *sample]))
            fix = f"python analyze.py fix-test {shlex.quote(sae)} --prompt {shlex.quote(prompt)} --scorer SCORER"
            out["commands"].append(" ".join([fix, *options, *sample]))
            out["yaml"].append(yaml.safe_dump(edits_yaml(e.edits), sort_keys=False))
        return out


@dataclass
class StatsScan:
    """One SAE's first statistics scan, run step by step (one model batch a step) so that
    the server's model worker can interleave other requests and the page can show how far
    it got. ``tokens``/``total``: non-special tokens scanned and asked for; ``error``: the
    one line it failed with, if it did."""

    explorer: Explorer
    sae: int
    tokens: int = 0
    started: bool = False
    error: str | None = None

    @property
    def total(self) -> int:
        return self.explorer.settings.tokens

    def steps(self) -> Iterator[int]:
        """Scan (or read the cache); yields the tokens scanned after each batch and leaves
        the statistics with the explorer."""
        target = self.explorer.targets[self.sae]
        found = cached_feature_stats_steps(target, self.explorer.settings, self.explorer.cache_dir)
        try:
            while True:
                try:
                    self.tokens = next(found)
                except StopIteration as done:
                    self.explorer._stats[self.sae] = done.value
                    return
                yield self.tokens
        except Exception as e:
            self.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise

    def progress(self) -> dict:
        return {"sae": self.sae, "scanned": self.tokens, "total": self.total}


def prompt_list(value, name: str) -> list[str]:
    """A list of prompts (a list of strings, or text with one prompt per line)."""
    if isinstance(value, str):
        value = [line for line in value.splitlines() if line.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name}: give a list of prompts (one per line)")
    if len(value) > MAX_SEARCH_PROMPTS:
        raise ConfigError(f"{name}: {len(value)} prompts; at most {MAX_SEARCH_PROMPTS}")
    return value


def number(value, what: str, limit: float) -> float:
    """A finite JSON number with |value| <= limit, else a one-line error naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what}: {value!r} is not a number")
    if abs(value) > limit:
        raise ConfigError(f"{what}: {value:g} is out of range; use -{limit:g}..{limit:g}")
    return float(value)


def edits_yaml(edits: Sequence[FeatureEdit]) -> dict:
    """Edits as the ``--edits`` YAML: {"ablate": [f, ...], "clamp": {f: c}, "scale": {f: s},
    "steer": {f: a}} (empty kinds left out)."""
    out: dict = {"ablate": [], "clamp": {}, "scale": {}, "steer": {}}
    for e in edits:
        if isinstance(e, Ablate):
            out["ablate"] += list(e.features)
        elif isinstance(e, Steer):
            out["steer"][e.feature] = e.alpha
        else:
            key, value = ("clamp", e.value) if isinstance(e, Clamp) else ("scale", e.factor)
            out[key].update({f: value for f in e.features})
    return {k: v for k, v in out.items() if v}


def edit_options(edits: Sequence[FeatureEdit]) -> list[str]:
    """The edits as `generate` / `fix-test` options (``parse_feature_edits`` reads them back)."""
    spec = edits_yaml(edits)
    out = [f"--ablate {','.join(map(str, spec['ablate']))}"] if "ablate" in spec else []
    for kind in ("clamp", "scale", "steer"):
        out += [f"--{kind} {f}:{v:+g}" if kind == "steer" else f"--{kind} {f}:{v:g}"
                for f, v in spec.get(kind, {}).items()]  # fmt: skip
    return out
