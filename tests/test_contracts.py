"""The pieces every layer relies on, tested directly: the manifest, the results store and its tables,
atomic writes, the hash cache, and planning that runs without torch."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import cli

from ckptavg.atomic import replacing, write_text
from ckptavg.errors import InputError, ManifestError
from ckptavg.manifest import MANIFEST, Manifest, RunId, is_finished, read_manifest
from ckptavg.report.store import ORIGINAL, Row, Store, failed_row
from ckptavg.report.tables import primary_metric, tidy, wide_table


def row(tag, step, value, task="t", metric="word_perplexity", model="m", better=False):
    return Row(model, tag, tag.split("-")[0], 5, 1000, step, task, metric, value, None, better, 0, "ok", "", "0.4",
               "/ckpt", 1.0)


# -- the manifest ----------------------------------------------------------------------------------
def test_manifest_written_by_the_engine_reads_back_typed_and_round_trips(ckpts, tmp_path):
    from ckptavg.engine.average import average_checkpoints
    from ckptavg.manifest import Method

    out = average_checkpoints(ckpts("float16", "bin"), tmp_path / "avg", device="cpu", hash_inputs=False,
                              method=Method("lawa", 2000, 3, 1000, 1000, (0, 1, 2)), run=RunId("tiny", "lawa-k3"))
    manifest = read_manifest(out)
    assert is_finished(out) and manifest.run == RunId("tiny", "lawa-k3")
    assert manifest.method.step == 2000 and manifest.method.members == (0, 1, 2) and len(manifest.inputs) == 3
    assert manifest.newest.path == str(ckpts("float16", "bin")[-1].absolute())
    raw = json.loads((out / MANIFEST).read_text())
    assert Manifest.from_json(raw).to_json() == raw  # nothing is lost or invented on the way through


def test_an_unknown_or_damaged_manifest_is_an_error_not_a_misread(tmp_path):
    assert read_manifest(tmp_path / "absent") is None and not is_finished(tmp_path / "absent")
    (tmp_path / MANIFEST).write_text(json.dumps({"ckptavg_manifest": 7, "method": {}}))
    with pytest.raises(ManifestError, match="manifest version 7 is not one this ckptavg reads"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"ckptavg_manifest": 1, "created": "now"}))
    with pytest.raises(ManifestError, match="malformed"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{half a file")
    with pytest.raises(ManifestError, match="not JSON"):
        read_manifest(tmp_path)


# -- the results store and its views ----------------------------------------------------------------
def test_store_upserts_a_checkpoint_task_group_and_keeps_failures_apart(tmp_path):
    with Store(tmp_path / "r.sqlite") as store:
        store.put([row(ORIGINAL, 1000, 10.0), row(ORIGINAL, 1000, 0.5, metric="acc")])
        assert store.done("m", ORIGINAL, 1000, "t", 0) and not store.done("m", ORIGINAL, 2000, "t", 0)
        store.put([row(ORIGINAL, 1000, 9.0)])  # a re-score replaces the whole group, not one metric
        assert [(r.metric, r.value) for r in store.rows()] == [("word_perplexity", 9.0)]
        store.put([failed_row("m", "lawa-k5", "lawa", 5, 1000, 2000, "t", 0, "boom", "0.4", "/c")])
        assert not store.done("m", "lawa-k5", 2000, "t", 0)
        assert [r.error for r in store.rows(status="failed")] == ["boom"] and len(store.rows()) == 1
    assert sqlite3.connect(tmp_path / "r.sqlite").execute("SELECT COUNT(*) FROM scores").fetchone() == (2,)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(InputError, match="not a ckptavg results database"):
        Store(tmp_path / "junk.sqlite")


def test_wide_table_lines_up_originals_and_averages_and_says_which_is_better():
    rows = [row(ORIGINAL, 1000, 10.0), row("lawa-k5", 1000, 9.0), row(ORIGINAL, 2000, 8.0), row("lawa-k5", 2000, 8.5),
            row(ORIGINAL, 1000, 0.5, task="mc", metric="acc", better=True), row("lawa-k5", 1000, 0.6, task="mc",
                                                                                   metric="acc", better=True)]
    table = wide_table(rows)
    assert [(c.task, c.tag) for c in table.columns] == [("mc", ORIGINAL), ("mc", "lawa-k5"), ("t", ORIGINAL),
                                                       ("t", "lawa-k5")]
    (m1, s1, v1), (m2, s2, v2) = table.rows
    assert (s1, v1) == (1000, (0.5, 0.6, 10.0, 9.0)) and (s2, v2) == (2000, (None, None, 8.0, 8.5))
    assert [table.beats_original(v1, i) for i in range(4)] == [False, True, False, True]  # higher acc, lower ppl
    assert [table.beats_original(v2, i) for i in range(4)] == [False, False, False, False]
    assert primary_metric(["acc_norm", "acc", "bits_per_byte"]) == "acc"
    assert primary_metric(["zeta", "alpha"]) == "alpha"
    assert set(tidy(rows[:1])[0]) == {"model", "tag", "method", "k", "nu", "step", "task", "metric", "value",
                                      "stderr", "limit", "lm_eval_version", "batch_size", "dtype", "device"}


def test_a_wide_table_reads_at_80_columns_with_what_its_columns_share_in_its_title(tmp_path):
    import os
    import subprocess
    import sys

    from ckptavg.report.tables import shared_affixes, shortened

    runs = ["decay-1sqrt-k5-nu50", "ema-alpha0.5-k5-nu50", "lawa-k5-nu50", "swa-fromfirst-k5-nu50", "wma-k5-nu50"]
    assert shared_affixes(runs) == ("", "-k5-nu50") and shortened(runs[1], "", "-k5-nu50") == "ema-alpha0.5"
    assert shared_affixes(["tiny-pythia-lr0.01", "tiny-pythia-lr0.001"]) == ("tiny-pythia-", "")
    assert shared_affixes(["lawa-k5-nu50"]) == ("", "") and shared_affixes(["a-x", "a-x"]) == ("", "")
    with Store(tmp_path / "r.sqlite") as store:
        store.put([Row(model, tag, "m", 5, 50, step, "stdlib-heldout", "bits_per_byte", 2.5 + step / 1e4, None, False,
                       0, "ok", "", "0.4", "/c", 0.0) for model in ("tiny-pythia-lr0.01", "tiny-pythia-lr0.001")
                   for tag in [ORIGINAL, *runs] for step in (300, 1500)])
    r = subprocess.run([sys.executable, "-m", "ckptavg", "results", str(tmp_path / "r.sqlite")], capture_output=True,
                       text=True, env=dict(os.environ, COLUMNS="80"), timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, r.stdout
    assert "stdlib-heldout: bits_per_byte (lower is better); trajectories tiny-pythia-*" in " ".join(lines[:2])
    for header in ("original", "alpha0.5", "fromfirst", "lawa", "wma", "lr0.001", "2.530"):
        assert header in r.stdout, r.stdout


# -- atomic writes and the hash cache ---------------------------------------------------------------
def test_replacing_shows_the_old_or_the_new_file_never_a_part(tmp_path):
    target = tmp_path / "figure.png"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path  # a writer may choose its format by the suffix
            tmp.write_text("half")
            assert target.read_text() == "old"
            raise RuntimeError("the writer failed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]
    with replacing(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]


def test_hash_cache_is_keyed_by_the_file_and_forgets_a_changed_one(tmp_path, monkeypatch):
    from ckptavg.hashing import cached_hashes, file_sha256, verify_blob

    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    assert file_sha256(f) == (hashlib.sha256(b"a" * 1000).hexdigest(), "computed")
    assert file_sha256(f)[1] == "cache"
    f.write_bytes(b"b" * 1000)  # same size, new contents (and mtime): hashed again, not served stale
    os.utime(f, ns=(1, 1))
    assert file_sha256(f) == (hashlib.sha256(b"b" * 1000).hexdigest(), "computed")
    # a download whose bytes do not match the announced hash is not remembered as checked
    wrong = verify_blob(f, "0" * 64)
    assert wrong == hashlib.sha256(b"b" * 1000).hexdigest()
    assert cached_hashes() and all(v != "0" * 64 for v in cached_hashes().values())


HASHER = """
import sys, time
from pathlib import Path
from ckptavg.hashing import file_sha256
folder, me = Path(sys.argv[1]), sys.argv[2]
while not (folder / "go").exists():
    time.sleep(0.001)
