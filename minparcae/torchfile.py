"""Model weights from PyTorch's files, read without PyTorch: `torch.save` zips and safetensors.

`load_weights(path)` reads either kind, told apart by its first bytes; `load_torch` and
`load_safetensors` read one kind each; `save_safetensors` writes one, atomically
(`files.durable_write`). A load returns `Weights`: a dict of name -> NumPy array, the names as the
file has them, with the dtypes the file stored and its metadata alongside.

A `torch.save` file (PyTorch 1.6 and later) is a zip archive whose entries share one folder name:

    <name>/data.pkl      the pickled object: a dict of tensors, or a dict holding one ("model")
    <name>/data/<key>    each storage's raw bytes, in the byte order named by <name>/byteorder
    <name>/byteorder     "little" or "big" (absent in the oldest zips: little)

A pickle is a small program, and unpickling one runs whatever functions it names, so a file from
elsewhere could run `os.system`. `data.pkl` is therefore read by an unpickler that knows only what
a dict of tensors needs, and refuses any other name before anything is called:

    collections.OrderedDict            the state dict itself
    torch._utils._rebuild_tensor_v2    a tensor: (storage, offset, size, stride, ...)
    torch._utils._rebuild_tensor       the same, from older PyTorch
    torch._utils._rebuild_parameter    an nn.Parameter saved as itself: (tensor, ...)
    torch.FloatStorage, HalfStorage,   a storage's dtype, one class for each row of `_DTYPES`;
      BFloat16Storage, LongStorage...  only named, never called

Anything else, a whole nn.Module or a tensor carrying Python attributes among them, is refused.

Each storage is named by a persistent id ('storage', <storage class>, <key>, <device>, <numel>),
and a tensor is a view of it: element (i, j, ...) sits at offset + i*stride[0] + j*stride[1] + ...
Views therefore come back right whatever they were: a transposed weight saved without
.contiguous(), a slice, two names tied to one storage. Each array is its own contiguous copy.

A safetensors file is 8 bytes (little-endian length n), n bytes of JSON,

    {"<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
     "__metadata__": {"<key>": "<text>"}}

then the tensors' bytes, C order and little-endian, at those offsets from the end of the header.
The offsets must tile the rest of the file exactly, with no gap or overlap.

bfloat16 has no NumPy dtype. Its 16 bits are the top half of a float32's, so it is read as float32
exactly (`bits << 16`), and written from float32 by rounding to the nearest bfloat16, ties to even.
What a file stored is kept in `Weights.stored_dtypes`; float16 stays float16. Every way a file
can fail to load or save ends in a `WeightsError` with one sentence.
"""

import collections
import io
import json
import os
import pickle
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

from .backend import to_host
from .files import describe_os_error, durable_write


class WeightsError(RuntimeError):
    pass


class Weights(dict):
    """name -> NumPy array, and what the file said about them:

    stored_dtypes  name -> the dtype in the file ("float32", "bfloat16", ...); a bfloat16 tensor's
                   array is float32
    metadata       a safetensors file's "__metadata__" (str -> str), or the entries of a torch file
                   that hold no tensor (such as "step")
    """

    def __init__(self):
        super().__init__()
        self.stored_dtypes = {}
        self.metadata = {}

    def _add(self, name, stored, dtype):
        """Add the array `stored` (bfloat16 as its uint16 bits) of the file's dtype `dtype`."""
        self[name] = bfloat16_to_float32(stored) if dtype == "bfloat16" else stored
        self.stored_dtypes[name] = dtype


# dtype: (NumPy dtype of its bytes, safetensors' name, torch's storage class)
_DTYPES = {
    "float64": ("<f8", "F64", "DoubleStorage"),
    "float32": ("<f4", "F32", "FloatStorage"),
    "float16": ("<f2", "F16", "HalfStorage"),
    "bfloat16": ("<u2", "BF16", "BFloat16Storage"),
    "int64": ("<i8", "I64", "LongStorage"),
    "int32": ("<i4", "I32", "IntStorage"),
    "int16": ("<i2", "I16", "ShortStorage"),
    "int8": ("i1", "I8", "CharStorage"),
    "uint8": ("u1", "U8", "ByteStorage"),
    "bool": ("?", "BOOL", "BoolStorage"),
}
_SAFETENSORS_DTYPE = {code: dtype for dtype, (_, code, _) in _DTYPES.items()}
_STORAGE_DTYPE = {storage: dtype for dtype, (_, _, storage) in _DTYPES.items()}


