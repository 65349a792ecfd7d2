"""A corpus of hostile pickles inside torch-layout zip files: none runs, each is refused.

Every code-execution pickle carries the command ``touch SENTINEL``; the test checks that the
sentinel never appears and that the error names the offending global.
"""

import io
import struct
import subprocess
import sys
import zipfile

import pytest
from openelm_mlx.convert.torch_reader import RefusedGlobal, read_torch_checkpoint, state_dict_tensors

from openelm_mlx.errors import CheckpointError

PROTO2, PROTO4, STOP = b"\x80\x02", b"\x80\x04", b"."
MARK, TUPLE, EMPTY_TUPLE, REDUCE, BUILD = b"(", b"t", b")", b"R", b"b"
EMPTY_DICT, EMPTY_LIST, APPEND, SETITEM, MEMOIZE = b"}", b"]", b"a", b"s", b"\x94"
STACK_GLOBAL, OBJ, NEWOBJ, NEWOBJ_EX, BINPERSID, BININT = b"\x93", b"o", b"\x81", b"\x92", b"Q", b"J"


def u(text: str) -> bytes:  # SHORT_BINUNICODE
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:  # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def get(i: int) -> bytes:  # BINGET
    return b"h" + bytes([i])


def call(module: str, name: str, *args: bytes) -> bytes:
    return glob(module, name) + MARK + b"".join(args) + TUPLE + REDUCE