for f in sorted(folder.glob(f"w{me}-*")):
    assert file_sha256(f)[1] == "computed"
"""


def test_two_processes_filling_the_hash_cache_lose_none_of_each_others_entries(tmp_path, monkeypatch):
    from ckptavg.hashing import cached_hashes

    cache = tmp_path / "cache"
    for me in (0, 1):
        for i in range(60):
            (tmp_path / f"w{me}-{i:02d}").write_bytes(f"{me}/{i}".encode() * 100)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), CKPTAVG_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", HASHER, str(tmp_path), me], env=env, stderr=subprocess.PIPE,
                              text=True) for me in "01"]
    (tmp_path / "go").touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    monkeypatch.setenv("CKPTAVG_CACHE", str(cache))
    got = {k.split("|")[0]: v for k, v in cached_hashes().items()}
    want = {str(f.resolve()): hashlib.sha256(f.read_bytes()).hexdigest() for f in tmp_path.glob("w*-*")}
    assert got == want


# -- planning without torch -------------------------------------------------------------------------
TORCHLESS = ("import sys\n"
             "for name in ('torch', 'safetensors', 'transformers', 'lm_eval'):\n"
             "    sys.modules[name] = None  # any import of them now fails\n"
             "from ckptavg.cli import main\n"
             "sys.argv = ['ckptavg'] + sys.argv[1:]\n"
             "main()\n")


@pytest.mark.parametrize("args, shown", [
    (("pythia", "--model", "12b", "--dry-run", "--out", "OUT"), "41 window(s) to average"),
    (("pythia", "--model", "1b", "--method", "ema", "--dry-run", "--eval", "lambada_openai", "--out", "OUT"),
     "41 window(s) to average"),
    (("results", "STORE"), "lawa-k5"),
    (("savings", "STORE", "--model", "m", "--task", "t", "--total-steps", "3000", "--gpu-hours", "10", "--format",
      "csv"), "m,lawa-k5,t,word_perplexity"),
])
def test_planning_and_reporting_run_with_torch_unimportable(tmp_path, args, shown):
    store = tmp_path / "r.sqlite"
    with Store(store) as s:
        s.put([row(ORIGINAL, 1000, 10.0), row(ORIGINAL, 2000, 9.0), row("lawa-k5", 1000, 9.5),
               row("lawa-k5", 2000, 8.9)])
    args = [{"STORE": str(store), "OUT": str(tmp_path / "out")}.get(a, a) for a in args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), COLUMNS="200")
    r = subprocess.run([sys.executable, "-c", TORCHLESS, *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert shown in r.stdout and not (tmp_path / "out").exists()


FROZEN_AT_EXIT = """
import atexit, gc, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count()))
from ckptavg.cli import main
sys.argv = ["ckptavg", *sys.argv[1:]]
main()
"""


def test_a_command_freezes_its_objects_before_the_interpreter_s_last_collection(ckpts, tmp_path):
    """A finished command (or a failed one) leaves the objects it made, torch's by the hundred thousand, out
    of the interpreter's last garbage collection (0.25-0.4 s of every command here), and exits as before:
    its code, its output, its atexit handlers."""
    pair = ckpts("float16", "safetensors", n=2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = tmp_path / "avg"
    bad = ["average", str(pair[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "x")]
    for args, code, said in [(["average", *map(str, pair), "--out", str(out)], 0, "wrote"), (bad, 2, "nope")]:
        r = subprocess.run([sys.executable, "-c", FROZEN_AT_EXIT, *args], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == code and said in r.stderr, r.stderr
        assert int(r.stdout.rsplit("frozen at exit:", 1)[1]) > 100_000, r.stdout
        assert is_finished(out)


WRITER = """
import sys, time
from ckptavg.report.store import Row, Store
path, me = sys.argv[1], int(sys.argv[2])
with Store(path) as store:
    for step in range(40):  # every writer scores the same 40 checkpoints: the groups collide on purpose
        store.put([Row("m", "lawa", "lawa", 5, 1000, step, "t", metric, float(me), None, False, 0, "ok", "",
                       "0.4", f"/writer{me}", time.time()) for metric in ("acc", "acc_norm")])