def bfloat16_to_float32(bits):
    """bfloat16 bit patterns (uint16) -> the same values as float32, exactly."""
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: a 0-d array stays an array
    return wide.view(np.float32)


def float32_to_bfloat16(x):
    """float32 -> the nearest bfloat16 bit patterns (uint16), ties to even; NaN -> quiet NaN.

    Adding 0x7FFF to the bits, plus 1 when the lowest kept bit is odd, carries into the kept half
    exactly when the dropped half is over 0x8000, or equal to it with an odd kept half; a carry
    out of the mantissa steps the exponent, so the largest floats round to infinity."""
    x = np.asarray(x, np.float32, order="C")
    bits = x.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def load_weights(path):
    """A safetensors file or a `torch.save` zip, told apart by its first bytes (by its name when
    it is too short to tell): -> Weights."""
    head = _head(path, 9)
    if head[8:9] == b"{":  # first: a safetensors header's length may begin with any byte
        return load_safetensors(path)
    if head.startswith((b"PK", b"\x80")) or not str(path).endswith(".safetensors"):
        return load_torch(path)
    return load_safetensors(path)


# --- torch.save zips ---------------------------------------------------------------------------

class _StorageClass(NamedTuple):
    dtype: str


class _Storage(NamedTuple):
    key: str
    dtype: str
    numel: int


class _Tensor(NamedTuple):
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *_flags):
    """torch._utils._rebuild_tensor(_v2): requires_grad, hooks and metadata do not matter here."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor built on something other than a storage")
    return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_flags):
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError("an nn.Parameter holding something other than a tensor")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", storage): _StorageClass(dtype) for storage, dtype in _STORAGE_DTYPE.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Knows the names in `_ALLOWED` and nothing else; tensors come back as `_Tensor`s."""

    def __init__(self, data, path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise WeightsError(f"{self.path} asks for {module}.{name}, which a dict of tensors "
                               "never needs, so it was refused and nothing ran: load only a "
                               "model's state_dict(), from a source you trust.") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageClass) and isinstance(pid[4], int)):
            raise WeightsError(f"{self.path} refers to {str(pid)[:80]}, which is not a storage of "
                               "tensors: load only files that torch.save wrote.")
        return _Storage(str(pid[2]), pid[1].dtype, pid[4])


def load_torch(path):
    """A `torch.save` zip of a state dict, or of a dict holding one under "model" or "state_dict",
    -> Weights. Other entries that hold no tensor go to `metadata`; ones that hold tensors (an
    optimiser's state) are left out."""
    archive = _open_zip(path)
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"{path} is a zip archive but not one torch.save wrote (it has no "
                               "<name>/data.pkl): pass the model's .pt, .pth or .bin file.")
        folder = pickles[0][:-len("data.pkl")]
        try:
            top = _StateDictUnpickler(archive.read(pickles[0]), path).load()
            has_byteorder = folder + "byteorder" in archive.namelist()
            big_endian = has_byteorder and archive.read(folder + "byteorder").strip() == b"big"
        except WeightsError:
            raise
        except Exception as err:  # noqa: BLE001 (a damaged pickle fails in a dozen ways)
            raise WeightsError(f"{path} is damaged: its data.pkl cannot be read "
                               f"({type(err).__name__}); copy or save it again.") from None
        tensors, weights = _state_dict(top, path)
        storages = {}
        for name, tensor in tensors.items():
            if tensor.storage not in storages:  # tied weights and views share one
                storages[tensor.storage] = _read_storage(archive, folder, tensor.storage,
                                                         big_endian, path)
            weights._add(name, _view(storages[tensor.storage], tensor, name, path),
                         tensor.storage.dtype)
    return weights


def _open_zip(path):
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        head = _head(path, 4)
        if head.startswith(b"\x80"):
            raise WeightsError(f"{path} was written by torch.save in the legacy format (before "
                               "PyTorch 1.6): load it with torch and save it again with a recent "
                               "PyTorch or as safetensors.") from None
        if head.startswith(b"PK"):
            raise WeightsError(f"{path} is a truncated or damaged zip archive: copy or "
                               "download it again.") from None
        raise WeightsError(f"{path} is neither a torch.save file nor a safetensors file: pass the "
                           "model's .pt, .pth, .bin or .safetensors file.") from None
    except OSError as err:
        raise _read_error(err, path) from None


