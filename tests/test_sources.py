"""Pure rules shared by every trajectory source: which files make a checkpoint, which revisions are suspect."""

from __future__ import annotations

import pytest

from ckptavg.checkpoints.names import pick_files
from ckptavg.errors import InputError
from ckptavg.trajectory.sources import find_duplicates, step_branches


def test_pick_files_prefers_safetensors_and_keeps_side_files():
    names = ["config.json", "pytorch_model.bin", "model.safetensors", "README.md", "tokenizer.json",
             "flax_model.msgpack", "training_args.bin"]
    assert pick_files(names) == {"model.safetensors", "config.json", "tokenizer.json"}
    sharded = ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00003.bin",
               "pytorch_model-00002-of-00003.bin", "pytorch_model-00003-of-00003.bin", "training_args.bin"]
    assert pick_files(sharded) == set(sharded) - {"training_args.bin"}
    assert pick_files(["config.json", "README.md"]) is None
    dcp = [".metadata", "__0_0.distcp", "__0_1.distcp", "config.json", "train/rank0.pt"]
    assert pick_files(dcp) == {".metadata", "__0_0.distcp", "__0_1.distcp", "config.json"}
    assert pick_files(["__0_0.distcp"]) is None  # no .metadata: a save still being written


def test_step_branches():
    assert step_branches(["main", "step10", "step2", "step2-old"], r"step(\d+)", "r") == {2: "step2", 10: "step10"}
    with pytest.raises(InputError, match="both match"):
        step_branches(["step1", "step01"], r"step(\d+)", "r")
    with pytest.raises(InputError, match="needs a group"):
        step_branches(["step1"], r"step\d+", "r")


def test_duplicates_like_the_public_pythia_repos():
    steps = {"step1000": 1000, "step2000": 2000, "step3000": 3000, "step4000": 4000}
    blobs = {
        "step1000": {"a.bin": "final-1", "b.bin": "final-2"},  # serves the final model (pythia-2.8b)
        "step2000": {"a.bin": "s2-1", "b.bin": "s2-2"},
        "step3000": {"a.bin": "final-1", "b.bin": "s3-2"},  # one shard of the final model (pythia-12b)
        "step4000": {"a.bin": "final-1", "b.bin": "final-2"},
        "main": {"a.bin": "final-1", "b.bin": "final-2"},
    }
    found = find_duplicates(blobs, steps, planned={"step1000", "step2000"})
    assert [d.revisions for d in found] == [("step1000", "step3000", "step4000", "main")]
    assert found[0].files == ("a.bin", "b.bin")
    # main equal to the last step is how the repos are meant to be
    assert find_duplicates(blobs, steps, planned={"step2000", "step4000"}) == [found[0]]
    clean = {k: v for k, v in blobs.items() if k in ("step2000", "step4000", "main")}
    assert find_duplicates(clean, steps, planned=set(clean)) == []
    # a plan that touches none of the suspects hears nothing
    assert find_duplicates(blobs, steps, planned={"step2000"}) == []
