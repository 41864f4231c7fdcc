"""The averaging engine against a plain load-everything-and-average reference."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_matches, load_reference, pythia_state_dict, reference_average, write_checkpoint
from safetensors import safe_open

from ckptavg.engine.average import average_checkpoints
from ckptavg.manifest import MANIFEST

FORMATS = ["safetensors", "safetensors-sharded", "bin", "bin-sharded"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_input_format_matches_reference(ckpts, tmp_path, fmt):
    inputs = ckpts("float16", fmt)
    out = average_checkpoints(inputs, tmp_path / "avg", device="cpu")
    assert_matches(out, reference_average(inputs), max_ulp=1)
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("weights", [None, [0.2, 0.3, 0.5]])
def test_float32_inputs_are_summed_in_float64_by_default_and_match_bit_for_bit(ckpts, tmp_path, weights):
    """Trainers save float32: by default their average is the float64 mean (or weighted sum) cast once."""
    inputs = ckpts("float32", "safetensors")
    for name, asked in (("default", None), ("asked", torch.float64)):
        out = average_checkpoints(inputs, tmp_path / name, weights=weights, accumulate=asked, device="cpu")
        assert_matches(out, reference_average(inputs, weights), max_ulp=0, accumulate=torch.float64)
        assert json.loads((out / MANIFEST).read_text())["dtype_policy"]["accumulate"] == "float64"


def test_each_tensor_is_summed_in_the_dtype_its_inputs_need(tmp_path):
    """A model with float32 norms beside float16 weights: the norms in float64, the rest in float32, each
    the float64 mean cast once; the manifest says which dtype took which inputs."""
    inputs = []
    for i in range(3):
        sd = pythia_state_dict(i, torch.float16)
        sd = {k: v.float() if "layernorm" in k else v for k, v in sd.items()}
        inputs.append(write_checkpoint(tmp_path / f"step{i}", sd, "safetensors"))
    assert {v.dtype for v in load_reference(inputs[0]).values()} >= {torch.float16, torch.float32}
    out = average_checkpoints(inputs, tmp_path / "avg", device="cpu")
    assert_matches(out, reference_average(inputs), max_ulp=0, accumulate=torch.float64)
    assert json.loads((out / MANIFEST).read_text())["dtype_policy"]["accumulate"] == \
        "float32 for float16 inputs, float64 for float32 inputs"


def test_bfloat16_within_one_ulp(ckpts, tmp_path):
    inputs = ckpts("bfloat16", "bin")
    out = average_checkpoints(inputs, tmp_path / "avg", device="cpu")
    assert_matches(out, reference_average(inputs), max_ulp=1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_uniform_mean_of_16_bit_inputs_is_correctly_rounded(ckpts, tmp_path, dtype):
    """A plain mean (sum in float64, divide by k, cast once) is matched bit for bit, not within 1 ULP."""
    inputs = ckpts(dtype, "safetensors")
    got = load_reference(average_checkpoints(inputs, tmp_path / "avg", device="cpu"))
    ref, _ = reference_average(inputs)
    assert all(torch.equal(got[name], r) for name, r in ref.items())


def test_mixed_formats_and_explicit_weights(ckpts, tmp_path):
    inputs = [ckpts("float16", "bin")[0], ckpts("float16", "safetensors-sharded")[1],
              ckpts("float16", "safetensors")[2]]
    weights = [0.5, 0.3, 0.2]
    out = average_checkpoints(inputs, tmp_path / "avg", weights=weights, device="cpu")
    assert_matches(out, reference_average(inputs, weights), max_ulp=1)


def test_output_dtype_cast_once(ckpts, tmp_path):
    inputs = ckpts("float16", "safetensors")
    out = average_checkpoints(inputs, tmp_path / "avg", out_dtype=torch.float32, device="cpu")
    ref = reference_average(inputs, out_dtype=torch.float32)
    # float32 accumulation of float16 inputs: a few float32 ulps from the float64 sum at most
    assert_matches(out, ref, max_ulp=4)
    assert load_reference(out)["embed_out.weight"].dtype == torch.float32


def test_tiny_pieces_split_tensors_without_changing_results(ckpts, tmp_path):
    inputs = ckpts("float32", "safetensors")
    out = average_checkpoints(inputs, tmp_path / "avg", accumulate=torch.float64, device="cpu",
                              piece_elements=100)
    assert_matches(out, reference_average(inputs), max_ulp=0, accumulate=torch.float64)


def test_sharded_output_with_index(ckpts, tmp_path):
    inputs = ckpts("float16", "safetensors")
    out = average_checkpoints(inputs, tmp_path / "avg", shard_bytes=4000, device="cpu")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    for shard in shards:  # every shard is a valid safetensors file on its own
        with safe_open(out / shard, "pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in load_reference(out).values())
    assert_matches(out, reference_average(inputs), max_ulp=1)


def test_non_float_and_buffers_copied_from_newest_and_recorded(ckpts, tmp_path):
    inputs = ckpts("float16", "bin")
    out = average_checkpoints(inputs, tmp_path / "avg", device="cpu")
    got, newest = load_reference(out), load_reference(inputs[-1])
    for name in ("gpt_neox.step_counter", "gpt_neox.layers.0.attention.bias",
                 "gpt_neox.layers.1.attention.masked_bias", "gpt_neox.layers.0.attention.rotary_emb.inv_freq"):
        assert torch.equal(got[name], newest[name]), name
    manifest = json.loads((out / MANIFEST).read_text())
    copied = manifest["copied_tensors"]
    assert "gpt_neox.step_counter" in copied and "int64" in copied["gpt_neox.step_counter"]
    assert "gpt_neox.layers.0.attention.bias" in copied
    assert "embed_out.weight" not in copied


def test_manifest_records_inputs_hashes_weights_versions(ckpts, tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    inputs = ckpts("float16", "safetensors-sharded")
    out = average_checkpoints(inputs, tmp_path / "avg", weights=[0.2, 0.3, 0.5], device="cpu")
    m = json.loads((out / MANIFEST).read_text())
    assert m["weights"] == [0.2, 0.3, 0.5]
    assert [i["path"] for i in m["inputs"]] == [str(p.absolute()) for p in inputs]
    first = m["inputs"][0]["files"][0]
    path = inputs[0] / first["name"]
    assert first["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first["size"] == path.stat().st_size
    assert m["dtype_policy"]["accumulate"] == "float32"
    assert {"ckptavg", "torch", "safetensors"} <= set(m["versions"])
    # the second run finds the hashes in the cache
    out2 = average_checkpoints(inputs, tmp_path / "avg2", weights=[0.2, 0.3, 0.5], device="cpu")
    m2 = json.loads((out2 / MANIFEST).read_text())
    assert m2["inputs"][0]["files"][0]["sha256_source"] == "cache"
    assert m2["inputs"][0]["files"][0]["sha256"] == first["sha256"]


def test_output_loads_in_transformers(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    inputs = ckpts("float16", "bin-sharded")
    out = average_checkpoints(inputs, tmp_path / "avg", out_dtype=torch.float32, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(out)
    written = load_reference(out)
    assert torch.equal(model.lm_head.weight.detach(), written["embed_out.weight"])
    assert torch.equal(model.gpt_neox.embed_in.weight.detach(), written["gpt_neox.embed_in.weight"])
    assert_matches(out, reference_average(inputs, out_dtype=torch.float32), max_ulp=4)
    logits = model(torch.arange(10).unsqueeze(0)).logits
    assert logits.shape == (1, 10, 128) and torch.isfinite(logits).all()


def test_same_dtype_family_mix_is_allowed(tmp_path):
    a = write_checkpoint(tmp_path / "a", pythia_state_dict(1, torch.bfloat16), "safetensors")
    b = write_checkpoint(tmp_path / "b", pythia_state_dict(2, torch.float16), "safetensors")
    out = average_checkpoints([a, b], tmp_path / "avg", device="cpu")
    # auto dtype: the newest input's (float16)
    assert_matches(out, reference_average([a, b]), max_ulp=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference(ckpts, tmp_path):
    inputs = ckpts("float32", "safetensors")
    out = average_checkpoints(inputs, tmp_path / "avg", accumulate=torch.float64, device="cuda")
    assert_matches(out, reference_average(inputs), max_ulp=0, accumulate=torch.float64)
    inputs16 = ckpts("float16", "bin")
    out16 = average_checkpoints(inputs16, tmp_path / "avg16", device="cuda")
    assert_matches(out16, reference_average(inputs16), max_ulp=1)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2]])
def test_cuda_in_memory_and_into_device_tensors_equal_the_cpu_output(ckpts, tmp_path, weights):
    """The scoring paths on a GPU (an in-memory average, and one streamed into tensors on the device, as a
    resident model's parameters are) hold exactly the bytes the CPU writes: each add, multiply, divide
    and cast is correctly rounded on both, and the engine never fuses them."""
    from ckptavg.engine.average import average_in_memory, average_into, plan_in_memory

    folders = ckpts("float16", "safetensors")
    cpu = load_reference(average_checkpoints(folders, tmp_path / "cpu", weights=weights, device="cpu"))
    in_memory = average_in_memory(folders, weights=weights, device="cuda", piece_elements=100)
    destinations = {name: torch.empty(t.shape, dtype=t.dtype, device="cuda") for name, t in cpu.items()}
    average_into(plan_in_memory(folders, weights=weights), destinations, device="cuda", piece_elements=100)
    assert in_memory.keys() == cpu.keys() == destinations.keys()
    for name, t in cpu.items():
        assert torch.equal(in_memory[name], t), name
        assert destinations[name].is_cuda and torch.equal(destinations[name].cpu(), t), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_into_device_tensors_waits_for_its_input_copies(ckpts, tmp_path):
    """Averaged into tensors on the device, the result never comes back to the host, so nothing waits for
    the queued copies out of the input buffers: with the GPU busy (a queue of matrix products ahead of
    them) a reader that refilled those buffers at once would have them copy the next piece's bytes."""
    from ckptavg.engine.average import average_into, plan_in_memory

    folders = ckpts("float16", "safetensors")
    cpu = load_reference(average_checkpoints(folders, tmp_path / "cpu", device="cpu"))
    destinations = {name: torch.empty(t.shape, dtype=t.dtype, device="cuda") for name, t in cpu.items()}
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(200):  # work queued on the device ahead of the average
        busy = busy @ busy / 4096
    average_into(plan_in_memory(folders), destinations, device="cuda", piece_elements=1000)
    for name, t in cpu.items():
        assert torch.equal(destinations[name].cpu(), t), name


def test_hub_cache_files_take_their_sha256_from_the_blob_name(ckpts, tmp_path, monkeypatch):
    """In the Hugging Face cache a snapshot file links to blobs/<sha256>: no need to hash it again."""
    import hashlib
    import shutil

    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    src = ckpts("float16", "safetensors", n=2)
    repo = tmp_path / "models--org--tiny"
    inputs = []
    for i, folder in enumerate(src):
        data = (folder / "model.safetensors").read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        snap = repo / "snapshots" / f"commit{i}"
        snap.mkdir(parents=True)
        (snap / "model.safetensors").symlink_to(blob)
        shutil.copy(folder / "config.json", snap / "config.json")
        inputs.append(snap)
    out = average_checkpoints(inputs, tmp_path / "avg", device="cpu")
    files = [i["files"][0] for i in json.loads((out / MANIFEST).read_text())["inputs"]]
    assert [f["sha256_source"] for f in files] == ["hub-blob", "hub-blob"]
    assert [f["sha256"] for f in files] == [hashlib.sha256((s / "model.safetensors").read_bytes()).hexdigest()
                                            for s in src]
    assert not (tmp_path / "cache").exists()  # nothing was hashed


def test_parse_size():
    from ckptavg.units import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("1024") == 1024
    for bad in ("", "5XB", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_in_memory_average_equals_the_written_one(ckpts, tmp_path):
    from ckptavg.engine.average import average_in_memory

    folders = ckpts("bfloat16", "bin-sharded")
    written = load_reference(average_checkpoints(folders, tmp_path / "out", weights=[0.5, 0.3, 0.2]))
    in_memory = average_in_memory(folders, weights=[0.5, 0.3, 0.2], piece_elements=100)
    assert in_memory.keys() == written.keys()
    for name, t in written.items():
        assert in_memory[name].dtype == t.dtype and torch.equal(in_memory[name], t), name


@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2]])
def test_arithmetic_threads_change_no_bit(ckpts, tmp_path, monkeypatch, weights):
    """Slices of a piece averaged on several threads (as on a many-core machine, here forced with tiny
    chunks) give exactly the single-threaded output, and the reference's."""
    from ckptavg.engine import pipeline

    inputs = ckpts("float16", "safetensors")
    one = average_checkpoints(inputs, tmp_path / "one", weights=weights, device="cpu")
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 256)
    monkeypatch.setattr(pipeline, "available_cores", lambda: 8)
    many = average_checkpoints(inputs, tmp_path / "many", weights=weights, device="cpu")
    got, ref = load_reference(many), load_reference(one)
    assert all(torch.equal(got[name], t) for name, t in ref.items())
    assert_matches(many, reference_average(inputs, weights), max_ulp=0 if weights is None else 1)


def test_an_average_leaves_the_callers_and_new_threads_torch_thread_count_alone(ckpts, tmp_path):
    """The engine runs torch on one thread per stage thread, but a library caller (a resident model
    scoring in another thread) keeps its own thread count: during the average, a thread that starts
    gets the process's count, and the caller's is the same before and after."""
    import threading

    inputs = ckpts("float16", "safetensors")
    previous = torch.get_num_threads()
    torch.set_num_threads(3)  # not 1 whatever the machine, so that a count forced to 1 shows
    seen: list[int] = []

    def progress(n: int) -> None:  # called mid-average, from the engine's writer thread
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()

    try:
        out = average_checkpoints(inputs, tmp_path / "avg", device="cpu", piece_elements=1024,
                                  progress=lambda plan: progress)
        assert seen and set(seen) == {3} and torch.get_num_threads() == 3
        assert_matches(out, reference_average(inputs), max_ulp=1)
    finally:
        torch.set_num_threads(previous)
