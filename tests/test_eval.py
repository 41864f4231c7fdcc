"""`ckptavg eval`, `results` and `plot` end to end on CPU, offline, with a tokenizer trained here.

Perplexities are checked against an independent computation: the sum of token log-likelihoods
of each document under the same model (transformers, no lm-eval), turned into word perplexity.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import cli

pytestmark = pytest.mark.slow  # lm-eval scores every checkpoint
SUBSETS = {"pile-philpapers": "PhilPapers", "pile-bookcorpus2": "BookCorpus2",
           "pile-youtubesubtitles": "YoutubeSubtitles", "pile-enron": "Enron Emails"}
DOCS = {
    "PhilPapers": ["what is knowledge if not justified true belief", "the mind and the body are one"],
    "BookCorpus2": ["she opened the door and the cold wind came in", "he never saw the letter again"],
    "YoutubeSubtitles": ["hi everyone and welcome back to the channel", "today we bake a simple bread"],
    "Enron Emails": ["please send the gas contract by friday", "the meeting moved to monday at ten"],
    "Github": ["def main(): return 0"],  # other subsets are ignored
}
STEPS = (100, 200, 300)



@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A trained tokenizer, a 3-step tiny GPT-NeoX trajectory, LAWA outputs, a Pile file and a local MC task."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("study")
    texts = [d for docs in DOCS.values() for d in docs] * 5
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<unk>")
    config = GPTNeoXConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25,
                           use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    traj = root / "tiny-run"
    for i, step in enumerate(STEPS):
        torch.manual_seed(i)
        GPTNeoXForCausalLM(config).save_pretrained(traj / f"step{step}")
        fast.save_pretrained(traj / f"step{step}")
    r = cli("trajectory", traj, "--k", 2, "--nu", 100, "--interval", 100, "--out", root / "out", "-q")
    assert r.exit_code == 0, r.output

    import zstandard

    lines = "".join(json.dumps({"text": d, "meta": {"pile_set_name": s}}) + "\n"
                    for s, docs in DOCS.items() for d in docs)
    pile = root / "val.jsonl.zst"
    pile.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))

    tasks = root / "tasks"
    tasks.mkdir()
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps({"q": q, "choices": c, "label": 0}) + "\n" for q, c in [
        ("the mind and the", [" body", " door"]), ("please send the gas", [" contract", " channel"])]))
    (tasks / "tinymc.yaml").write_text(
        f"task: tinymc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {mc}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "broken.yaml").write_text(
        f"task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'missing.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n")
    return {"root": root, "traj": traj, "run": root / "out" / "tiny-run" / "lawa-k2-nu100", "pile": pile,
            "tasks": tasks, "cache": root / "ckptavg-cache"}


@pytest.fixture(autouse=True)
def _isolated(study, monkeypatch):
    monkeypatch.setenv("CKPTAVG_CACHE", str(study["cache"]))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(study["root"] / "datasets-cache"))


def word_perplexity(folder: Path, docs: list[str]) -> float:
    """exp(-sum of log p(token | earlier tokens, after an end-of-text prefix) / words), over all docs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    total, words = 0.0, 0
    for doc in docs:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        inp = torch.tensor([[tok.eos_token_id] + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(inp).logits[0, :-1].double(), -1)
        total += logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
        words += len(re.split(r"\s+", doc))
    return math.exp(-total / words)


def test_eval_scores_originals_and_averages(study, tmp_path):
    db = tmp_path / "results.sqlite"
    tasks = ",".join([*SUBSETS, "tinymc"])
    r = cli("eval", study["run"], "--tasks", tasks, "--pile", study["pile"], "--include-path", study["tasks"],
            "--steps", 300, "--results", db, "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    con = sqlite3.connect(db)
    got = {(tag, task, metric): value for tag, task, metric, value in con.execute(
        "SELECT tag, task, metric, value FROM scores WHERE status='ok' AND step=300")}
    folders = {"original": study["traj"] / "step300", "lawa-k2-nu100": study["run"] / "step300"}
    for tag, folder in folders.items():
        for task, subset in SUBSETS.items():
            assert got[(tag, task, "word_perplexity")] == pytest.approx(word_perplexity(folder, DOCS[subset]), rel=1e-4)
            assert {(tag, task, m) for m in ("byte_perplexity", "bits_per_byte")} <= set(got)
        assert 0.0 <= got[(tag, "tinymc", "acc")] <= 1.0
    assert {s for (s,) in con.execute("SELECT DISTINCT step FROM scores")} == {300}
    # the settings each score was made with (auto on a CPU: batches of 8, float32)
    assert set(con.execute("SELECT DISTINCT batch_size, dtype, device FROM scores")) == {("8", "float32", "cpu")}

    # a re-run skips what is stored; --force scores again
    stamp = dict(con.execute("SELECT tag || task || metric, time FROM scores"))
    r = cli("eval", study["run"], "--tasks", tasks, "--pile", study["pile"], "--include-path", study["tasks"],
            "--steps", 300, "--results", db, "--device", "cpu", "-q")
    assert r.exit_code == 0 and "0 task score(s) written" in r.output
    assert dict(con.execute("SELECT tag || task || metric, time FROM scores")) == stamp
    r = cli("eval", study["run"], "--tasks", "tinymc", "--include-path", study["tasks"], "--steps", 300,
            "--results", db, "--device", "cpu", "--force", "-q")
    assert r.exit_code == 0 and "2 task score(s) written" in r.output
    after = dict(con.execute("SELECT tag || task || metric, time FROM scores"))
    assert all(after[k] > stamp[k] for k in stamp if "tinymc" in k)
    assert all(after[k] == stamp[k] for k in stamp if "tinymc" not in k)

    # the tidy and the wide views
    r = cli("results", db, "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.output)))
    assert len(rows) == 2 * (4 * 3 + 1) and {row["tag"] for row in rows} == set(folders)
    r = cli("results", db, "--format", "json")
    assert len(json.loads(r.output)) == len(rows)
    r = cli("results", db)
    assert r.exit_code == 0 and "pile-enron" in r.output and "300" in r.output


def test_scores_are_lm_evals_own_simple_evaluate(study, tmp_path):
    """ckptavg calls lm-eval's `evaluate` with `simple_evaluate`'s setup (skipping its environment survey):
    values and stderrs must be the ones `simple_evaluate` gives."""
    import lm_eval

    from ckptavg import api
    from ckptavg.evaluation.harness import BOOTSTRAP_ITERS, load_model, score

    s = api.scoring("pile-enron,tinymc", tmp_path / "unused.sqlite", pile=study["pile"], include_path=[study["tasks"]],
                    device="cpu")
    lm = load_model(study["traj"] / "step300", "cpu", "auto", "auto")
    outcomes = list(score(lm, s.tasks, s.manager))
    assert [o.error for o in outcomes] == ["", ""]
    assert any(x.stderr is not None for o in outcomes for x in o.scores)  # bootstrapped ones too
    for outcome in outcomes:
        out = lm_eval.simple_evaluate(model=lm, tasks=[outcome.task], task_manager=s.manager, log_samples=False,
                                      bootstrap_iters=BOOTSTRAP_ITERS, verbosity="ERROR")
        reference = out["results"][outcome.task]
        assert len(outcome.scores) >= 1
        for x in outcome.scores:
            assert reference[f"{x.metric},none"] == x.value, (outcome.task, x.metric)
            assert x.stderr is None or reference[f"{x.metric}_stderr,none"] == x.stderr, (outcome.task, x.metric)
    assert not (tmp_path / "unused.sqlite").exists()


def test_failed_task_is_recorded_and_the_study_goes_on(study, tmp_path):
    db = tmp_path / "r.sqlite"
    r = cli("eval", study["run"], "--tasks", "broken,tinymc", "--include-path", study["tasks"], "--steps", 200,
            "--results", db, "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    assert "failed:" in r.output and "2 task score(s) written" in r.output and "2 failed" in r.output
    con = sqlite3.connect(db)
    status = {(tag, task): s for tag, task, s in con.execute("SELECT tag, task, status FROM scores")}
    assert status == {("original", "broken"): "failed", ("lawa-k2-nu100", "broken"): "failed",
                      ("original", "tinymc"): "ok", ("lawa-k2-nu100", "tinymc"): "ok"}
    r = cli("results", db, "--failed")
    assert r.exit_code == 0 and r.output.count("broken") == 2


def test_plot_draws_pngs(study, tmp_path):
    db = tmp_path / "p.sqlite"
    r = cli("eval", study["run"], "--tasks", "pile-enron", "--pile", study["pile"], "--results", db,
            "--device", "cpu", "--limit", 1, "-q")
    assert r.exit_code == 0, r.output
    con = sqlite3.connect(db)
    assert {s for (s,) in con.execute("SELECT DISTINCT step FROM scores")} == {200, 300}
    assert {lim for (lim,) in con.execute('SELECT DISTINCT "limit" FROM scores')} == {1}
    png = tmp_path / "fig.png"
    r = cli("plot", db, "--task", "pile-enron", "--out", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    r = cli("plot", db, "--task", "pile-enron", "--compare", "lawa", "--no-original", "--out", tmp_path / "c.png")
    assert r.exit_code == 0 and (tmp_path / "c.png").stat().st_size > 5000


@pytest.mark.parametrize("args, message", [
    (("--tasks", "pile-enron"), "need --pile FILE"),
    (("--tasks", "no-such-task", "--pile", "PILE"), "unknown lm-eval task(s): no-such-task"),
    (("--tasks", "pile-enron", "--pile", "NOPE"), "--pile: no such file"),
    (("--dtype", "float17"), "--dtype: unknown value 'float17'"),
    (("--device", "tpu"), "unsupported device 'tpu'"),
    (("--ppl-task", "x=NOPE", "--tasks", "x"), "--ppl-task x="),
    (("--include-path", "NOPE", "--tasks", "tinymc"), "--include-path: no such folder"),
    (("--steps", "999"), "no finished output for step(s) 999"),
    (("--limit", "0"), "--limit must be at least 1"),
    (("--batch-size", "0"), "--batch-size must be auto or a positive integer"),
])
def test_eval_errors(study, tmp_path, args, message):
    args = [study["pile"] if a == "PILE" else tmp_path / "nope.zst" if a == "NOPE" else a for a in args]
    if "--tasks" not in args:  # one that needs nothing else, so that the option under test is what fails
        args += ["--tasks", "tinymc", "--include-path", study["tasks"]]
    device = () if "--device" in args else ("--device", "cpu")
    r = cli("eval", study["run"], *args, "--results", tmp_path / "r.sqlite", *device, "-q")
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not (tmp_path / "r.sqlite").exists()  # checked before anything is scored or stored


def test_pile_file_lacking_subsets_is_named(study, tmp_path):
    partial = tmp_path / "uncopyrighted.jsonl"
    partial.write_text(json.dumps({"text": "a b", "meta": {"pile_set_name": "PhilPapers"}}) + "\n")
    r = cli("eval", study["run"], "--tasks", "pile-philpapers,pile-bookcorpus2", "--pile", partial,
            "--results", tmp_path / "r.sqlite", "--device", "cpu", "-q")
    assert r.exit_code == 2
    assert "no documents for pile-bookcorpus2 (BookCorpus2)" in " ".join(r.output.split())


def test_trajectory_scores_as_it_goes_and_in_memory_agrees(study, tmp_path):
    common = ("--k", 2, "--nu", 100, "--interval", 100, "--eval", "pile-enron,pile-philpapers", "--pile",
              study["pile"], "--device", "cpu", "-q")
    r = cli("trajectory", study["traj"], *common, "--out", tmp_path / "out", "--results", tmp_path / "a.sqlite")
    assert r.exit_code == 0, r.output
    r = cli("trajectory", study["traj"], *common, "--out", tmp_path / "mem", "--results", tmp_path / "b.sqlite",
            "--in-memory")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "mem").exists()  # nothing but results
    query = "SELECT tag, step, task, metric, value FROM scores WHERE status='ok'"
    written, in_memory = ({(tag, step, task, metric): value for tag, step, task, metric, value
                           in sqlite3.connect(db).execute(query)}
                          for db in (tmp_path / "a.sqlite", tmp_path / "b.sqlite"))
    expected = {(tag, step, task, m) for tag in ("original", "lawa-k2-nu100") for step in (200, 300)
                for task in ("pile-enron", "pile-philpapers") for m in ("word_perplexity", "byte_perplexity",
                                                                        "bits_per_byte")}
    assert set(written) == set(in_memory) == expected
    # both scored on the resident model: the written folder copied into it, the in-memory average made in it
    assert in_memory == written
    # resumed: everything is scored, so nothing is averaged or scored again
    r = cli("trajectory", study["traj"], *common, "--out", tmp_path / "mem", "--results", tmp_path / "b.sqlite",
            "--in-memory")
    assert r.exit_code == 0 and "0 window(s) averaged in memory" in r.output and "0 task score(s)" in r.output


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resident_model_holds_exactly_what_transformers_loads(study):
    """Weights swapped into one model (stored `embed_out` into transformers 5's `lm_head`) and an average
    accumulated into it equal, bit for bit, what `from_pretrained` gives from the folders themselves."""
    from transformers import AutoModelForCausalLM

    from ckptavg.engine.average import plan_in_memory
    from ckptavg.evaluation.resident import ResidentModel

    def reference(folder: Path) -> dict[str, torch.Tensor]:
        return _state(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))

    resident = ResidentModel("cpu", "auto", "auto")
    lm = resident.lm(study["traj"] / "step100")
    model = resident.loaded.model
    for step in (300, 200):
        assert resident.lm(study["traj"] / f"step{step}") is lm
        got, want = _state(model), reference(study["traj"] / f"step{step}")
        assert got.keys() == want.keys() and "lm_head.weight" in got
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["lm_head.weight"], reference(study["traj"] / "step300")["lm_head.weight"])
    plan = plan_in_memory([study["traj"] / "step200", study["traj"] / "step300"])
    assert resident.lm(study["traj"] / "step300", plan) is lm
    got, want = _state(model), reference(study["run"] / "step300")  # the same average, written by `trajectory`
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert resident.builds == 1


def test_resident_model_refuses_what_it_cannot_load_as_transformers_does(study, tmp_path):
    """A first checkpoint lacking a parameter (transformers would initialise it at random) is not taken as
    the resident model's (the scorer then builds fresh models); a later one lacking it fails by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ckptavg.errors import InputError
    from ckptavg.evaluation.resident import ResidentModel, ResidentUnsupported

    lacking = tmp_path / "lacking"
    shutil.copytree(study["traj"] / "step300", lacking)
    weights = load_file(lacking / "model.safetensors")
    del weights["embed_out.weight"]
    save_file(weights, lacking / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ResidentUnsupported, match="lm_head.weight"):
        ResidentModel("cpu", "auto", "auto").lm(lacking)
    resident = ResidentModel("cpu", "auto", "auto")
    resident.lm(study["traj"] / "step100")
    with pytest.raises(InputError, match="lacks 1 tensor.*lm_head.weight"):
        resident.lm(lacking)


def test_one_resident_model_scores_checkpoints_exactly_as_fresh_models(study, tmp_path):
    """The cross-talk guard (lm-eval #2715, #4063): checkpoints scored in turn on one model, in either
    order, get the scores that a fresh model for each gets."""
    from ckptavg import api

    targets = [t for t in api.find_targets(study["run"], {200, 300}) if t.tag == "original"]
    assert [t.step for t in targets] == [200, 300]
    scores = {}
    for name, order, fresh in (("fresh", targets, True), ("resident", targets, False),
                               ("reversed", targets[::-1], False)):
        scoring = api.scoring("pile-enron,tinymc", tmp_path / f"{name}.sqlite", pile=study["pile"],
                              include_path=[study["tasks"]], device="cpu", fresh_model=fresh)
        run = api.evaluate(study["run"], scoring, targets=order)
        assert run.scored == 4 and run.failed == 0
        scores[name] = {(step, task, metric): value for step, task, metric, value in sqlite3.connect(
            tmp_path / f"{name}.sqlite").execute("SELECT step, task, metric, value FROM scores")}
    assert scores["resident"] == scores["fresh"] == scores["reversed"]
    # the two checkpoints do score differently, so cross-talk would show
    assert scores["fresh"][(200, "pile-enron", "word_perplexity")] != scores["fresh"][(300, "pile-enron",
                                                                                       "word_perplexity")]


def test_diversity_against_an_independent_computation(study, tmp_path):
    """Argmax disagreement and mean KL(A || B) against float64 logits and torch's own kl_div; stored and
    plotted against step; two checkpoints that are not comparable are refused."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = study["traj"] / "step100", study["traj"] / "step300"
    docs = DOCS["Enron Emails"] + DOCS["PhilPapers"]
    text = tmp_path / "mail.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    db = tmp_path / "d.sqlite"
    r = cli("diversity", a, b, "--text", text, "--results", db, "--device", "cpu")
    assert r.exit_code == 0, r.output

    tok = AutoTokenizer.from_pretrained(b)
    ma, mb = (AutoModelForCausalLM.from_pretrained(f, dtype=torch.float64).eval() for f in (a, b))
    differ, positions, kl = 0, 0, 0.0
    for doc in docs:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        x = torch.tensor([[tok.eos_token_id, *ids[:-1]]])
        with torch.no_grad():
            la, lb = (torch.log_softmax(m(x).logits[0], -1) for m in (ma, mb))
        kl += F.kl_div(lb, la, log_target=True, reduction="sum").item()
        differ += int((la.argmax(-1) != lb.argmax(-1)).sum())
        positions += len(ids)
    stored = {(m, t, step, task, metric): v for m, t, step, task, metric, v in sqlite3.connect(db).execute(
        "SELECT model, tag, step, task, metric, value FROM scores")}
    assert set(stored) == {("tiny-run", "pair", 300, "diversity:mail", m) for m in ("argmax_disagreement", "kl_nats")}
    assert stored[("tiny-run", "pair", 300, "diversity:mail", "kl_nats")] == pytest.approx(kl / positions, rel=1e-5)
    assert kl > 0 and differ > 0  # the two checkpoints do disagree
    got = stored[("tiny-run", "pair", 300, "diversity:mail", "argmax_disagreement")]
    assert abs(got - differ / positions) <= 1 / positions  # float32 against float64: a near tie at most
    assert f"over {positions} positions" in r.output

    # a checkpoint against itself; a second pair for the plot against step
    r = cli("diversity", b, b, "--text", text, "--device", "cpu")
    assert r.exit_code == 0 and "argmax disagreement 0.0000, mean KL(A || B) 0 nats" in r.output
    r = cli("diversity", study["traj"] / "step100", study["traj"] / "step200", "--text", text, "--results", db,
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    png = tmp_path / "d.png"
    r = cli("plot", db, "--task", "diversity:mail", "--metric", "kl_nats", "--out", png)
    assert r.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG", r.output

    other = tmp_path / "other"
    import shutil

    shutil.copytree(b, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"hidden_act": "relu"}))
    for args, message in (((a, other, "--text", text), "differ in config or tokenizer"),
                          ((a, other, "--text", text, "--results", db), "no step in its name; give --step"),
                          ((a, b, "--text", tmp_path / "none.txt"), "none.txt"),
                          ((a, tmp_path, "--text", text), "not a model folder")):
        r = cli("diversity", *args, "--device", "cpu")
        assert r.exit_code == 2 and message in " ".join(r.output.split()), (args, r.output)


def test_trajectory_measures_the_diversity_of_consecutive_window_members(study, tmp_path):
    """`--diversity` stores each consecutive pair once (windows share members), with the numbers the
    `diversity` command gives for the same two folders; `--force` measures them again."""
    text = tmp_path / "mail.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS["Enron Emails"]))
    common = ("--k", 2, "--nu", 100, "--interval", 100, "--eval", "pile-enron", "--pile", study["pile"],
              "--device", "cpu", "--results", tmp_path / "a.sqlite", "--diversity", text, "--in-memory", "-q")
    r = cli("trajectory", study["traj"], *common, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    query = "SELECT tag, step, metric, value, time FROM scores WHERE task='diversity:mail'"
    stored = {(tag, step, metric): (value, t) for tag, step, metric, value, t in
              sqlite3.connect(tmp_path / "a.sqlite").execute(query)}
    assert set(stored) == {("nu100", s, m) for s in (200, 300) for m in ("argmax_disagreement", "kl_nats")}
    for step in (200, 300):
        r = cli("diversity", study["traj"] / f"step{step - 100}", study["traj"] / f"step{step}", "--text", text,
                "--results", tmp_path / "b.sqlite", "--device", "cpu")
        assert r.exit_code == 0, r.output
    alone = {(step, metric): value for step, metric, value in sqlite3.connect(tmp_path / "b.sqlite").execute(
        "SELECT step, metric, value FROM scores")}
    assert {(s, m): v for (_, s, m), (v, _) in stored.items()} == alone
    r = cli("trajectory", study["traj"], *common, "--out", tmp_path / "out", "--force")
    assert r.exit_code == 0, r.output
    again = {(tag, step, metric): (value, t) for tag, step, metric, value, t in
             sqlite3.connect(tmp_path / "a.sqlite").execute(query)}
    assert again.keys() == stored.keys() and all(again[k][1] > stored[k][1] for k in stored)  # --force redoes it
    r = cli("trajectory", study["traj"], *common[:-4], "--diversity", text, "-q", "--out", tmp_path / "o2")
    assert r.exit_code == 0, r.output  # written outputs: measured before each window is averaged


def test_zero_shot_task_offline_without_its_dataset_says_what_to_fetch_before_scoring(study, tmp_path):
    r = cli("eval", study["run"], "--tasks", "sciq", "--steps", 300, "--no-originals", "--results",
            tmp_path / "r.sqlite", "--device", "cpu", "-q")
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "task sciq: its dataset allenai/sciq is not in the cache and the Hub is off" in text
    assert "`ckptavg tasks fetch sciq` on a machine with a network" in text
    assert not (tmp_path / "r.sqlite").exists()  # before anything is scored


def test_eval_finds_outputs_at_any_depth_and_takes_their_identity_from_the_manifest(study, tmp_path):
    """`eval OUT` where OUT is what the trajectory run was given as --out; and a moved, renamed tree."""
    import shutil

    moved = tmp_path / "archive" / "2026" / "renamed"
    shutil.copytree(study["run"], moved)
    for where, found in ((study["root"] / "out", "2 finished output(s) in 1 run(s)"),
                         (tmp_path / "archive", "2 finished output(s) in 1 run(s)")):
        db = tmp_path / f"{where.name}.sqlite"
        r = cli("eval", where, "--tasks", "pile-enron", "--pile", study["pile"], "--limit", 1, "--no-originals",
                "--results", db, "--device", "cpu", "-q")
        assert r.exit_code == 0, r.output
        assert found in " ".join(r.output.split())
        rows = set(sqlite3.connect(db).execute("SELECT DISTINCT model, tag, step FROM scores WHERE status='ok'"))
        assert rows == {("tiny-run", "lawa-k2-nu100", 200), ("tiny-run", "lawa-k2-nu100", 300)}
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("eval", empty, "--tasks", "pile-enron", "--pile", study["pile"], "--results", tmp_path / "e.sqlite")
    assert r.exit_code == 2 and "no finished trajectory outputs" in r.output


def test_scores_are_logged_to_every_tracker_as_they_are_stored(study, tmp_path, monkeypatch):
    """A trajectory run scoring as it goes, with TensorBoard, MLflow and W&B (offline) asked for: every stored
    score in each, once, at its step; run again (nothing new) and exported again, still once."""
    from test_tracking import approx, expected, mlflow_series, tensorboard_series
    from wandbfile import history

    from ckptavg.report.store import Store

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    db, tb, ml = tmp_path / "r.sqlite", tmp_path / "tb", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ("trajectory", study["traj"], "--k", 2, "--nu", 100, "--interval", 100, "--eval", "pile-enron", "--pile",
            study["pile"], "--device", "cpu", "--out", tmp_path / "out", "--results", db, "--tensorboard", tb,
            "--mlflow", ml, "--wandb", "ckptavg-test", "-q")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    with Store(db) as s:
        want = expected(s.rows())
    assert len(want) == 2 * 3 and all(len(v) == 2 for v in want.values())  # original and lawa at steps 200, 300
    assert approx(tensorboard_series(tb)) == approx(want)
    assert mlflow_series(ml) == want

    def wandb_series() -> dict:
        got: dict = {}
        for log in sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb")):
            for row in history(log):
                for key, value in row.items():
                    if key.startswith("eval/"):
                        got.setdefault(("tiny-run", key), []).append((row["ckptavg/step"], value))
        return {k: sorted(v) for k, v in got.items()}

    assert wandb_series() == want
    r = cli(*args)  # everything is stored: nothing scored, nothing sent again
    assert r.exit_code == 0 and "0 task score(s)" in r.output, r.output
    r = cli("results", db, "--export", "tensorboard", tb)
    assert r.exit_code == 0 and "0 score(s) logged" in r.output
    assert approx(tensorboard_series(tb)) == approx(want) and mlflow_series(ml) == want and wandb_series() == want


def test_task_data_fetched_once_then_scored_offline_with_the_hub_stopped(study, tmp_path):
    """`tasks list` says where a task's data comes from and that it is not cached; `tasks fetch` puts it in
    the Hugging Face cache from the (test) Hub; with the Hub stopped and HF_HUB_OFFLINE=1, `eval` scores it.
    A task whose dataset ships a loading script is one line, exit 2, before anything is scored."""
    from conftest import hub_cli
    from hubserver import HubServer

    repo = tmp_path / "mc-repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "test.jsonl").write_text((study["root"] / "mc.jsonl").read_text())
    scripted = tmp_path / "scripted-repo"
    scripted.mkdir()
    (scripted / "scripted-repo.py").write_text("import datasets\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc = ("output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
          "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "hubmc.yaml").write_text(f"task: hubmc\ndataset_path: someone/mc-repo\ntest_split: test\n{mc}")
    (tasks / "scripted.yaml").write_text(f"task: scripted\ndataset_path: someone/scripted-repo\ntest_split: test\n{mc}")
    hub = HubServer()
    hub.add_dataset("someone/mc-repo", repo)
    hub.add_dataset("someone/scripted-repo", scripted)
    hub.start()
    online = {"HF_DATASETS_OFFLINE": "0"}
    try:
        r = hub_cli(hub, tmp_path, "tasks", "list", "--tasks", "hubmc", "--include-path", str(tasks), env=online)
        assert r.returncode == 0, r.stderr
        row = next(line for line in r.stdout.splitlines() if "hubmc" in line)
        assert "someone/mc-repo" in row and "test" in row and " no " in row, r.stdout
        r = hub_cli(hub, tmp_path, "tasks", "fetch", "hubmc", "--include-path", str(tasks), env=online)
        assert r.returncode == 0 and "1 dataset(s) fetched" in r.stderr, r.stderr
        r = hub_cli(hub, tmp_path, "tasks", "list", "--tasks", "hubmc", "--include-path", str(tasks), env=online)
        assert " yes " in next(line for line in r.stdout.splitlines() if "hubmc" in line), r.stdout
        r = hub_cli(hub, tmp_path, "eval", str(study["run"]), "--tasks", "scripted", "--include-path", str(tasks),
                    "--steps", "300", "--results", str(tmp_path / "s.sqlite"), "--device", "cpu", "-q", env=online)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "task scripted: its dataset someone/scripted-repo ships a loading script" in " ".join(r.stderr.split())
        assert not (tmp_path / "s.sqlite").exists()  # nothing scored, no row stored
    finally:
        hub.stop()
    r = hub_cli(hub, tmp_path, "eval", str(study["run"]), "--tasks", "hubmc", "--include-path", str(tasks), "--steps",
                "300", "--results", str(tmp_path / "r.sqlite"), "--device", "cpu", "-q", offline=True,
                env={"HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 0 and "2 task score(s) written" in r.stderr, r.stderr
    rows = sqlite3.connect(tmp_path / "r.sqlite").execute("SELECT tag, status, value FROM scores").fetchall()
    assert {(tag, status) for tag, status, _ in rows} == {("original", "ok"), ("lawa-k2-nu100", "ok")}
    assert all(0.0 <= value <= 1.0 for _, _, value in rows)


def test_a_follower_scores_each_window_as_it_lands_and_logs_it_once(study, tmp_path):
    """`trajectory --follow --eval`: each window averaged, it and its original scored into the store and
    logged to TensorBoard; followed again (nothing new), nothing scored or logged twice."""
    from test_tracking import approx, expected, tensorboard_series

    from ckptavg.report.store import Store

    db, tb = tmp_path / "r.sqlite", tmp_path / "tb"
    args = ("trajectory", study["traj"], "--follow", "--k", 2, "--nu", 100, "--interval", 100, "--until", 300,
            "--poll", "1s", "--eval", "pile-enron", "--pile", study["pile"], "--device", "cpu", "--out",
            tmp_path / "out", "--results", db, "--tensorboard", tb, "-q")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    with Store(db) as s:
        want = expected(s.rows())
    assert {(k[1].split("/")[1], step) for k, pts in want.items() for step, _ in pts} == {
        (tag, step) for tag in ("original", "lawa-k2-nu100") for step in (200, 300)}
    assert approx(tensorboard_series(tb)) == approx(want)
    r = cli(*args)
    assert r.exit_code == 0 and "0 output(s) written" in r.output, r.output
    assert approx(tensorboard_series(tb)) == approx(want)
