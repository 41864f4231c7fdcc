"""Hostile checkpoints, one family each (issue 40): a crafted file is refused with one line and exit 2
(`CorruptCheckpointError` or `UnsafeCheckpointError`), or averaged exactly as torch reads it; never a wrong
output, never a file outside the checkpoint, never a change to torch that outlives the call, never a
runaway. Where torch itself reads a file that ckptavg refuses, the test says what torch does with it."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, cli
from safetensors.torch import save_file

from ckptavg.checkpoints.open import open_checkpoint
from ckptavg.engine.average import average_checkpoints, average_in_memory
from ckptavg.errors import CkptavgError, CorruptCheckpointError, InputError, UnsafeCheckpointError


def clean_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 4, generator=g).half(), "b": torch.randn(4, generator=g).half()}


def saved(obj) -> bytes:
    f = io.BytesIO()
    torch.save(obj, f)
    return f.getvalue()


def members(archive: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def rezip(files: list[tuple[str, bytes]], compress: dict[str, int] | None = None) -> bytes:
    """An archive of `files` in order (a name may repeat), each stored unless `compress` says otherwise."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (zipfile warns of a name written twice)
        for name, data in files:
            z.writestr(zipfile.ZipInfo(name), data, (compress or {}).get(name, zipfile.ZIP_STORED))
    return out.getvalue()


def dcp_save(folder: Path, seed: int = 0) -> Path:
    """A trainer's DCP save: the model, an optimizer moment and non-tensor training state."""
    import torch.distributed.checkpoint as dcp
    from dcpsave import model_state

    sd = {**model_state(seed), "optim.state.model.blocks.0.norm.weight.exp_avg": torch.randn(32),
          "train_state": {"step": seed}}
    dcp.save(sd, checkpoint_id=str(folder), no_dist=True)
    return folder


def with_pickle(archive: bytes, pkl: bytes) -> bytes:
    """`archive` with its `data.pkl` replaced."""
    return rezip([(n, pkl if n.endswith("/data.pkl") else d) for n, d in members(archive).items()])


