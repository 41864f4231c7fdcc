"""Runs that the real trainers saved (tests/trainers/data/, written by `make fixtures`): OLMo-core (1 process
and 2-process FSDP), PyTorch Lightning, transformers' Trainer, DeepSpeed ZeRO-2, megatron-core `torch_dist`
and nanoGPT's train.py. Each is found without flags, averaged, and compared tensor by tensor with the
float64 mean, cast once, of what torch's own loaders give for each step (`dcp` for DCP folders,
`torch.load(weights_only=True)` for `torch.save` files, safetensors for model folders); the trainers
themselves are not needed, except by the tests that load an average back into one (skipped without it).
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import cli, load_reference
from safetensors.torch import load_file

from ckptavg.checkpoints.layouts import likely_weight_files
from ckptavg.checkpoints.open import open_checkpoint
from ckptavg.engine.average import average_checkpoints
from ckptavg.errors import InputError, MismatchError
from ckptavg.manifest import MANIFEST
from ckptavg.trajectory.sources import LocalTrajectory

DATA = Path(__file__).parent / "trainers" / "data"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@dataclass(frozen=True)
class Run:
    name: str
    steps: tuple[int, ...]  # what the run folder holds, found without flags
    checkpoint: str  # a step's checkpoint, relative to the run folder
    trainer: str  # as the manifest records it
    output: str  # the output format by default
    pattern: str | None = None  # the step pattern to give, for a trainer without a layout of its own


RUNS = [
    Run("olmo-core", (0, 2, 4, 6), "step{}/model_and_optim", "olmo-core", "dcp"),
    Run("olmo-core-fsdp", (0, 2, 4, 6), "step{}/model_and_optim", "olmo-core", "dcp"),
    Run("lightning", (2, 4, 6), "epoch=0-step={}.ckpt", "lightning", "torch"),
    Run("lightning-model-parallel", (2, 4, 6), "epoch=0-step={}.ckpt", "lightning", "dcp"),
    Run("hf-trainer", (2, 4, 6), "checkpoint-{}", "transformers", "safetensors"),
    Run("accelerate-fsdp", (2, 4, 6), "checkpoint-{}/pytorch_model_fsdp_0", "accelerate", "dcp"),
    Run("deepspeed", (2, 4, 6), "global_step{}", "deepspeed", "torch"),
    Run("megatron", (2, 4, 6), "iter_{:07d}", "megatron", "dcp"),
    Run("megatron-tp2", (2, 4, 6), "iter_{:07d}", "megatron", "dcp"),  # tensor-parallel: column shards
    Run("torchtitan/checkpoint", (2, 4, 6), "step-{}", "dcp", "dcp"),
    Run("nanogpt", (2, 4, 6), "iter{}/ckpt.pt", "nanogpt", "torch", r"iter(\d+)"),
]
RUN = {r.name: r for r in RUNS}
MODEL_ENTRY = {"lightning": "state_dict", "deepspeed": "module", "nanogpt": "model"}
OUTPUT_FILE = {"lightning": "model.ckpt", "deepspeed": "mp_rank_00_model_states.pt", "nanogpt": "ckpt.pt"}


class _TorchClasses(pickle.Unpickler):
    """OLMo-core pickles its own copy of torch's `_StorageInfo`: read as torch's, for torch's reader."""

    def find_class(self, module, name):
        if module == "olmo_core.distributed.checkpoint.filesystem":
            module = "torch.distributed.checkpoint.filesystem"
        return super().find_class(module, name)


def _dcp_model(folder: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP folder as torch's reader loads it (optimizer state left out)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class Reader(FileSystemReader):
        def read_metadata(self):
            with open(Path(self.path) / ".metadata", "rb") as f:
                return _TorchClasses(f).load()

    sd: dict = {}  # filled with everything saved, as torch's dcp_to_torch_save fills it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load_state_dict(sd, storage_reader=Reader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    # OLMo-core nests its model under "model", Lightning under "state_dict"; torchtitan keeps it at the top,
    # beside its training state
    nest = next((k for k in ("model", "state_dict") if k in sd), None)
    model = sd[nest] if nest else {k: v for k, v in sd.items() if k not in ("optimizer", "lr_scheduler", "train_state",
                                                                              "dataloader")}
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, torch.Tensor):
                flat[prefix + k] = v
    walk(f"{nest}." if nest else "", model)
    return flat


