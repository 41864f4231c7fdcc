"""The test Hub server speaks enough of the Hub's API for huggingface_hub's own client."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import torch
from conftest import pythia_state_dict, write_checkpoint
from hubserver import HubServer

CLIENT = r"""
import json, os, sys
import huggingface_hub as hh
repo = "EleutherAI/pythia-tiny"
api = hh.HfApi()
refs = sorted(b.name for b in api.list_repo_refs(repo).branches)
listed = api.list_repo_tree(repo, revision="step1000", recursive=True)
tree = {t.path: (t.lfs.sha256 if t.lfs else None) for t in listed}
path = hh.hf_hub_download(repo, "model.safetensors", revision="step2000")
try:
    list(api.list_repo_tree(repo, revision="step9999"))
    missing = "no error"
except hh.errors.RevisionNotFoundError:
    missing = "RevisionNotFound"
print(json.dumps({"refs": refs, "tree": tree, "path": path, "blob": os.path.realpath(path), "missing": missing}))
"""


def test_huggingface_hub_client_against_the_server(tmp_path):
    server = HubServer()
    a = write_checkpoint(tmp_path / "a", pythia_state_dict(0, torch.float16), "bin-sharded")
    b = write_checkpoint(tmp_path / "b", pythia_state_dict(1, torch.float16), "safetensors")
    server.add_branch("EleutherAI/pythia-tiny", "step1000", a)
    server.add_branch("EleutherAI/pythia-tiny", "step2000", b)
    server.start()
    try:
        env = dict(os.environ, HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"),
                   PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.run([sys.executable, "-c", CLIENT], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    assert got["refs"] == ["step1000", "step2000"]
    shard = a / "pytorch_model-00001-of-00002.bin"
    assert got["tree"]["pytorch_model-00001-of-00002.bin"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert got["tree"]["config.json"] is None  # not an LFS file
    data = (b / "model.safetensors").read_bytes()
    assert open(got["path"], "rb").read() == data
    assert os.path.basename(got["blob"]) == hashlib.sha256(data).hexdigest()  # the cache blob is named by sha256
    assert got["missing"] == "RevisionNotFound"
