"""minparcae.torchfile reads what PyTorch and the safetensors library write, value for value, and
runs nothing a file asks for beyond rebuilding tensors. torch is only the writer here (and the
oracle for bfloat16 rounding); the tests skip where it is missing."""

import json
import pickle
import struct
import zipfile

import numpy as np
import pytest

from minparcae import torchfile
from minparcae.torchfile import WeightsError

torch = pytest.importorskip("torch")

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def expected(t):
    """What the reader must return for tensor t: its values, bfloat16 as float32."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def assert_same(weights, tensors):
    assert sorted(weights) == sorted(tensors)
    for name, t in tensors.items():
        want = expected(t)
        assert weights[name].dtype == want.dtype and weights[name].shape == want.shape, name
        np.testing.assert_array_equal(weights[name], want, err_msg=name)
        assert weights[name].flags.c_contiguous and weights[name].flags.writeable
        assert weights.stored_dtypes[name] == str(t.dtype).removeprefix("torch.")


def views(dtype):
    """Tensors of every rank, and views that share storage the way saved models do."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g).to(dtype)
    cube = torch.randn(2, 3, 5, generator=g).to(dtype)
    return {
        "scalar": torch.tensor(-2.75, dtype=dtype),
        "vector": torch.randn(7, generator=g).to(dtype),
        "w": w,
        "w.T": w.t(),  # shares w's storage, strides (1, 4): not contiguous
        "tied": w,  # a second name for the same tensor (an embedding tied to the output layer)
        "row": w[3],  # storage offset 12
        "every_other_column": w[1:, ::2],  # offset 4, strides (4, 2)
        "cube": cube,
        "cube.permuted": cube.permute(2, 0, 1),
        "empty": torch.zeros(0, 3, dtype=dtype),
    }


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_save_round_trips_every_rank_and_view(tmp_path, dtype):
    tensors = views(TORCH_DTYPES[dtype])
    torch.save(tensors, tmp_path / "w.pt")
    weights = torchfile.load_torch(tmp_path / "w.pt")
    assert_same(weights, tensors)
    assert weights.metadata == {}
    if dtype == "bfloat16":
        assert weights["w"].dtype == np.float32


def test_module_state_dict_parameters_and_buffers(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11),
                                torch.nn.BatchNorm1d(11))  # running stats and an int64 counter
    model[1].weight = model[0].weight  # tied input and output embeddings
    sd = model.state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    weights = torchfile.load_weights(tmp_path / "pytorch_model.bin")
    assert_same(weights, sd)
    assert list(weights) == list(sd)  # in the state dict's order

    params = {"gain": torch.nn.Parameter(torch.rand(5)),
              "mask": torch.tensor([True, False, True])}
    torch.save(params, tmp_path / "params.pth")
    assert_same(torchfile.load_weights(tmp_path / "params.pth"), params)


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_a_training_checkpoint_gives_its_model_and_plain_entries(tmp_path, key):
    model = torch.nn.Linear(3, 2)
    optimizer = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2, 3)}},
                 "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}  # as AdamW.state_dict()
    torch.save({key: model.state_dict(), "optimizer": optimizer, "step": 3,
                "config": {"d": 3, "lr": 1e-3, "name": "tiny", "sizes": (2, 3), "layers": [1]}},
               tmp_path / "ckpt.pt")
    weights = torchfile.load_torch(tmp_path / "ckpt.pt")
    assert_same(weights, model.state_dict())
    assert weights.metadata == {"step": 3, "config": {"d": 3, "lr": 1e-3, "name": "tiny",
                                                      "sizes": (2, 3), "layers": [1]}}


def test_big_endian_storages(tmp_path):
    """A file from a big-endian machine says so in <name>/byteorder; its values read the same."""
    tensors = {"w": torch.randn(3, 4), "h": torch.randn(5).half(), "b": torch.randn(2).bfloat16()}
    torch.save(tensors, tmp_path / "little.pt")
    with zipfile.ZipFile(tmp_path / "little.pt") as src, \
            zipfile.ZipFile(tmp_path / "big.pt", "w") as dst:
        sizes = {"0": 4, "1": 2, "2": 2}  # storage key -> item size, in the order torch saved them
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                item = sizes[name.rsplit("/", 1)[1]]
                data = np.frombuffer(data, f"<u{item}").astype(f">u{item}").tobytes()
            dst.writestr(name, data)
    assert_same(torchfile.load_torch(tmp_path / "big.pt"), tensors)


# --- what must be refused ---------------------------------------------------------------------

