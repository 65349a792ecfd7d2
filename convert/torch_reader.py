"""Read PyTorch ``torch.save`` checkpoints (.bin, .pt) without PyTorch and without running code.

A zip-format checkpoint is ``<prefix>/data.pkl`` (a pickle of the state dict)
plus one uncompressed member ``<prefix>/data/<key>`` per storage.  The pickle is
read by an unpickler whose ``find_class`` only answers an allow-list, mapping
each allowed name to an inert stand-in defined here: torch's tensor-rebuild
functions become ``LazyTensor`` builders, storage types become dtype names.
Any other global (``os.system``, ``builtins.eval``, ...) is refused by name and
never imported, let alone called.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .tensors import DTYPES, LazyTensor

_MAX_PICKLE_BYTES = 64 * 2**20  # a 3B model's data.pkl is about 100 KB
# A 3B state dict's pickle is ~8k opcodes and ~400 tensors.  Far more means a pickle built to
# amplify: 8 MiB of BINGETs repeating one memo entry make 4M references, a state dict of
# millions of names over one tensor.
_MAX_PICKLE_OPS = 1_000_000
_MAX_TENSORS = 100_000
# What the tensors may declare, against the file that holds them: distinct tensors (one object
# referenced under two names counts once) may total at most twice the file's bytes plus 1 MiB.
# Real checkpoints stay under 1x (views of one storage partition it); a stride-0 view of a tiny
# storage (3.5 KB declaring 1.29 GB) or overlapping views far exceed it.
EXPANSION_LIMIT = 2
EXPANSION_SLACK = 2**20

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}  # fmt: skip


class RefusedGlobal(CheckpointError):
    """The pickle names a global outside the allow-list."""


class _StorageType(str):
    """What ``torch.FloatStorage`` & co. unpickle to: just the dtype name."""


class _Storage:
    __slots__ = ("file", "data_offset", "numel", "dtype")

    def __init__(self, file: Path, data_offset: int, numel: int, dtype: str):
        self.file, self.data_offset, self.numel, self.dtype = file, data_offset, numel, dtype

    def __setstate__(self, state: Any) -> None:  # BUILD on a stand-in is never legitimate
        raise CheckpointError("pickle tries to modify a storage object")


def _int_tuple(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise CheckpointError(f"tensor {what} is not a tuple of integers: {v!r}")
    return tuple(v)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_rest: Any) -> LazyTensor:
    if not isinstance(storage, _Storage):
        raise CheckpointError("tensor rebuild without a storage")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool):
        raise CheckpointError(f"tensor storage offset is not an integer: {storage_offset!r}")
    return LazyTensor(
        storage.file,
        storage.data_offset,
        storage.numel,
        storage.dtype,
        _int_tuple(size, "size"),
        _int_tuple(stride, "stride"),
        storage_offset,
    )


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); only that is allowed.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("pickle uses _codecs.encode for something other than bytes")
    return obj.encode("latin1")


def _ordered_dict(*args: Any) -> OrderedDict:
    if args:  # OrderedDict is only ever rebuilt empty, then filled with SETITEMS
        raise CheckpointError("pickle builds an OrderedDict from arguments")
    return OrderedDict()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path, zf: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.path, self.zf, self.prefix = path, zf, prefix
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise _refuse(self.path, str(module), str(name)) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unknown persistent id {str(pid)[:80]!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise CheckpointError(f"{self.path}: malformed storage reference {str(pid)[:80]!r}")
        if key not in self.storages:
            offset, size = _member_data_span(self.path, self.zf, f"{self.prefix}/data/{key}")
            if numel < 0 or numel * DTYPES[dtype][1] > size:
                raise CheckpointError(
                    f"{self.path}: storage {key} claims {numel} elements of {dtype} but holds {size} bytes"
                )
            self.storages[key] = _Storage(self.path, offset, numel, str(dtype))
        return self.storages[key]


def _refuse(path: Path, module: str, name: str) -> RefusedGlobal:
    hint = ""
    if path.name.startswith("training_checkpoint"):
        hint = (
            ". This is a full CoreNet training checkpoint (optimizer state and more); convert the model-only "
            "checkpoint_*.pt (or checkpoint_average.pt) saved beside it instead"
        )
    return RefusedGlobal(
        f"{path}: refused: the pickle asks for the global '{module}.{name}', which is not "
        f"a tensor type on the allow-list; a checkpoint is never allowed to run code{hint}"
    )


def _prescan(data: bytes, path: Path) -> None:
    """Walk the opcodes without executing any: every length field is checked against the bytes
    actually present (so no allocation follows an untrusted size), and a GLOBAL/INST naming
    anything off the allow-list is refused before unpickling starts."""
    try:
        for count, (op, arg, _pos) in enumerate(pickletools.genops(data)):
            if count > _MAX_PICKLE_OPS:
                raise CheckpointError(
                    f"{path}: data.pkl has over {_MAX_PICKLE_OPS:,} opcodes (a state dict has thousands); refused"
                )
            if op.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                if (module, name) not in _ALLOWED:
                    raise _refuse(path, module, name)
    except CheckpointError:
        raise
    except Exception as e:  # ValueError from genops: truncated or malformed opcode stream
        raise CheckpointError(f"{path}: malformed pickle ({str(e)[:160]})") from None


def _member_data_span(path: Path, zf: zipfile.ZipFile, member: str) -> tuple[int, int]:
    """(byte offset, size) of an uncompressed zip member's data inside the archive file."""
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise CheckpointError(f"{path}: storage member {member} is missing from the archive") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: storage member {member} is compressed; torch.save never does that")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        file_size = f.seek(0, 2)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip entry for {member}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + 30 + name_len + extra_len
    if offset + info.file_size > file_size:
        raise CheckpointError(f"{path}: storage {member} is truncated (the file is cut short)")
    return offset, info.file_size