"""


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    """Four processes upsert the same 40 checkpoint x task groups at once: one whole group each survives."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    store = tmp_path / "shared.sqlite"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(store), str(me)], env=env, stderr=subprocess.PIPE,
                              text=True) for me in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)  # (wait() then read() could block on a full pipe)
        assert p.returncode == 0, err
    rows = sqlite3.connect(store).execute("SELECT step, metric, value, checkpoint FROM scores").fetchall()
    assert len(rows) == 80 and len({(s, m) for s, m, _, _ in rows}) == 80  # no step x metric twice
    by_step: dict[int, set] = {}
    for step, _, value, checkpoint in rows:
        by_step.setdefault(step, set()).add((value, checkpoint))
    assert all(len(v) == 1 for v in by_step.values())  # a group is one writer's, never a mix of two


OLD_SCHEMA = ('CREATE TABLE scores (model, tag, method, k, nu, step, task, metric, value, stderr, higher_is_better, '
              '"limit", status, error, lm_eval_version, checkpoint, time, '
              'PRIMARY KEY (model, tag, step, task, metric, "limit"))')


def test_opening_a_store_waits_for_another_connections_write_lock(tmp_path):
    """Switching a fresh file to WAL needs its write lock, which SQLite refuses at once (no busy handler)
    while another connection holds it: Store() must wait for it, not call the file a wrong one."""
    import threading

    path = tmp_path / "fresh.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute(OLD_SCHEMA)  # a store from before the settings columns, mid-creation
    released = threading.Event()

    def release() -> None:
        released.set()
        other.execute("COMMIT")

    timer = threading.Timer(0.5, release)
    timer.start()
    try:
        with Store(path) as store:
            assert released.is_set()  # it got in only after the other let go
            store.put([row(ORIGINAL, 1000, 10.0)])
            assert [r.value for r in store.rows()] == [10.0]
    finally:
        timer.join()
        other.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_store_still_locked_at_its_deadline_says_so(tmp_path):
    from ckptavg.errors import IOFailure

    path = tmp_path / "held.sqlite"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(IOFailure, match="locked by another process"):
        Store(path, timeout=0.2)
    other.execute("ROLLBACK")
    with Store(path, timeout=0.2) as store:  # a write waits no longer than the deadline either
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(IOFailure, match="locked by another process for 0.2 s"):
            store.put([row(ORIGINAL, 1000, 10.0)])
        other.execute("ROLLBACK")
    other.close()