def unicode(text):
    """A pickle BINUNICODE op pushing `text`."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def call_pickle(module, name, arg):
    """A pickle that calls module.name(arg): GLOBAL (protocol 2) or STACK_GLOBAL (protocol 4)."""
    if module.startswith("4:"):
        func = b"\x80\x04" + unicode(module[2:]) + unicode(name) + b"\x93"
    else:
        func = b"\x80\x02c" + f"{module}\n{name}\n".encode()
    return func + unicode(arg) + b"\x85R."  # TUPLE1, REDUCE, STOP


def torch_zip(path, pickled):
    """A zip laid out as torch.save lays one out, holding the pickle `pickled`."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("module, name, code", [
    ("os", "system", "touch {marker}"),
    ("posix", "system", "touch {marker}"),
    ("4:os", "system", "touch {marker}"),
    ("builtins", "eval", "open({marker!r}, 'w').close()"),
    ("builtins", "exec", "open({marker!r}, 'w').close()"),
    ("subprocess", "getoutput", "touch {marker}"),
])
def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path, module, name, code):
    marker = tmp_path / "marker"
    pickled = call_pickle(module, name, code.format(marker=str(marker)))
    pickle.loads(pickled)  # the payload is live: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()

    shown = f"{module.removeprefix('4:')}.{name}"
    as_value = b"\x80\x02}" + unicode("w") + pickled[2:-1] + b"s."  # {"w": <the call>}
    for wrapped in (pickled, as_value):
        with pytest.raises(WeightsError, match=f"asks for {shown}, .* nothing ran"):
            torchfile.load_torch(torch_zip(tmp_path / "evil.pt", wrapped))
        assert not marker.exists()


def test_torch_objects_beyond_a_state_dict_are_refused(tmp_path):
    """A whole module, or a tensor carrying Python attributes, needs more than a dict of tensors."""
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(WeightsError, match=r"torch\.nn\.modules\.linear\.Linear"):
        torchfile.load_torch(tmp_path / "module.pt")
    t = torch.ones(2)
    t.note = "extra"
    torch.save({"t": t}, tmp_path / "attr.pt")
    with pytest.raises(WeightsError, match=r"torch\._tensor\._rebuild_from_type_v2"):
        torchfile.load_torch(tmp_path / "attr.pt")
    pid = b"\x80\x02" + unicode("os") + b"\x85Q."  # a persistent id of another kind: ("os",)
    with pytest.raises(WeightsError, match="not a storage"):
        torchfile.load_torch(torch_zip(tmp_path / "pid.pt", pid))


def test_damaged_missing_and_foreign_files(tmp_path):
    tensors = {"w": torch.randn(64, 64)}
    torch.save(tensors, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"not weights at all")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"step": 3}, tmp_path / "no_tensors.pt")
    with zipfile.ZipFile(tmp_path / "w.pt") as src, \
            zipfile.ZipFile(tmp_path / "short_storage.pt", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name)[:100] if name.endswith("/data/0") else src.read(name))
    messages = {
        "missing.pt": "no weights file at",
        "cut.pt": "truncated or damaged zip",
        "empty.pt": "neither a torch.save file nor a safetensors file",
        "text.pt": "neither a torch.save file nor a safetensors file",
        "other.zip": "not one torch.save wrote",
        "legacy.pt": "legacy format .* save it again with a recent PyTorch or as safetensors",
        "no_tensors.pt": "holds no tensors",
        "short_storage.pt": "holds 100 bytes, not the 16384 of 4096 float32 values",
    }
    for name, message in messages.items():
        with pytest.raises(WeightsError, match=message):
            torchfile.load_weights(tmp_path / name)


# --- bfloat16 ---------------------------------------------------------------------------------

def test_bfloat16_rounding_matches_torch_bit_for_bit():
    special = np.array([
        0x3F808000,  # 1 + 2^-8: a tie, kept half even -> rounds down
        0x3F818000,  # a tie with an odd kept half -> rounds up
        0x3F808001, 0x3F807FFF,  # just past and just short of a tie
        0x7F7FFFFF, 0xFF7FFFFF,  # the largest floats round to infinity
        0x7F7F7FFF,  # the largest that does not
        0x7F800000, 0xFF800000, 0x00000000, 0x80000000,  # infinities and zeros
        0x00000001, 0x00008000, 0x00018000, 0x007FFFFF,  # subnormals, ties among them
    ], dtype=np.uint32)
    rng = np.random.default_rng(0)
    bits = np.concatenate([special, rng.integers(0, 2**32, 200_000, dtype=np.uint32)])
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    mine = torchfile.float32_to_bfloat16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(mine, theirs)
    nans = torchfile.float32_to_bfloat16(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(torchfile.bfloat16_to_float32(nans)).all()
    np.testing.assert_array_equal(torchfile.bfloat16_to_float32(mine),
                                  torch.from_numpy(x).to(torch.bfloat16).float().numpy())


# --- safetensors ------------------------------------------------------------------------------

def arrays():
    rng = np.random.default_rng(1)
    return {
        "scalar": np.array(0.5, np.float32),
        "embed": rng.standard_normal((5, 3)).astype(np.float32),
        "half": rng.standard_normal(7).astype(np.float16),  # odd size: later tensors stay aligned
        "double": rng.standard_normal((2, 2, 2)),
        "ids": np.arange(-3, 3, dtype=np.int64),
        "small": np.arange(5, dtype=np.int8),
        "bytes": np.arange(3, dtype=np.uint8),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 4), np.float32),
        "w.T": rng.standard_normal((4, 6)).astype(np.float32).T,  # not contiguous
    }