def loaded(run: Run, step: int) -> dict[str, torch.Tensor]:
    """What torch's own loaders give for the model tensors of one step."""
    path = DATA / run.name / run.checkpoint.format(step)
    if (path / ".metadata").is_file():
        return _dcp_model(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    file = path / "mp_rank_00_model_states.pt" if path.is_dir() else path
    saved = torch.load(file, weights_only=True, map_location="cpu")
    return {k.removeprefix("_orig_mod."): v for k, v in saved[MODEL_ENTRY[run.trainer]].items()}


def written(out: Path, run: Run) -> dict[str, torch.Tensor]:
    """The tensors of an average, read back the plain way: a trainer's own file by torch.load, a DCP
    folder (inside the output where the trainer keeps it inside its steps) by torch's converter."""
    if run.trainer == "olmo-core" and not (out / "model.safetensors").is_file():
        assert (out / "model_and_optim" / ".metadata").is_file()  # as OLMo-core lays out a step: its tools find it
        return {k: v for k, v in load_reference(out).items() if isinstance(v, torch.Tensor)}
    if run.trainer not in OUTPUT_FILE or run.output != "torch" or (out / "model.safetensors").is_file():
        # (a DCP average also carries the model's non-tensor entries, megatron's _extra_state)
        return {k: v for k, v in load_reference(out).items() if isinstance(v, torch.Tensor)}
    saved = torch.load(out / OUTPUT_FILE[run.trainer], weights_only=True)
    assert all(saved.get(k) is None for k in ("optimizer", "optimizer_states"))  # a model, not a run to resume
    return saved[MODEL_ENTRY[run.trainer]]


def assert_mean(got: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]]) -> None:
    assert set(got) == set(states[-1])
    for name, newest in states[-1].items():
        want = (sum(s[name].double() for s in states) / len(states)).to(newest.dtype) \
            if newest.is_floating_point() else newest
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def trainer_fixtures():
    """tests/trainers/write.py, the script that wrote the fixtures: its models, for the trainers to load into."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trainer_fixtures", Path(__file__).parent / "trainers" / "write.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def _fixtures_present():
    if not DATA.is_dir():
        pytest.skip("tests/trainers/data is missing (make fixtures)")


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_each_trainer_s_run_is_found_without_flags_and_averages_to_the_float64_mean(run, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    source = LocalTrajectory(DATA / run.name, run.pattern)
    assert source.steps() == list(run.steps)
    members = list(run.steps[-3:])
    # the files the command line hashes before it imports torch, from names alone, are the ones opening reads
    for s in members:
        assert likely_weight_files(source.fetch(s)) == sorted(open_checkpoint(source.fetch(s)).files), s
    out = average_checkpoints([source.fetch(s) for s in members], tmp_path / "avg", device="cpu")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["output"]["format"] == run.output
    assert {i["trainer"] for i in manifest["inputs"]} == {run.trainer}
    assert_mean(written(out, run), [loaded(run, s) for s in members])
    # what the trainer keeps beside its DCP data comes along, byte for byte, for it to take the average as its own
    beside = {"megatron": ("metadata.json", "common.pt"), "megatron-tp2": ("metadata.json", "common.pt"),
              "lightning-model-parallel": ("meta.pt",)}.get(run.name, ())
    assert set(beside) <= set(manifest["output"].get("side_files_from_newest_input", ()))
    assert all((out / n).read_bytes() == (DATA / run.name / run.checkpoint.format(members[-1]) / n).read_bytes()
               for n in beside)
    if run.name == "accelerate-fsdp":  # laid out as the Trainer lays out its steps, with the model's config
        assert (out / "pytorch_model_fsdp_0" / ".metadata").is_file() and (out / "config.json").is_file()


@pytest.mark.parametrize("run", [RUN["olmo-core"], RUN["lightning"], RUN["megatron"]],
                         ids=["olmo-core", "lightning", "megatron"])
def test_ckptavg_trajectory_runs_on_a_trainer_s_folder_as_it_was_saved(run, tmp_path):
    """`ckptavg trajectory RUN` with no layout flags: LAWA windows of the trainer's own steps."""
    r = cli("trajectory", DATA / run.name, "--k", 2, "--nu", 2, "--interval", 2, "--start", run.steps[-2],
            "--out", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    outs = sorted((tmp_path / "out").rglob(MANIFEST), key=lambda p: int(p.parent.name.removeprefix("step")))
    assert [int(p.parent.name.removeprefix("step")) for p in outs] == list(run.steps[-2:])
    for manifest in outs:
        step = int(manifest.parent.name.removeprefix("step"))
        assert_mean(written(manifest.parent, run), [loaded(run, s) for s in (step - 2, step)])
    # run again (as after a kill): the finished windows are found finished and left as they are
    shutil.rmtree(outs[-1].parent)
    before = outs[0].stat().st_mtime_ns
    r = cli("trajectory", DATA / run.name, "--k", 2, "--nu", 2, "--interval", 2, "--start", run.steps[-2],
            "--out", tmp_path / "out", "-q")
    assert r.exit_code == 0 and outs[0].stat().st_mtime_ns == before and outs[-1].is_file(), r.stderr


def test_the_average_of_dcp_checkpoints_can_be_written_as_safetensors(tmp_path):
    run = RUN["olmo-core-fsdp"]
    members = [DATA / run.name / run.checkpoint.format(s) for s in run.steps[-2:]]
    r = cli("average", *members, "--output-format", "safetensors", "--out", tmp_path / "avg")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "avg" / "model.safetensors").is_file()
    assert_mean(load_reference(tmp_path / "avg"), [loaded(run, s) for s in run.steps[-2:]])