OPENER = """
import sys
from ckptavg.report.store import Row, Store
barrier_dir, rounds, me = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import multiprocessing.connection as mc
conn = mc.Client(barrier_dir)
for r in range(rounds):
    conn.recv()  # released with the others
    with Store(f"{barrier_dir}.{r}.sqlite") as store:
        store.put([Row("m", "lawa", "lawa", 5, 1000, me, "t", "acc", float(me), None, True, 0, "ok", "", "0.4",
                       f"/opener{me}", 1.0)])
    conn.send(r)
"""


def test_many_processes_released_at_once_open_fresh_and_old_stores(tmp_path):
    """Eight processes open one store at the same instant, 24 times over: fresh files, and old stores that
    every opener migrates at once (each column must be added once). Every opener stores its row."""
    from multiprocessing.connection import Listener

    n, rounds = 8, 24
    address = str(tmp_path / "barrier")
    for r in range(1, rounds, 2):
        con = sqlite3.connect(f"{address}.{r}.sqlite")
        con.execute(OLD_SCHEMA)
        con.commit()
        con.close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with Listener(address) as listener:
        procs = [subprocess.Popen([sys.executable, "-c", OPENER, address, str(rounds), str(me)], env=env,
                                  stderr=subprocess.PIPE, text=True) for me in range(n)]
        conns = [listener.accept() for _ in range(n)]
        try:
            for r in range(rounds):
                for c in conns:
                    c.send(r)
                for c in conns:
                    assert c.recv() == r
        except EOFError:  # an opener died: its error is on its stderr, below
            pass
        for c in conns:
            c.close()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for r in range(rounds):
        with Store(f"{address}.{r}.sqlite") as store:
            assert sorted(x.step for x in store.rows()) == list(range(n)), r


