"""Data-recipe ablations: the plan (what each recipe changes and shares), the held-out bits per
byte, the winner, and one real ablation of two recipes: killed in the middle, resumed through a
Prefect flow, rerun with nothing left to do."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pretrain_pipeline.config import ConfigError, build_config
from pretrain_pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _base(**ablation):
    raw = yaml.safe_load((ROOT / "configs" / "ablate-smoke.yaml").read_text())
    raw["ablation"] = {**raw["ablation"], **ablation}
    return raw


def _plan(raw):
    from pretrain_pipeline.ablation import plan_ablation

    return plan_ablation(build_config(raw))


# --- the plan -------------------------------------------------------------------------------------


def test_recipes_change_only_their_fields_and_share_the_reference_tokenizer(tmp_path):
    raw = _base(recipes={"base": {}, "strict": {"data.gopher_quality.min_words": 50},
                         "big-vocab": {"tokenizer.vocab_size": 2048}}, seeds=2)
    raw["runtime"]["runs_root"] = str(tmp_path)
    plan = _plan(raw)
    runs = {r.name: r for r in plan.runs}
    assert list(runs) == ["base", "base.seed1", "strict", "strict.seed1", "big-vocab", "big-vocab.seed1"]
    assert runs["strict"].config.data.gopher_quality.min_words == 50
    assert runs["base"].config.data.gopher_quality.min_words == 5
    # Every proxy is the same model and budget: tiny preset, steps from the token budget.
    assert {(r.config.model.n_layer, r.config.model.n_embd, r.config.train.max_steps) for r in plan.runs} == {(2, 64, 293)}
    assert [r.config.train.seed for r in plan.runs[:2]] == [1337, 1338]
    # The reference trains the tokenizer; other data reuses it; a tokenizer recipe trains its own.
    assert runs["base"].config.tokenizer.from_run is None
    assert runs["strict"].config.tokenizer.from_run == "base"
    assert runs["big-vocab"].config.tokenizer.from_run is None
    # A seed shares its recipe's data; the tokenizer recipe shares the reference's cleaning only.
    assert plan.owner(runs["base.seed1"], "clean").name == "base"
    assert plan.owner(runs["strict.seed1"], "tokenize").name == "strict"
    assert plan.owner(runs["big-vocab"], "clean").name == "base"
    assert plan.owner(runs["big-vocab"], "tokenize") is None
    assert plan.owner(runs["strict"], "clean") is None
    assert plan.owner(runs["strict"], "raw").name == "base"  # one sample corpus for every recipe of its size
    waves = [([r.name for r in runs_], stages) for runs_, stages in plan.waves()]
    assert waves[0] == (["base"], ("clean", "tokenize"))
    assert waves[1] == (["strict", "big-vocab"], ("clean", "tokenize"))
    assert waves[2][1] == ("train", "evaluate") and len(waves[2][0]) == 6
    # Every proxy is scored on the same held-out file and lands in the ablation's W&B group.
    assert len({tuple(r.config.eval.heldout_inputs) for r in plan.runs}) == 1
    assert {r.config.tracking.group for r in plan.runs} == {"ablate-smoke"}
    assert all(r.config.run_dir().parent == tmp_path / "ablate-smoke" for r in plan.runs)


@pytest.mark.parametrize("recipes, message", [
    ({"a": {}, "b": {"model.n_layer": 4}}, "'model.n_layer' is not a recipe field"),
    ({"a": {}, "b": {"eval.max_tokens": 10}}, "'eval.max_tokens' is not a recipe field"),
    ({"a": {}, "b": {"data.gopher_quality.min_wrds": 3}}, "min_wrds"),
    ({"a": {}, "mix": {"train.data_mixture": {"a": 1, "web": 2}}}, "['web'], which are not recipes"),
    ({"a": {}, "b": {"data.exact_dedup": True}}, "a and b make the same run"),
    ({}, "ablation.recipes is empty"),
])
def test_a_bad_recipe_is_refused_before_anything_runs(recipes, message):
    with pytest.raises((UserError, ConfigError)) as err:
        _plan(_base(recipes=recipes))
    assert message in str(err.value)


def test_a_mixture_recipe_trains_on_other_recipes_and_shares_the_reference_data():
    plan = _plan(_base(recipes={"web": {}, "books": {"data.gopher_quality.min_words": 40},
                                "mix": {"train.data_mixture": {"web": 3, "books": 1}}}))
    mix = plan.runs[2]
    assert mix.config.train.data_mixture == {"web": 3.0, "books": 1.0}
    assert plan.owner(mix, "clean").name == "web" and plan.owner(mix, "tokenize").name == "web"
    # Its sources' shards are written in the data waves, before any training starts.
    assert [r.name for r in plan.waves()[1][0]] == ["books"]


# --- held-out bits per byte and the winner -----------------------------------------------------------


def test_heldout_bits_per_byte_scores_every_text_token_once_over_the_texts_bytes(tmp_path):
    import sentencepiece as spm
    import torch

    from pretrain.evaluate import score_texts
    from pretrain.model import GPT
    from pretrain_pipeline.config import ModelConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Return the value {i} of the list, or none when é is missing." for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   byte_fallback=True, bos_id=-1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), sp.get_piece_size()).eval()
    texts = ["Return the value.", "Missing é, or none of the list of values at all", "x"]
    got = score_texts(model, sp, texts, eos_id=2, micro_batch=2, device="cpu")

    # By hand: the stream EOS t1 EOS t2 ...; target i is predicted from the start of its window of 8.
    stream = [t for text in texts for t in (2, *sp.encode(text))]
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(1, len(stream)):
            if stream[i] == 2:
                continue
            start = (i - 1) // 8 * 8
            logits, _ = model(torch.tensor([stream[start:i]]))
            nats -= float(torch.log_softmax(logits[0, -1].double(), -1)[stream[i]])
            tokens += 1
    nbytes = sum(len(t.encode()) for t in texts)
    assert got["bytes"] == nbytes and got["tokens"] == tokens and got["documents"] == 3
    assert got["bits_per_byte"] == pytest.approx(nats / (nbytes * math.log(2)), rel=1e-5)


def test_the_winner_has_the_lowest_mean_and_is_separated_only_by_seed_ranges():
    from pretrain_pipeline.ablation_report import metric_directions, summarize, winner

    def row(recipe, bpb, acc):
        return {"recipe": recipe, "change": "", "done": True, "heldout_bpb": bpb, "arc acc": acc}

    rows = [row("a", 2.0, 0.3), row("a", 2.2, 0.4), row("b", 2.3, 0.2), row("b", 2.4, 0.1)]
    metrics = metric_directions(rows)
    assert list(metrics)[:2] == ["heldout_bpb", "arc acc"] and metrics["arc acc"][1] is True
    summary = summarize(rows, metrics)
    assert summary[0]["heldout_bpb"] == {"mean": pytest.approx(2.1), "min": 2.0, "max": 2.2}
    best = winner(summary)
    assert best["recipe"] == "a" and best["runner_up"] == "b" and best["separated"]
    assert best["margin"] == pytest.approx(0.25)
    rows[1]["heldout_bpb"] = 2.35  # now a's seeds reach into b's range
    assert not winner(summarize(rows, metrics))["separated"]


def test_a_row_holds_the_proxy_scores_and_the_cost_of_every_stage_that_made_it(tmp_path):
    from pretrain_pipeline.ablation_report import run_row

    raw = _base(recipes={"base": {}, "strict": {"data.gopher_quality.min_words": 50}}, seeds=2)
    raw["runtime"]["runs_root"] = str(tmp_path)
    plan = _plan(raw)
    base, seed1 = plan.runs[0].paths.root, plan.runs[1].paths.root

    def write(path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))

    write(base / "eval" / "eval.json", {"result": {"heldout": {"bits_per_byte": 2.5}, "bits_per_byte": 2.7,
                                                   "lm_eval": {"tiny_choice": {"acc": 0.5, "acc_stderr": 0.1}}}})
    write(base / "clean" / "stats.json", {"kept": 10})
    write(base / "shards" / "manifest.json", {"totals": {"train": {"tokens": 1000}}})
    write(base / "ablation_times.json", {"clean": 1.0, "tokenize": 2.0, "train": 3.0, "evaluate": 4.0})
    write(seed1 / "ablation_times.json", {"train": 5.0, "evaluate": 6.0})
    row = run_row(plan, plan.runs[0])
    assert row["done"] and row["heldout_bpb"] == 2.5 and row["val_bpb"] == 2.7
    assert row["tiny_choice acc"] == 0.5 and "tiny_choice acc_stderr" not in row
    assert (row["docs_kept"], row["train_tokens"], row["cost_s"]) == (10, 1000, 10.0)
    # The second seed's data stages are the first's: their time counts in its cost too.
    later = run_row(plan, plan.runs[1])
    assert not later["done"] and later["cost_s"] == 1.0 + 2.0 + 5.0 + 6.0
    assert later["change"] == "(base config)" and run_row(plan, plan.runs[2])["change"] == "data.gopher_quality.min_words=50"


# --- a real ablation: killed, resumed through Prefect, rerun ----------------------------------------


def _small_config(tmp_path: Path) -> Path:
    raw = _base(recipes={"baseline": {}, "strict": {"data.gopher_quality.min_words": 30}},
                heldout={"sample_corpus_docs": 100}, proxy={"preset": "tiny", "train_tokens": 40 * 8 * 128})
    raw["data"]["sample_corpus_max_docs"] = 600
    raw["tokenizer"].update(vocab_size=512, input_sentence_size=20000)
    raw["eval"].update(max_tokens=4000, max_new_tokens=8)
    raw["runtime"]["runs_root"] = str(tmp_path / "runs")
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PRETRAIN_PIPELINE_STATE": str(tmp_path / "state"),
           "PREFECT_HOME": str(tmp_path / "state" / "prefect"), "PRETRAIN_PIPELINE_QUIET": "1", "WANDB_MODE": "offline"}
    env.pop("PREFECT_API_URL", None)
    return env


def _ablate(tmp_path: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pretrain_pipeline.cli", "ablate", "-c", str(tmp_path / "ablation.yaml"),
                           "--json", *args], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ablate failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    console = proc.stdout[:proc.stdout.index("{\n")] + proc.stderr
    # A quiet console: the ablation's and the stages' own lines, no Prefect or Ray chatter.
    assert "ablation ablate-smoke: winner " in console, console
    for noise in ("Beginning subflow run", "Finished in state", "SIGTERM handler", "Traceback"):
        assert noise not in console, f"{noise!r} on the console:\n{console}"
    return json.loads(proc.stdout[proc.stdout.index("{\n"):])


def _records(root: Path) -> dict[str, float]:
    """Every stage record of the ablation (through the links too), by path: its modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime for p in sorted(root.glob("*/*/_SUCCESS.json"))}


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ablation")
    _small_config(tmp_path)
    root = tmp_path / "runs" / "ablate-smoke"
    # Killed while the second proxy trains, after the first finished its evaluation.
    proc = subprocess.Popen([sys.executable, "-m", "pretrain_pipeline.cli", "ablate", "-c", str(tmp_path / "ablation.yaml"),
                             "--no-prefect"], cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not ((root / "baseline" / "eval" / "_SUCCESS.json").exists() and (root / "strict" / "train").exists()):
        assert proc.poll() is None, "the ablation ended before it could be killed"
        assert time.monotonic() < deadline, "the second proxy's training never started"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "strict" / "eval" / "_SUCCESS.json").exists()
    before = _records(root)
    # The Prefect flow, with subflows per run and wave, two runs at a time.
    resumed = _ablate(tmp_path, "--set", "ablation.parallel=2")
    return tmp_path, root, before, resumed