def test_safetensors_round_trip_with_metadata(tmp_path):
    torchfile.save_safetensors(tmp_path / "w.safetensors", arrays(),
                               metadata={"step": "3", "format": "np"})
    weights = torchfile.load_safetensors(tmp_path / "w.safetensors")
    assert set(weights) == set(arrays())
    for name, a in arrays().items():
        assert weights[name].dtype == a.dtype and weights[name].shape == a.shape
        np.testing.assert_array_equal(weights[name], a)
        assert weights.stored_dtypes[name] == a.dtype.name
    assert weights.metadata == {"step": "3", "format": "np"}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left


def test_safetensors_stored_as_bfloat16_or_float16(tmp_path):
    a = arrays()
    torchfile.save_safetensors(tmp_path / "b.safetensors", a, dtype="bfloat16")
    weights = torchfile.load_safetensors(tmp_path / "b.safetensors")
    for name in ("scalar", "embed", "half", "double", "w.T"):
        want = torch.from_numpy(np.ascontiguousarray(a[name])).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(weights[name], want)
        assert weights.stored_dtypes[name] == "bfloat16" and weights[name].dtype == np.float32
    np.testing.assert_array_equal(weights["ids"], a["ids"])  # integers are kept as they are
    # values a bfloat16 holds come back unchanged, so loading and saving again loses nothing
    torchfile.save_safetensors(tmp_path / "again.safetensors", weights, dtype="bfloat16")
    again = (tmp_path / "again.safetensors").read_bytes()
    assert again == (tmp_path / "b.safetensors").read_bytes()
    torchfile.save_safetensors(tmp_path / "h.safetensors", a, dtype="float16")
    assert torchfile.load_safetensors(tmp_path / "h.safetensors")["embed"].dtype == np.float16


def test_safetensors_library_reads_ours_and_we_read_its(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    st_torch = pytest.importorskip("safetensors.torch")
    a = arrays()
    torchfile.save_safetensors(tmp_path / "ours.safetensors", a)
    theirs = st_numpy.load_file(tmp_path / "ours.safetensors")
    for name in a:
        np.testing.assert_array_equal(theirs[name], a[name])
        assert theirs[name].dtype == a[name].dtype

    st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in a.items()},
                       tmp_path / "theirs.safetensors", metadata={"m": "1"})
    weights = torchfile.load_safetensors(tmp_path / "theirs.safetensors")
    for name in a:
        np.testing.assert_array_equal(weights[name], a[name])
    assert weights.metadata == {"m": "1"}

    tensors = views(torch.bfloat16)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items() if k != "tied"}  # unshared
    st_torch.save_file(tensors, tmp_path / "bf16.safetensors")
    assert_same(torchfile.load_weights(tmp_path / "bf16.safetensors"), tensors)
    torchfile.save_safetensors(tmp_path / "ours16.safetensors",
                               {k: expected(v) for k, v in tensors.items()}, dtype="bfloat16")
    back = st_torch.load_file(tmp_path / "ours16.safetensors")
    for name, t in tensors.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], t), name


def header_file(path, header, data_size):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data_size))
    return path


@pytest.mark.parametrize("header, data_size, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlap or leave a gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlap or leave a gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 4, "truncated or damaged"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 9, "truncated or damaged"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "takes 12 bytes"),
    ({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, 2, "has dtype 'F8_E4M3'"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, 8, "non-negative integers"),
    ({"__metadata__": {"step": 3}}, 0, "map of strings to strings"),
    ([1, 2], 0, "not a JSON object"),
])
def test_safetensors_headers_that_do_not_add_up_are_refused(tmp_path, header, data_size, message):
    path = header_file(tmp_path / "bad.safetensors", header, data_size)
    with pytest.raises(WeightsError, match=message):
        torchfile.load_safetensors(path)


def test_truncated_safetensors_and_format_detection(tmp_path):
    torchfile.save_safetensors(tmp_path / "w.safetensors", arrays())
    data = (tmp_path / "w.safetensors").read_bytes()
    for cut in (4, 20, len(data) - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="truncated"):
            torchfile.load_weights(tmp_path / "cut.safetensors")
    (tmp_path / "model.bin").write_bytes(data)  # told apart by content, whatever its name
    weights = torchfile.load_weights(tmp_path / "model.bin")
    np.testing.assert_array_equal(weights["embed"], arrays()["embed"])
    with pytest.raises(WeightsError, match="no weights file"):
        torchfile.load_weights(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="cannot store array s of dtype <U1"):
        torchfile.save_safetensors(tmp_path / "s.safetensors", {"s": np.array(["x"])})