def test_merge_takes_the_newer_score_of_each_group(tmp_path):
    with Store(tmp_path / "main.sqlite") as main, Store(tmp_path / "job.sqlite") as job:
        main.put([row(ORIGINAL, 1000, 10.0)])
        job.put([row(ORIGINAL, 2000, 8.0), row("lawa-k5", 2000, 7.5)])
        older = row(ORIGINAL, 1000, 99.0)
        job.put([replace(older, time=0.5)])  # an older score of a group main has
    with Store(tmp_path / "main.sqlite") as main:
        assert main.merge(tmp_path / "job.sqlite") == 2
        got = {(r.tag, r.step): r.value for r in main.rows()}
        assert got == {(ORIGINAL, 1000): 10.0, (ORIGINAL, 2000): 8.0, ("lawa-k5", 2000): 7.5}
        assert main.merge(tmp_path / "job.sqlite") == 0  # merging again changes nothing


def test_scoring_settings_are_part_of_a_score(tmp_path):
    """Rows record batch size, dtype and device; a curve mixing them is flagged, and savings refuse it."""
    old = tmp_path / "old.sqlite"  # a store written before the settings were recorded
    con = sqlite3.connect(old)
    con.execute('CREATE TABLE scores (model, tag, method, k, nu, step, task, metric, value, stderr, higher_is_better, '
                '"limit", status, error, lm_eval_version, checkpoint, time, '
                'PRIMARY KEY (model, tag, step, task, metric, "limit"))')
    con.execute("INSERT INTO scores VALUES ('m', 'original', 'original', NULL, NULL, 1000, 't', 'word_perplexity', "
                "10.0, NULL, 0, 0, 'ok', '', '0.4', '/c', 1.0)")
    con.commit()
    con.close()
    with Store(old) as store:
        (r,) = store.rows()
        assert r.settings == ("", "", "") and r.value == 10.0
        store.put([replace(row(ORIGINAL, 2000, 9.0), batch_size="8", dtype="float32", device="cpu")])
        assert {x.settings for x in store.rows()} == {("", "", ""), ("8", "float32", "cpu")}

    db = tmp_path / "mixed.sqlite"
    with Store(db) as store:
        store.put([replace(row(tag, step, value, model="pythia-1b-deduped"), batch_size=batch, dtype="float32",
                           device="cpu")
                   for tag, step, value, batch in ((ORIGINAL, 1000, 10.0, "8"), (ORIGINAL, 2000, 9.0, "8"),
                                                   ("lawa-k5", 1000, 9.5, "8"), ("lawa-k5", 2000, 8.9, "16"))])
    r = cli("results", db)
    assert r.exit_code == 0 and "pythia-1b-deduped lawa-k5 t word_perplexity: scored with batch 16" in \
        " ".join(r.stderr.split())
    r = cli("savings", db, "--model", "1b", "--task", "t")
    assert r.exit_code == 2 and "scored with different settings" in " ".join(r.stderr.split())


def test_study_file_resolves_its_diversity_text_against_the_root(tmp_path):
    from ckptavg.study.file import load_study

    file = tmp_path / "s.toml"
    file.write_text('[[sources]]\nlocal = "traj"\ninterval = 100\n\n[[runs]]\nmethod = "lawa"\nk = 2\nnu = 100\n\n'
                    '[scoring]\ntasks = ["pile-enron"]\ndiversity = "texts/mail.jsonl"\nfresh_model = true\n')
    loaded = load_study(file, root=tmp_path / "root")
    assert loaded.scoring["diversity"] == tmp_path / "root" / "texts" / "mail.jsonl"
    assert loaded.scoring["fresh_model"] is True


def test_a_store_on_a_read_only_filesystem_says_so(tmp_path):
    from ckptavg.errors import IOFailure

    folder = tmp_path / "share"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "none", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a filesystem here (needs root)")
    try:
        with Store(folder / "r.sqlite") as store:
            store.put([row(ORIGINAL, 1000, 10.0)])
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        with pytest.raises(IOFailure, match="read-only"):
            Store(folder / "r.sqlite")
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_the_output_formats_options_offer_are_the_ones_the_registry_declares():
    """`options` imports no torch, so it lists the names; the registry (`checkpoints.formats`) is the truth."""
    from ckptavg import options
    from ckptavg.checkpoints import formats

    assert set(options.OUTPUT_FORMATS) == {formats.AUTO, *formats.OUTPUT_FORMATS}
    assert len(formats.OUTPUTS) == len(formats.FORMATS)  # (each format writes an output of its own)