def test_a_killed_ablation_resumes_without_redoing_finished_recipes(ablation):
    _, root, before, resumed = ablation
    after = _records(root)
    finished = {k: v for k, v in before.items() if k.startswith("baseline/")}
    assert finished and all(after[k] == v for k, v in finished.items()), "a finished recipe was redone"
    assert resumed["stages"]["baseline"]["train"]["skipped"] and resumed["stages"]["baseline"]["evaluate"]["skipped"]
    assert not resumed["stages"]["strict"]["evaluate"].get("skipped")
    assert (root / "strict" / "eval" / "_SUCCESS.json").exists()


def test_data_stages_run_per_recipe_shared_work_once_and_both_score_the_same_bytes(ablation):
    _, root, _, resumed = ablation
    base, strict = root / "baseline", root / "strict"
    # Cleaning differs, so both recipes cleaned and wrote shards; the tokenizer was trained once.
    assert json.loads((strict / "clean" / "stats.json").read_text())["kept"] < json.loads(
        (base / "clean" / "stats.json").read_text())["kept"]
    times = [json.loads((r / "ablation_times.json").read_text()) for r in (base, strict)]
    assert all({"clean", "tokenize", "train", "evaluate"} <= set(t) for t in times)
    meta = [json.loads((r / "tokenizer" / "meta.json").read_text()) for r in (base, strict)]
    assert meta[1]["from_run"]["run"] == "baseline" and meta[0]["sha256"] == meta[1]["sha256"]
    assert "from_run" not in meta[0]
    assert len(list(root.glob("heldout/heldout.jsonl"))) == 1
    assert (strict / "raw").is_symlink() and not (base / "raw").is_symlink()  # one sample corpus
    heldout = [json.loads((r / "eval" / "eval.json").read_text())["result"]["heldout"] for r in (base, strict)]
    assert heldout[0]["sha256"] == heldout[1]["sha256"] and heldout[0]["bytes"] == heldout[1]["bytes"] > 10_000
    assert heldout[0]["bits_per_byte"] != heldout[1]["bits_per_byte"]
    # The answer: both rows, the winner, a plot per metric, in report.md and results.json.
    rows = resumed["rows"]
    assert [r["recipe"] for r in rows] == ["baseline", "strict"] and all(r["done"] for r in rows)
    assert resumed["winner"]["recipe"] == min(rows, key=lambda r: r["heldout_bpb"])["recipe"]
    report = (root / "report.md").read_text()
    assert "**Winner:" in report and "| `strict` | data.gopher_quality.min_words=30 |" in report
    assert (root / "plots" / "heldout_bpb.png").exists() and (root / "plots" / "cost_s.png").exists()
    assert json.loads((root / "results.json").read_text())["winner"] == resumed["winner"]
    assert list((root / "wandb-summary" / "wandb").glob("offline-run-*"))
    assert {yaml.safe_load((r / "config.yaml").read_text())["tracking"]["group"] for r in (base, strict)} == {"ablate-smoke"}


def test_a_rerun_skips_everything(ablation):
    tmp_path, root, _, _ = ablation
    before = _records(root)
    again = _ablate(tmp_path, "--no-prefect")
    assert _records(root) == before
    for run, stages in again["stages"].items():
        assert all(result.get("skipped") or _all_skipped(result) for result in stages.values()), run


def _all_skipped(result: dict) -> bool:
    return all(v.get("skipped") for v in result.values() if isinstance(v, dict))


def test_a_missing_heldout_file_stops_the_ablation_in_the_preflight(tmp_path, capsys):
    from pretrain_pipeline.cli import main

    config = tmp_path / "ablation.yaml"
    config.write_text(yaml.safe_dump(_base()))
    status = main(["ablate", "-c", str(config), "--set", f"runtime.runs_root={tmp_path}",
                   "--set", "ablation.heldout.inputs=[no-such-heldout.jsonl]"])
    assert status == 2
    err = capsys.readouterr().err
    assert "error: eval.heldout_inputs: input 'no-such-heldout.jsonl' matches no" in err
    assert not (tmp_path / "ablate-smoke").exists()