def _head(path, n):
    """The first `n` bytes of the file (fewer if it is shorter)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as err:
        raise _read_error(err, path) from None


def _read_error(err, path):
    if isinstance(err, FileNotFoundError):
        return WeightsError(f"no weights file at {path}: check the path.")
    return WeightsError(describe_os_error(err, "cannot read the weights", path) + ".")


def _holds_tensor(obj):
    if isinstance(obj, _Tensor):
        return True
    if isinstance(obj, dict):
        return any(_holds_tensor(v) for v in obj.values())
    return isinstance(obj, (list, tuple)) and any(_holds_tensor(v) for v in obj)


def _state_dict(top, path):
    """(name -> _Tensor, Weights holding the metadata) from the unpickled object."""
    if not isinstance(top, dict):
        raise WeightsError(f"{path} holds a {type(top).__name__}, not a dict of tensors: save the "
                           "model's state_dict().")
    weights = Weights()
    state = top
    if not any(isinstance(v, _Tensor) for v in top.values()):
        state = next((top[k] for k in ("model", "state_dict") if isinstance(top.get(k), dict)), {})
        if not any(isinstance(v, _Tensor) for v in state.values()):
            raise WeightsError(f"{path} holds no tensors at its top level nor under 'model' or "
                               "'state_dict': save the model's state_dict().")
        weights.metadata.update((k, v) for k, v in top.items() if not _holds_tensor(v))
    weights.metadata.update((k, v) for k, v in state.items() if not _holds_tensor(v))
    return {k: v for k, v in state.items() if isinstance(v, _Tensor)}, weights


def _read_storage(archive, folder, storage, big_endian, path):
    """A storage's elements as a 1-d array (bfloat16 as uint16), in this machine's byte order."""
    dtype = np.dtype(_DTYPES[storage.dtype][0])
    try:
        data = archive.read(f"{folder}data/{storage.key}")
    except KeyError:
        raise WeightsError(f"{path} lacks the storage data/{storage.key} that its tensors use: the "
                           "file is damaged; copy or save it again.") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as err:  # a bad CRC
        raise WeightsError(f"{path} is damaged: storage data/{storage.key} cannot be read "
                           f"({type(err).__name__}); copy or save it again.") from None
    if len(data) != storage.numel * dtype.itemsize:
        raise WeightsError(f"{path} is damaged: storage data/{storage.key} holds {len(data)} "
                           f"bytes, not the {storage.numel * dtype.itemsize} of {storage.numel} "
                           f"{storage.dtype} values.")
    array = np.frombuffer(data, dtype.newbyteorder(">" if big_endian else "<"))
    return array.astype(dtype.newbyteorder("="), copy=False)


def _view(storage, tensor, name, path):
    """The tensor's elements of `storage`, as a new C-contiguous array."""
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    fits = len(size) == len(stride) and _naturals([*size, *stride, offset])
    if fits and 0 not in size:
        fits = offset + sum((n - 1) * s for n, s in zip(size, stride)) < storage.size
    if not fits:
        raise WeightsError(f"tensor {name} in {path} has size {size}, stride {stride} and offset "
                           f"{offset}, which do not fit its storage of {storage.size} elements: "
                           "the file is damaged.")
    if 0 in size:
        return np.empty(size, storage.dtype)
    strides = tuple(s * storage.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(storage[offset:], size, strides).copy()


# --- safetensors -------------------------------------------------------------------------------

def load_safetensors(path):
    """A safetensors file -> Weights, its "__metadata__" in `metadata`."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise WeightsError(f"{path} is truncated or not a safetensors file (its header "
                                   f"length {n} does not fit in its {size} bytes).")
            header = _parse_header(f.read(n), path)
            entries = _check_header(header, size - 8 - n, path)
            weights = Weights()
            weights.metadata = header.get("__metadata__", {})
            for name, dtype, shape, begin in entries:
                array = np.empty(shape, _DTYPES[dtype][0])
                f.seek(8 + n + begin)
                f.readinto(memoryview(array.reshape(-1)).cast("B"))
                weights._add(name, array.astype(array.dtype.newbyteorder("="), copy=False), dtype)
    except OSError as err:
        raise _read_error(err, path) from None
    return weights


def _parse_header(text, path):
    try:
        header = json.loads(text)
    except ValueError:  # UnicodeDecodeError included
        header = None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a safetensors file: its header is not a JSON object.")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise WeightsError(f"{path} has a __metadata__ that is not a map of strings to strings.")
    return header


def _check_header(header, buffer_size, path):
    """[(name, dtype, shape, begin)] in header order, once the offsets tile the buffer exactly."""
    entries, spans = [], []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = info if isinstance(info, dict) else {}
        dtype = _SAFETENSORS_DTYPE.get(info.get("dtype"))
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise WeightsError(f"tensor {name} in {path} has dtype {info.get('dtype')!r}, not one "
                               f"of {', '.join(_SAFETENSORS_DTYPE)}.")
        if not (_naturals(shape) and _naturals(offsets) and len(offsets) == 2):
            raise WeightsError(f"tensor {name} in {path} has shape {shape!r} and data_offsets "
                               f"{offsets!r}: both must be lists of non-negative integers.")
        begin, end = offsets
        nbytes = int(np.prod(shape)) * np.dtype(_DTYPES[dtype][0]).itemsize
        if end - begin != nbytes:
            raise WeightsError(f"tensor {name} in {path} spans bytes {begin}..{end}, but {dtype} "
                               f"of shape {tuple(shape)} takes {nbytes} bytes.")
        entries.append((name, dtype, tuple(shape), begin))
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise WeightsError(f"tensor {name} in {path} starts at byte {begin} of the data, not "
                               f"at {at}: the tensors overlap or leave a gap; the file is damaged.")
        at = end
    if at != buffer_size:
        raise WeightsError(f"{path} holds {buffer_size} bytes of tensor data but its header "
                           f"describes {at}: the file is truncated or damaged.")
    return entries


def _naturals(values):
    """A list of non-negative ints (not bools, which JSON and pickles keep apart)."""
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def save_safetensors(path, arrays, metadata=None, dtype=None):
    """Atomically write `arrays` (name -> array, NumPy or CuPy) as a safetensors file, with
    `metadata` (str -> str) as its "__metadata__". `dtype` ("float32", "float16", "bfloat16",
    "float64") is what floating arrays are stored as; by default each keeps its own."""
    if dtype is not None and not (dtype in _DTYPES and dtype.startswith(("float", "bfloat"))):
        raise WeightsError(f"cannot store weights as {dtype!r}: use float32, float16, bfloat16 or "
                           "float64.")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise WeightsError("safetensors metadata maps strings to strings: pass other values "
                           "through json.dumps.")
    header = {"__metadata__": dict(metadata)} if metadata else {}
    stored = {name: _stored(name, to_host(a), dtype) for name, a in arrays.items()}
    at = 0  # widest dtypes first, so that every tensor starts at a multiple of its element size
    for name in sorted(stored, key=lambda k: (-stored[k][1].itemsize, k)):
        code, data = stored[name]
        header[name] = {"dtype": code, "shape": list(data.shape),
                        "data_offsets": [at, at + data.nbytes]}
        at += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def fill(f):
        f.write(len(text).to_bytes(8, "little") + text)
        for name in header:
            if name != "__metadata__":
                f.write(stored[name][1].reshape(-1).data)

    try:
        durable_write(path, fill)
    except OSError as err:
        raise WeightsError(describe_os_error(err, "cannot write the weights", path) + ".") from None


def _stored(name, array, dtype):
    """(safetensors dtype, C-contiguous little-endian array of the bytes to write)."""
    array = np.asarray(array)
    if dtype is not None and array.dtype.kind == "f":
        if dtype == "bfloat16":
            return "BF16", float32_to_bfloat16(array).astype("<u2")
        array = array.astype(dtype)
    if array.dtype.name not in _DTYPES:
        raise WeightsError(f"cannot store array {name} of dtype {array.dtype}: safetensors here "
                           f"takes {', '.join(k for k in _DTYPES if k != 'bfloat16')}.")
    stored = np.asarray(array, _DTYPES[array.dtype.name][0], order="C")
    return _DTYPES[array.dtype.name][1], stored