def checkpoint(folder: Path, data: bytes, name: str = "pytorch_model.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


def torch_attributes() -> dict:
    """What a pickle could have changed for the whole process: the storage types' and DCP classes' attributes."""
    from torch.distributed.checkpoint import metadata

    found = {}
    for owner in (torch, metadata):
        for name in dir(owner):
            value = getattr(owner, name, None)
            if isinstance(value, type) and (name.endswith("Storage") or owner is metadata):
                found[f"{owner.__name__}.{name}"] = {k: repr(v) for k, v in vars(value).items()}
    return found


@pytest.fixture
def clean(tmp_path) -> Path:
    return checkpoint(tmp_path / "clean", saved(clean_state_dict(1)))


def assert_average_is_exact(inputs, loaded=None, out_dtype=torch.float16):
    """The average of `inputs` is the float64 mean of what torch loads of them (or of `loaded`, where torch's
    own loader refuses the crafted pickle that holds them), cast once."""
    got = average_in_memory(inputs)
    loaded = loaded or [torch.load(Path(i) / "pytorch_model.bin", weights_only=True) for i in inputs]
    for name, t in got.items():
        mean = sum(sd[name].double() for sd in loaded) / len(loaded)
        assert torch.equal(t, mean.to(out_dtype)), name


# -- a pickle that reaches for torch's own objects --

PROTO2 = b"\x80\x02"


def state_dict_pickle(archive: bytes) -> bytes:
    """The archive's data.pkl without its PROTO opcode, to follow crafted opcodes."""
    pkl = next(d for n, d in members(archive).items() if n.endswith("/data.pkl"))
    assert pkl[:2] == PROTO2
    return pkl[2:]


def test_build_on_a_storage_type_changes_nothing_and_is_refused(tmp_path, clean):
    """`torch.HalfStorage.dtype = torch.bfloat16` through BUILD's slot state: every later fp16 average in the
    process came out garbage. The crafted file is refused, torch is untouched, and the next average is exact."""
    before = torch_attributes()
    good = saved(clean_state_dict(2))
    attack = (PROTO2 + b"ctorch\nHalfStorage\n" + b"N}X\x05\x00\x00\x00dtypectorch\nbfloat16\ns\x86b0"
              + state_dict_pickle(good))
    bad = checkpoint(tmp_path / "bad", with_pickle(good, attack))
    with pytest.raises(CorruptCheckpointError, match="sets the state of a Name"):
        average_in_memory([bad, clean])
    assert torch.HalfStorage.dtype == torch.float16
    assert torch_attributes() == before
    assert_average_is_exact([checkpoint(tmp_path / "good", good), clean])


def test_build_on_a_dcp_class_is_refused_and_dcp_still_saves(tmp_path):
    """`ChunkStorageMetadata.__getstate__ = ...` through BUILD broke every later DCP read and the caller's own
    dcp.save."""
    folder = dcp_save(tmp_path / "dcp")
    original = (folder / ".metadata").read_bytes()
    attack = (b"\x80\x04ctorch.distributed.checkpoint.metadata\nChunkStorageMetadata\n"
              b"N}X\x0c\x00\x00\x00__getstate__Ns\x86b0" + original[2:])
    (folder / ".metadata").write_bytes(attack)
    before = torch_attributes()
    with pytest.raises(CorruptCheckpointError, match="sets the state of a Name"):
        open_checkpoint(folder)
    assert torch_attributes() == before
    (folder / ".metadata").write_bytes(original)
    assert open_checkpoint(folder).format == "dcp"


def test_a_call_that_allocates_on_the_pickle_s_say_so_is_a_record_never_made(tmp_path, clean):
    """`bytearray(3 * 10**9)` and `torch.FloatStorage(2 * 10**9)` through REDUCE: records, never called. The
    first, beside the weights, is indexed and averaged; torch's own loader (which would call it) is never
    handed the file. The second, where a weight should be, is refused."""
    import resource

    good = saved(clean_state_dict(2))
    body = state_dict_pickle(good)
    extra = b"cbuiltins\nbytearray\n\x8a\x05\x00\x5e\xd0\xb2\x00\x85R"  # bytearray(3_000_000_000)
    # {"junk": bytearray(...)} beside the state dict: a Lightning-like wrapper
    wrapper = (PROTO2 + b"}(X\x0a\x00\x00\x00state_dict" + body[:-1] + b"X\x04\x00\x00\x00junk" + extra + b"u.")
    bad = checkpoint(tmp_path / "bad", with_pickle(good, wrapper))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert set(average_in_memory([bad, clean])) == {"w", "b"}
    from ckptavg.checkpoints.torchsave import load_whole

    with pytest.raises(UnsafeCheckpointError, match="bytearray"):
        load_whole(bad / "pytorch_model.bin")
    storage = (PROTO2 + b"}(X\x01\x00\x00\x00wctorch\nFloatStorage\nJ\x00\x94\x35\x77\x85Ru.")
    worse = checkpoint(tmp_path / "worse", with_pickle(good, storage))
    with pytest.raises(UnsafeCheckpointError, match="torch.FloatStorage"):
        open_checkpoint(worse)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 500_000  # (kB) nothing of 3 GB made


def test_a_memo_index_of_2_to_the_32_costs_nothing(tmp_path, clean):
    """A 247-byte pickle whose LONG_BINPUT 0xFFFFFFFF made the C unpickler allocate a 32 GiB memo."""
    good = saved(clean_state_dict(2))
    attack = PROTO2 + b"}(X\x04\x00\x00\x00junkNr\xff\xff\xff\xffX\x0a\x00\x00\x00state_dict" + \
        state_dict_pickle(good)[:-1] + b"u."  # {"junk": None (memo entry 2**32 - 1), "state_dict": ...}
    bad = checkpoint(tmp_path / "bad", with_pickle(good, attack))
    loaded = torch.load(bad / "pytorch_model.bin", weights_only=True)  # (torch reads it too)
    assert_average_is_exact([bad, clean], [loaded["state_dict"], clean_state_dict(1)])


def test_tuples_nested_past_what_hashing_survives_are_refused(tmp_path):
    """A dict key of tuples nested 100,000 deep crashed the interpreter when hashed."""
    good = saved(clean_state_dict(2))
    attack = PROTO2 + b"}(X\x04\x00\x00\x00junk}" + b")" + b"\x85" * 100_000 + b"NsX\x0a\x00\x00\x00state_dict" + \
        state_dict_pickle(good)[:-1] + b"u."
    bad = checkpoint(tmp_path / "bad", with_pickle(good, attack))
    with pytest.raises(CorruptCheckpointError, match="nests tuples deeper"):
        open_checkpoint(bad)


# -- the zip --

def test_two_members_of_one_name_are_refused_though_torch_reads_one_of_them(tmp_path, clean):
    good = saved(clean_state_dict(2))
    files = list(members(good).items())
    storage = next(n for n, _ in files if n.endswith("/data/0"))
    other = saved({k: v + 1 for k, v in clean_state_dict(2).items()})
    twin = rezip([*files, (storage, members(other)[storage])])
    bad = checkpoint(tmp_path / "bad", twin)
    loaded = torch.load(bad / "pytorch_model.bin", weights_only=True)  # torch takes one, silently
    assert any(torch.equal(loaded["w"], sd["w"]) for sd in (clean_state_dict(2), torch.load(io.BytesIO(other))))
    with pytest.raises(CorruptCheckpointError, match="two members named"):
        open_checkpoint(bad)


def test_a_compressed_or_encrypted_member_is_refused(tmp_path):
    good = saved(clean_state_dict(2))
    files = members(good)
    storage = next(n for n in files if n.endswith("/data/0"))
    deflated = checkpoint(tmp_path / "deflated", rezip(list(files.items()), {storage: zipfile.ZIP_DEFLATED}))
    with pytest.raises(CorruptCheckpointError, match="is compressed"):
        open_checkpoint(deflated)
    bomb = rezip(list(files.items()), {next(n for n in files if n.endswith("data.pkl")): zipfile.ZIP_BZIP2})
    with pytest.raises(CorruptCheckpointError, match="is compressed"):
        open_checkpoint(checkpoint(tmp_path / "bz2", bomb))
    raw = bytearray(good)  # the encryption flag set on every member, local and central
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        at = raw.find(sig)
        while at >= 0:
            flag_at = at + (6 if sig == b"PK\x03\x04" else 8)
            raw[flag_at] |= 1
            at = raw.find(sig, at + 4)
    with pytest.raises(CkptavgError, match="encrypted"):
        open_checkpoint(checkpoint(tmp_path / "encrypted", bytes(raw)))


def test_a_big_endian_archive_is_refused_though_torch_swaps_it(tmp_path):
    sd = clean_state_dict(2)
    files = members(saved(sd))
    swapped = []
    for name, data in files.items():
        if name.endswith("/byteorder"):
            data = b"big"
        elif "/data/" in name and not name.endswith("serialization_id"):
            data = bytes(b for i in range(0, len(data), 2) for b in (data[i + 1], data[i]))
        swapped.append((name, data))
    bad = checkpoint(tmp_path / "big", rezip(swapped))
    loaded = torch.load(bad / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)  # torch reads it, swapping every element
    with pytest.raises(CorruptCheckpointError, match="big-endian"):
        open_checkpoint(bad)


def test_negative_dimensions_whose_product_looks_right_are_refused(tmp_path):
    sd = {"w": torch.ones(2, 3)}
    header = {"w": {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}}
    raw = json.dumps(header).encode()
    folder = tmp_path / "neg"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(24))
    with pytest.raises(CorruptCheckpointError, match="bad header entry"):
        open_checkpoint(folder)
    good = saved(sd)
    pkl = state_dict_pickle(good).replace(b"K\x02K\x03\x86", b"J\xfe\xff\xff\xffJ\xfd\xff\xff\xff\x86")
    with pytest.raises(CorruptCheckpointError, match="not a tuple of non-negative integers"):
        open_checkpoint(checkpoint(tmp_path / "negbin", with_pickle(good, PROTO2 + pkl)))