def test_olmo_core_s_own_merge_and_an_unfinished_save_are_not_steps(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(DATA / "olmo-core", run)
    assert (run / "step6-merged").is_dir()
    (run / "step4" / "model_and_optim" / ".metadata").unlink()  # as a save still being written looks
    with pytest.warns(UserWarning, match="step 4 left out: .*no .metadata"):
        source = LocalTrajectory(run)
    assert source.steps() == [0, 2, 6]
    r = cli("trajectory", run, "--k", 2, "--nu", 4, "--interval", 2, "--start", 6, "--dry-run", "--out", tmp_path / "o")
    assert r.exit_code == 0 and "warning: step 4 left out" in r.stderr and "UserWarning" not in r.stderr, r.stderr


def test_checkpoints_of_different_trainers_are_not_averaged_together(tmp_path):
    lightning = DATA / "lightning" / "epoch=0-step=2.ckpt"
    deepspeed = DATA / "deepspeed" / "global_step2"
    with pytest.raises(MismatchError, match="saved by lightning but .* by deepspeed"):
        average_checkpoints([lightning, deepspeed], tmp_path / "avg", device="cpu")
    r = cli("average", lightning, deepspeed, "--out", tmp_path / "avg")
    assert r.exit_code == 2 and "one trainer's checkpoints" in r.stderr and not (tmp_path / "avg").exists()


def test_a_deepspeed_zero3_save_is_refused_naming_its_consolidation_script(tmp_path):
    step = tmp_path / "global_step2"
    step.mkdir()
    shutil.copy(DATA / "deepspeed" / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                step / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(InputError, match="ZeRO-3.*zero_to_fp32.py"):
        average_checkpoints([step, step], tmp_path / "avg", device="cpu")


def test_olmo_core_loads_the_dcp_average_into_its_model(tmp_path):
    """OLMo-core's own loader takes the average (run where OLMo-core is installed)."""
    pytest.importorskip("olmo_core")
    from olmo_core.distributed.checkpoint import load_model_and_optim_state

    run = RUN["olmo-core-fsdp"]
    members = [DATA / run.name / run.checkpoint.format(s) for s in run.steps[-3:]]
    out = average_checkpoints(members, tmp_path / "avg", device="cpu")
    model = trainer_fixtures().olmo_core_config().build(init_device="cpu")
    load_model_and_optim_state(out / "model_and_optim", model)
    assert_mean({f"model.{k}": v for k, v in model.state_dict().items()}, [loaded(run, s) for s in run.steps[-3:]])


def test_olmo_core_s_hf_converter_takes_the_average(tmp_path):
    """`olmo_core.nn.hf.convert_checkpoint_to_hf` reads the average as one of its own steps (run where
    OLMo-core is installed): the Hugging Face model it writes holds the averaged weights."""
    pytest.importorskip("olmo_core")
    from olmo_core.data import TokenizerConfig
    from olmo_core.nn.hf import convert_checkpoint_to_hf
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    run = RUN["olmo-core"]
    members = [DATA / run.name / run.checkpoint.format(s) for s in run.steps[-2:]]
    out = average_checkpoints(members, tmp_path / "avg", device="cpu")
    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        eos_token="t63", pad_token="t62", model_max_length=16)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = trainer_fixtures().olmo_core_config()
    convert_checkpoint_to_hf(out, tmp_path / "hf", config.as_config_dict(),
                             TokenizerConfig(vocab_size=64, eos_token_id=63, pad_token_id=62).as_config_dict(),
                             tokenizer_id=str(tmp_path / "tokenizer"), max_sequence_length=16, validate=False)
    # (its tiny olmo2_1M config has a head size transformers' Olmo2 does not take: its weights are read)
    converted = load_reference(tmp_path / "hf")
    states = [loaded(run, s) for s in run.steps[-2:]]
    mean = (states[0]["model.embeddings.weight"].double() + states[1]["model.embeddings.weight"].double()) / 2
    assert torch.equal(converted["model.embed_tokens.weight"], mean.float())


def test_eval_of_a_dcp_average_says_how_to_get_a_model_folder(tmp_path):
    r = cli("trajectory", DATA / "olmo-core", "--k", 2, "--nu", 2, "--interval", 2, "--start", 6, "--out",
            tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    r = cli("eval", tmp_path / "out", "--tasks", "lambada_openai", "--results", tmp_path / "r.sqlite")
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr
    assert "a checkpoint in olmo-core's layout, not a Hugging Face model folder" in " ".join(r.stderr.split())
    assert "--output-format safetensors" in r.stderr and not (tmp_path / "r.sqlite").exists()


def test_lightning_loads_the_ckpt_average_into_its_module(tmp_path):
    """The average of Lightning checkpoints is a `.ckpt` that `load_from_checkpoint` takes (run where
    Lightning is installed)."""
    pytest.importorskip("pytorch_lightning")
    run = RUN["lightning"]
    members = [DATA / run.name / run.checkpoint.format(s) for s in run.steps]
    out = average_checkpoints(members, tmp_path / "avg", device="cpu")
    module = trainer_fixtures().lightning_module().load_from_checkpoint(out / "model.ckpt")
    assert_mean(module.state_dict(), [loaded(run, s) for s in run.steps])


def test_a_trainer_s_file_average_can_be_written_as_safetensors(tmp_path):
    run = RUN["nanogpt"]
    members = [DATA / run.name / run.checkpoint.format(s) for s in run.steps]
    out = average_checkpoints(members, tmp_path / "avg", device="cpu", output_format="safetensors")
    assert (out / "model.safetensors").is_file()
    assert_mean(load_reference(out), [loaded(run, s) for s in run.steps])
    with pytest.raises(InputError, match="--output-format torch writes a trainer's own file"):
        average_checkpoints([DATA / "hf-trainer" / "checkpoint-2"] * 2, tmp_path / "avg2", device="cpu",
                            output_format="torch")


def test_a_study_file_takes_trainers_runs_as_local_sources(tmp_path):
    """`[[sources]] local = ...` with two trainers' runs, each found in its own layout, and a grid of LAWA
    and EMA: every output in the trainer's format, each the mean (or EMA) of what torch loads."""
    study = tmp_path / "s.toml"
    study.write_text(f'out = "o"\n[steps]\ninterval = 2\nstart = 6\n'
                     f'[[sources]]\nlocal = "{DATA / "megatron"}"\n[[sources]]\nlocal = "{DATA / "lightning"}"\n'
                     '[[runs]]\nmethod = "lawa"\nk = 2\nnu = 2\n'
                     '[[runs]]\nmethod = "ema"\nk = 3\nnu = 2\nema_alpha = 0.5\n')
    r = cli("study", "run", study, "--root", tmp_path, "-q")
    assert r.exit_code == 0, r.stderr
    for run in (RUN["megatron"], RUN["lightning"]):
        lawa = tmp_path / "o" / run.name / "lawa-k2-nu2" / "step6"
        assert_mean(written(lawa, run), [loaded(run, 4), loaded(run, 6)])
        manifest = json.loads((tmp_path / "o" / run.name / "ema-alpha0.5-k3-nu2" / "step6" / MANIFEST).read_text())
        assert manifest["output"]["format"] == run.output and len(manifest["weights"]) == 3


MEGATRON_LOAD = """
import os, sys, torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[1])
import write
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4], RANK="0", WORLD_SIZE="1", GLOO_SOCKET_IFNAME="lo")
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
from megatron.core import dist_checkpointing, parallel_state
parallel_state.initialize_model_parallel(1, 1)
model = write.megatron_model()
model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, sys.argv[2])["model"])
save_file({k: v.contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}, sys.argv[3])
"""


def test_megatron_core_loads_the_dcp_average_into_its_model(tmp_path):
    """megatron-core's own `dist_checkpointing.load` takes the average (its metadata.json, common.pt and
    `_extra_state` entries come along from the newest input), in a process of its own (it patches torch
    to run on a CPU); run where megatron-core is installed."""
    pytest.importorskip("megatron.core")
    import socket
    import subprocess
    import sys

    run = RUN["megatron"]
    members = [DATA / run.name / run.checkpoint.format(s) for s in run.steps]
    out = average_checkpoints(members, tmp_path / "avg", device="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", MEGATRON_LOAD, str(Path(__file__).parent / "trainers"), str(out),
                        str(tmp_path / "loaded.safetensors"), str(port)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(tmp_path / "loaded.safetensors")
    states = [loaded(run, s) for s in run.steps]
    mean = sum(s["decoder.layers.mlp.linear_fc1.weight"].double() for s in states) / len(states)
    assert torch.equal(got["decoder.layers.1.mlp.linear_fc1.weight"], mean.float()[1])
    assert torch.equal(got["embedding.word_embeddings.weight"],
                       (sum(s["embedding.word_embeddings.weight"].double() for s in states) / 3).float())


def test_a_dcp_output_past_the_shard_size_is_in_several_files_that_torch_loads_as_one(tmp_path):
    """DCP's own layout for the files of several ranks (`__R_0.distcp`), as an average on ranks writes it."""
    run = RUN["megatron"]  # (with its non-tensor entries, after the last file's records)
    members = [DATA / run.name / run.checkpoint.format(s) for s in run.steps[-2:]]
    whole = average_checkpoints(members, tmp_path / "whole", device="cpu")
    split = average_checkpoints(members, tmp_path / "split", device="cpu", shard_bytes=20_000)
    files = sorted(p.name for p in split.glob("*.distcp"))
    assert [p.name for p in whole.glob("*.distcp")] == ["__0_0.distcp"] and len(files) > 2
    assert files == [f"__{i}_0.distcp" for i in range(len(files))]
    want, got = load_reference(whole), load_reference(split)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor) else got[k] == want[k] for k in want)