def read_torch_checkpoint(path: str | Path) -> Any:
    """Unpickle a zip-format torch checkpoint into plain containers of ``LazyTensor``."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # BadZipFile, OSError, UnicodeDecodeError of a mangled name, ...: all "not a zip"
        raise CheckpointError(
            f"{path}: not a zip-format PyTorch checkpoint ({e}); legacy (torch < 1.6) pickles are not "
            "read: re-save it with a current torch.save, or convert it to safetensors"
        ) from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: a torch checkpoint holds exactly one data.pkl, found {len(pkl)}")
        info = zf.getinfo(pkl[0])
        if info.file_size > _MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: data.pkl claims {info.file_size} bytes; refusing to read it")
        try:
            data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read data.pkl ({e}); the file is truncated or corrupt") from None
        prefix = pkl[0][: -len("data.pkl")].rstrip("/")
        _prescan(data, path)
        unpickler = _SafeUnpickler(data, path, zf, prefix)
        try:
            obj = unpickler.load()
        except CheckpointError as e:  # from a stand-in: make sure the message names the file
            if str(e).startswith(str(path)):
                raise
            raise CheckpointError(f"{path}: {e}") from None
        except RecursionError:
            raise CheckpointError(f"{path}: the pickle nests too deeply") from None
        except Exception as e:  # any malformed pickle: report it, never a traceback
            raise CheckpointError(f"{path}: malformed pickle ({type(e).__name__}: {e})") from None
    return obj


def state_dict_tensors(obj: Any, path: Path) -> dict[str, LazyTensor]:
    """The flat {name: tensor} state dict inside what a checkpoint unpickled to.

    Accepts a plain state dict or a training checkpoint that wraps one
    (``model_state_dict``, ``state_dict`` or ``model``); DDP's ``module.`` prefix is dropped.
    """
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    if len(obj) > _MAX_TENSORS:
        raise CheckpointError(f"{path}: the state dict has {len(obj):,} entries, over {_MAX_TENSORS:,}; refused")
    budget = EXPANSION_LIMIT * path.stat().st_size + EXPANSION_SLACK
    declared, seen = 0, set()
    tensors: dict[str, LazyTensor] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: state dict key {name!r:.60} is not a string")
        if isinstance(value, LazyTensor):
            if id(value) not in seen:
                seen.add(id(value))
                declared += value.nbytes
                if declared > budget:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} brings the declared size to {declared:,} bytes, over "
                        f"{EXPANSION_LIMIT}x the file's {path.stat().st_size:,} ({_view(value)}); refused"
                    )
            clean = name[len("module.") :] if name.startswith("module.") else name
            tensors[clean] = value.renamed(clean)
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def _view(t: LazyTensor) -> str:
    if t.numel > t.span:
        return f"shape {list(t.shape)} with strides {list(t.strides)} spans {t.span:,} stored elements"
    return f"shape {list(t.shape)}"