def test_a_storage_record_whose_size_disagrees_with_its_elements_is_refused(tmp_path):
    good = saved({"w": torch.ones(4)})
    files = members(good)
    storage = next(n for n in files if n.endswith("/data/0"))
    short = checkpoint(tmp_path / "short", rezip([(n, d + b"\0" * 8 if n == storage else d)
                                                  for n, d in files.items()]))
    with pytest.raises(CorruptCheckpointError, match="storage holds 24 bytes"):
        open_checkpoint(short)


# -- nothing outside the checkpoint --

def dcp_with_entry(folder: Path, fqn: str, relative_path: str, chunk: bool = False) -> None:
    """A DCP save with one more entry (allow-listed classes only) whose record is `relative_path`."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    dcp_save(folder)
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # (the test's own file)
    if chunk:
        key = next(k for k in metadata.storage_data if k.offset is not None and not k.fqn.startswith("optim"))
        info = metadata.storage_data[key]
        metadata.storage_data[key] = _StorageInfo(relative_path, info.offset, info.length)
    else:
        metadata.state_dict_metadata[fqn] = BytesStorageMetadata()
        metadata.storage_data[MetadataIndex(fqn)] = _StorageInfo(relative_path, 0, 32)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.distcp", "sub/../../x"])
def test_a_dcp_entry_that_points_outside_its_folder_is_refused_before_anything_is_written(tmp_path, path):
    """A `.metadata` of allow-listed classes only, whose BytesStorageMetadata's relative_path is /etc/passwd:
    that file was copied into the output."""
    (tmp_path / "outside.distcp").write_bytes(b"secret" * 10)
    folder = tmp_path / "ckpt"
    dcp_with_entry(folder, "model.secret", path)
    out = tmp_path / "avg"
    assert_user_error(cli("average", folder, folder, "--out", out), "outside the checkpoint", path, out=out)
    chunked = tmp_path / "chunked"
    dcp_with_entry(chunked, "", path, chunk=True)
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint"):
        open_checkpoint(chunked)


def test_a_side_file_linked_from_outside_is_refused_before_anything_is_written(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "hunter2"}')
    folders = []
    for i in range(2):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        save_file(clean_state_dict(i), folder / "model.safetensors")
        folders.append(folder)
    os.symlink(secret, folders[1] / "config.json")
    out = tmp_path / "avg"
    assert_user_error(cli("average", *folders, "--out", out), "config.json is a link", "outside", out=out)


def test_a_weight_index_naming_files_outside_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file(clean_state_dict(0), elsewhere / "model.safetensors")
    folder = tmp_path / "m"
    folder.mkdir()
    for target in ("../elsewhere/model.safetensors", str(elsewhere / "model.safetensors")):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target, "b": target}}))
        with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint"):
            open_checkpoint(folder)
    os.symlink(elsewhere / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(UnsafeCheckpointError, match="is a link to"):
        open_checkpoint(folder)


def test_hugging_face_cache_snapshots_link_into_their_own_blobs(tmp_path):
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    save_file(clean_state_dict(0), repo / "blobs" / "abc123")
    snapshot = repo / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    os.symlink("../../blobs/abc123", snapshot / "model.safetensors")
    assert set(open_checkpoint(snapshot).tensors) == {"w", "b"}


# -- a few bytes that asked for the machine --

def test_a_rank_metadata_name_of_a_trillion_is_not_counted_to(tmp_path):
    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / "__1000000000000.metadata").write_bytes(b"")
    (folder / "__0.metadata").write_bytes(b"")
    with pytest.raises(CkptavgError):
        open_checkpoint(folder)


def test_a_chunk_of_a_billion_rows_is_checked_against_its_record_before_its_runs_are_made(tmp_path):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

    folder = dcp_save(tmp_path / "dcp")
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    fqn, entry = next((k, v) for k, v in metadata.state_dict_metadata.items()
                      if isinstance(v, TensorStorageMetadata) and len(v.size) == 2 and not k.startswith("optim"))
    chunk = entry.chunks[0]
    entry.size = torch.Size([10**9, 2])
    entry.chunks[0] = ChunkStorageMetadata(chunk.offsets, torch.Size([10**9, 1]))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CorruptCheckpointError, match="the metadata says"):
        open_checkpoint(folder)


# -- what used to be tracebacks --

def test_a_zero_element_float_tensor_is_averaged_like_any(tmp_path):
    folders = []
    for i in range(2):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        save_file({**clean_state_dict(i), "empty": torch.zeros(0, 4, dtype=torch.float16)},
                  folder / "model.safetensors")
        folders.append(folder)
    out = average_checkpoints(folders, tmp_path / "avg")
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    assert got["empty"].shape == (0, 4) and got["empty"].dtype == torch.float16
    mean = (clean_state_dict(0)["w"].double() + clean_state_dict(1)["w"].double()) / 2
    assert torch.equal(got["w"], mean.half())


@pytest.mark.parametrize("header", [
    b"[" * 100_000 + b"]" * 100_000,  # nesting
    b'{"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}',  # an infinite size
    b'{"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}',  # a float size
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], '
    b'"data_offsets": [0, 4]}}',  # a key twice
    b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
    b'{"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}',
])
def test_a_malformed_safetensors_header_is_one_line(tmp_path, header):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    out = tmp_path / "avg"
    assert_user_error(cli("average", folder, folder, "--out", out), "model.safetensors", out=out)


@pytest.mark.parametrize("index", [
    '{"weight_map": {"w": 3}}', '{"weight_map": {"w": ["a"]}}', '{"weight_map": [1]}',
    '{"weight_map": {"w": "model-1.safetensors", "w": "model-2.safetensors"}}', "[" * 50_000,
])
def test_a_malformed_weight_index_is_one_line(tmp_path, index):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(index)
    out = tmp_path / "avg"
    assert_user_error(cli("average", folder, folder, "--out", out), "index", out=out)


def test_an_opcode_torch_s_loader_does_not_read_is_refused(tmp_path):
    good = saved(clean_state_dict(2))
    popped = checkpoint(tmp_path / "pop", with_pickle(good, PROTO2 + b"N0" + state_dict_pickle(good)))
    with pytest.raises(pickle.UnpicklingError, match="Unsupported operand 48"):
        torch.load(popped / "pytorch_model.bin", weights_only=True)
    with pytest.raises(CorruptCheckpointError, match="uses POP, which this format does not read"):
        open_checkpoint(popped)


def test_unknown_codecs_and_layouts_are_records_never_looked_up(tmp_path, clean):
    good = saved(clean_state_dict(2))
    body = state_dict_pickle(good)
    junk = (b"c_codecs\nencode\nX\x01\x00\x00\x00aX\x07\x00\x00\x00nocodec\x86R"
            b"ctorch.serialization\n_get_layout\nX\x03\x00\x00\x00bad\x85R\x86")
    wrapper = PROTO2 + b"}(X\x0a\x00\x00\x00state_dict" + body[:-1] + b"X\x04\x00\x00\x00junk" + junk + b"u."
    bad = checkpoint(tmp_path / "bad", with_pickle(good, wrapper))
    assert set(open_checkpoint(bad).tensors) == {"w", "b"}


def test_an_unknown_zip_compression_is_one_line(tmp_path):
    raw = bytearray(saved(clean_state_dict(2)))
    for sig, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        i = raw.find(sig)
        while i >= 0:
            raw[i + at:i + at + 2] = struct.pack("<H", 99)
            i = raw.find(sig, i + 4)
    folder = checkpoint(tmp_path / "odd", bytes(raw))
    out = tmp_path / "avg"
    assert_user_error(cli("average", folder, folder, "--out", out), "pytorch_model.bin", out=out)


def test_a_dcp_metadata_that_is_a_folder_is_a_corrupt_checkpoint(tmp_path):
    folder = tmp_path / "dcp"
    (folder / ".metadata").mkdir(parents=True)
    with pytest.raises((CorruptCheckpointError, InputError)):
        open_checkpoint(folder)


def _no_version(files: dict[str, bytes]) -> bytes:
    return rezip([(n, d) for n, d in files.items() if not n.endswith("/version")])


def _several_disks(files: dict[str, bytes]) -> bytes:
    raw = bytearray(rezip(list(files.items())))
    at = raw.rfind(b"PK\x05\x06")
    raw[at + 4:at + 6] = b"\x01\x00"  # the number of this disk
    return bytes(raw)


def _prepended(files: dict[str, bytes]) -> bytes:
    return b"\0" * 64 + rezip(list(files.items()))  # (zipfile shifts every offset past them)


def _marked_as_folder(files: dict[str, bytes]) -> bytes:
    raw = bytearray(rezip(list(files.items())))
    at = next(i for i in range(len(raw)) if raw.startswith(b"PK\x01\x02", i) and raw[i + 46:].startswith(
        next(n for n in files if n.endswith("/data/0")).encode()))
    raw[at + 38] = 0x10  # external attributes: a DOS folder
    return bytes(raw)


def _miscounted(files: dict[str, bytes]) -> bytes:
    raw = bytearray(rezip(list(files.items())))
    at = raw.rfind(b"PK\x05\x06")
    raw[at + 8:at + 12] = b"\x00\x00\x00\x00"  # no members, on this disk and in all
    return bytes(raw)


def _masked(files: dict[str, bytes]) -> bytes:
    raw = bytearray(rezip(list(files.items())))
    at = raw.find(b"PK\x01\x02")
    raw[at + 9] |= 0x20  # flag 0x2000: the local header's values masked
    return bytes(raw)


@pytest.mark.parametrize("craft", [_no_version, _several_disks, _prepended, _marked_as_folder, _miscounted,
                                   _masked])
def test_a_zip_torch_does_not_read_as_zipfile_does_is_refused(tmp_path, craft):
    """Found by the fuzz suite: zips that Python's zipfile reads one way and torch's reader refuses or reads
    another way (a member marked as a folder: torch gives other bytes for it)."""
    sd = clean_state_dict(2)
    bad = checkpoint(tmp_path / "bad", craft(members(saved(sd))))
    try:
        loaded = torch.load(bad / "pytorch_model.bin", weights_only=True)
        assert not all(torch.equal(loaded[k], sd[k]) for k in sd)
    except (RuntimeError, pickle.UnpicklingError):
        pass  # (torch refuses it)
    with pytest.raises((CorruptCheckpointError, UnsafeCheckpointError)):
        open_checkpoint(bad)


def test_hyper_parameters_nested_too_deep_to_save_again_are_one_line(tmp_path):
    """A Lightning checkpoint whose hyper-parameters torch loads but pickle cannot write back (3,000 deep):
    a traceback (RecursionError) where the output is the trainer's own file."""
    deep: dict = {}
    level = deep
    for _ in range(3000):
        level["x"] = {}
        level = level["x"]
    sd = {"w": torch.ones(2)}
    for step, hparams in ((2, {"lr": 0.1}), (4, deep)):
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(20_000)  # (the test's own pickler writes it)
        try:
            torch.save({"state_dict": sd, "pytorch-lightning_version": "2.6.6", "hyper_parameters": hparams,
                        "global_step": step}, tmp_path / f"epoch=0-step={step}.ckpt")
        finally:
            sys.setrecursionlimit(limit)
    out = tmp_path / "avg"
    assert_user_error(cli("average", tmp_path / "epoch=0-step=2.ckpt", tmp_path / "epoch=0-step=4.ckpt", "--out",
                          out), "nest too deep", "--output-format safetensors", out=out)
    out = average_checkpoints([tmp_path / "epoch=0-step=2.ckpt", tmp_path / "epoch=0-step=4.ckpt"], tmp_path / "st",
                              output_format="safetensors")
    assert (out / "model.safetensors").is_file()