def corpus(cmd: str) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, the text the refusal must contain)."""
    c = u(cmd)
    return {
        "os.system": (PROTO2 + call("os", "system", c) + STOP, "'os.system'"),
        "posix.system": (PROTO2 + call("posix", "system", c) + STOP, "'posix.system'"),
        "nt.system": (PROTO2 + call("nt", "system", c) + STOP, "'nt.system'"),
        "subprocess.Popen": (PROTO2 + call("subprocess", "Popen", u("sh"), u("-c"), c) + STOP, "subprocess.Popen"),
        "subprocess.check_output": (
            PROTO2
            + glob("subprocess", "check_output")
            + MARK
            + EMPTY_LIST
            + u("touch")
            + APPEND
            + TUPLE
            + REDUCE
            + STOP,
            "subprocess.check_output",
        ),
        "builtins.eval": (
            PROTO2 + call("builtins", "eval", u(f"__import__('os').system('{cmd}')")) + STOP,
            "'builtins.eval'",
        ),
        "builtins.exec": (
            PROTO2 + call("builtins", "exec", u(f"import os; os.system('{cmd}')")) + STOP,
            "'builtins.exec'",
        ),
        "__builtin__.eval": (PROTO2 + call("__builtin__", "eval", u("1")) + STOP, "'__builtin__.eval'"),
        "builtins.__import__": (PROTO2 + call("builtins", "__import__", u("os")) + STOP, "builtins.__import__"),
        "getattr chain": (
            PROTO2
            + glob("builtins", "getattr")
            + MARK
            + call("builtins", "__import__", u("os"))
            + u("system")
            + TUPLE
            + REDUCE
            + MARK
            + c
            + TUPLE
            + REDUCE
            + STOP,
            "'builtins.getattr'",
        ),
        "STACK_GLOBAL os.system": (
            PROTO4 + u("os") + u("system") + STACK_GLOBAL + MARK + c + TUPLE + REDUCE + STOP,
            "'os.system'",
        ),
        "STACK_GLOBAL via memo": (
            PROTO4
            + u("os")
            + MEMOIZE
            + u("system")
            + MEMOIZE
            + get(0)
            + get(1)
            + STACK_GLOBAL
            + MARK
            + c
            + TUPLE
            + REDUCE
            + STOP,
            "'os.system'",
        ),
        "INST": (PROTO2 + MARK + c + b"ios\nsystem\n" + STOP, "'os.system'"),
        "OBJ": (PROTO2 + MARK + glob("os", "system") + c + OBJ + STOP, "'os.system'"),
        "NEWOBJ": (PROTO2 + glob("os", "system") + MARK + c + TUPLE + NEWOBJ + STOP, "'os.system'"),
        "NEWOBJ_EX": (PROTO4 + glob("os", "system") + MARK + c + TUPLE + EMPTY_DICT + NEWOBJ_EX + STOP, "'os.system'"),
        "nested reduce": (
            PROTO2 + glob("collections", "OrderedDict") + MARK + call("os", "system", c) + TUPLE + REDUCE + STOP,
            "'os.system'",
        ),
        "inside a state dict": (
            PROTO2 + EMPTY_DICT + u("transformer.norm.weight") + call("os", "system", c) + SETITEM + STOP,
            "'os.system'",
        ),
        "torch.load": (PROTO2 + call("torch", "load", u("/tmp/x.pt")) + STOP, "'torch.load'"),
        "torch legacy _load_from_bytes": (
            PROTO2 + call("torch.storage", "_load_from_bytes", u("x")) + STOP,
            "torch.storage._load_from_bytes",
        ),
        "numpy _reconstruct": (
            PROTO2 + call("numpy.core.multiarray", "_reconstruct", u("x")) + STOP,
            "numpy.core.multiarray._reconstruct",
        ),
        "operator.attrgetter": (PROTO2 + call("operator", "attrgetter", u("system")) + STOP, "operator.attrgetter"),
        "pickle.loads": (PROTO2 + call("pickle", "loads", u("x")) + STOP, "'pickle.loads'"),
        "copyreg extension code": (PROTO2 + b"\x82\x07" + STOP, "malformed pickle"),
        # misuse of allowed names
        "OrderedDict with arguments": (
            PROTO2 + call("collections", "OrderedDict", u("x")) + STOP,
            "OrderedDict from arguments",
        ),
        "_codecs.encode other codec": (PROTO2 + call("_codecs", "encode", u("x"), u("rot13")) + STOP, "_codecs.encode"),
        "rebuild without storage": (
            PROTO2
            + call(
                "torch._utils", "_rebuild_tensor_v2", u("x"), BININT + struct.pack("<i", 0), EMPTY_TUPLE, EMPTY_TUPLE
            )
            + STOP,
            "without a storage",
        ),
        "persistent id of the wrong form": (PROTO2 + u("../../etc/passwd") + BINPERSID + STOP, "persistent id"),
        "storage claiming a huge size": (
            PROTO2
            + MARK
            + u("storage")
            + glob("torch", "FloatStorage")
            + u("0")
            + u("cpu")
            + b"\x8a\x08"
            + struct.pack("<q", 2**60)
            + TUPLE
            + BINPERSID
            + STOP,
            "claims",
        ),
        "BUILD on a storage": (
            PROTO2
            + MARK
            + u("storage")
            + glob("torch", "FloatStorage")
            + u("0")
            + u("cpu")
            + BININT
            + struct.pack("<i", 1)
            + TUPLE
            + BINPERSID
            + EMPTY_DICT
            + u("file")
            + u("/etc/shadow")
            + SETITEM
            + BUILD
            + STOP,
            "modify a storage",
        ),
    }


def as_torch_zip(pkl: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        for key, data in (storages or {"0": b"\0" * 4}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def test_corpus_is_large_enough():
    assert len(corpus("true")) >= 20


@pytest.mark.parametrize("name", list(corpus("true")))
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, name):
    sentinel = tmp_path / "SENTINEL"
    pkl, expected = corpus(f"touch {sentinel}")[name]
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(as_torch_zip(pkl))
    with pytest.raises(CheckpointError) as err:
        state_dict_tensors(read_torch_checkpoint(path), path)
    assert expected in str(err.value) and str(path) in str(err.value)
    assert not sentinel.exists()


def test_refusals_name_the_global_as_refused_global(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(as_torch_zip(corpus("true")["STACK_GLOBAL via memo"][0]))
    with pytest.raises(RefusedGlobal, match="refused: the pickle asks for the global 'os.system'"):
        read_torch_checkpoint(path)


def test_training_checkpoint_with_other_objects_names_the_file_to_use(tmp_path):
    path = tmp_path / "training_checkpoint_last.pt"
    pkl = PROTO2 + EMPTY_DICT + u("best_metric") + call("numpy.core.multiarray", "scalar", u("x")) + SETITEM + STOP
    path.write_bytes(as_torch_zip(pkl))
    with pytest.raises(RefusedGlobal, match="numpy.core.multiarray.scalar.*convert the model-only checkpoint_"):
        read_torch_checkpoint(path)


def test_billion_laughs_and_deep_nesting_stay_small_and_fail_cleanly(tmp_path):
    # 30 levels of a list holding its predecessor ten times: 10**30 logical elements, a few KB real.
    laughs = PROTO2 + EMPTY_LIST + u("lol") + APPEND + MEMOIZE
    for level in range(30):
        laughs += EMPTY_LIST + MEMOIZE + b"".join(get(level) + APPEND for _ in range(10))
    laughs += STOP
    deep = PROTO2 + MARK * 200_000 + STOP
    for pkl in (laughs, deep):
        path = tmp_path / "x.pt"
        path.write_bytes(as_torch_zip(pkl))
        with pytest.raises(CheckpointError):
            state_dict_tensors(read_torch_checkpoint(path), path)


def test_compression_bomb_data_pkl_is_refused_before_reading(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (80 * 2**20))  # 80 MB of zeros, about 80 KB compressed
    path = tmp_path / "bomb.pt"
    path.write_bytes(buf.getvalue())
    assert path.stat().st_size < 1_000_000
    with pytest.raises(CheckpointError, match="refusing to read it"):
        read_torch_checkpoint(path)


def test_cli_refuses_and_leaves_no_output(tmp_path):
    import json

    from helpers import small_config

    sentinel = tmp_path / "SENTINEL"
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(small_config("tied").to_dict()))
    (src / "pytorch_model.bin").write_bytes(as_torch_zip(corpus(f"touch {sentinel}")["getattr chain"][0]))
    out = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "'builtins.getattr'" in out.stderr and not sentinel.exists() and not (tmp_path / "o").exists()
