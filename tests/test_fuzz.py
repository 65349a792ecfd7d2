"""Seeded, bounded fuzzing of the readers and the config parser.

Allowed outcomes: a correct result, or the project's own error (OpenELMError) with a message.
Anything else (another exception, a hang past the per-input alarm) fails the test.  Longer
runs: ``OPENELM_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py``.
"""

import json
import os
import signal
import struct
from contextlib import contextmanager

import numpy as np
import pytest
from helpers import random_weights, require_torch, small_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openelm_mlx.convert.safetensors_reader import read_safetensors
from openelm_mlx.convert.torch_reader import read_torch_checkpoint, state_dict_tensors

from openelm_mlx import OpenELMConfig
from openelm_mlx.errors import OpenELMError

EXAMPLES = int(os.environ.get("OPENELM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PER_INPUT_SECONDS = 5


@contextmanager
def time_bound(seconds=PER_INPUT_SECONDS):
    def fire(signum, frame):
        raise AssertionError(f"input took longer than {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _tiny_weights():
    config = OpenELMConfig.scaled(num_transformer_layers=2, model_dim=32, head_dim=8, vocab_size=40)
    return {k: v[:4] if v.ndim == 2 else v for k, v in list(random_weights(config).items())[:6]}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzseeds")
    from safetensors.numpy import save_file

    weights = _tiny_weights()
    save_file(weights, str(root / "seed.safetensors"))
    torch = require_torch()
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, str(root / "seed.bin"))
    torch.save({k: torch.from_numpy(v).bfloat16().t() for k, v in weights.items()}, str(root / "seed_bf16.bin"))
    return {p.name: p.read_bytes() for p in root.iterdir()}


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None, insert: bytes) -> bytes:
    buf = bytearray(data)
    for pos, val in edits:
        buf[pos % len(buf)] = val
    if insert:
        at = (edits[0][0] if edits else 0) % len(buf)
        buf[at:at] = insert
    if cut is not None:
        buf = buf[: cut % (len(buf) + 1)]
    return bytes(buf)


mutations = st.tuples(
    st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=8),
    st.one_of(st.none(), st.integers(0, 2**20)),
    st.binary(max_size=16),
)


def read_everything(reader, path):
    """Parse, then read every tensor: each step may only fail with our own error."""
    tensors = reader(path)
    for t in tensors.values():
        arr = t.read()
        assert arr.shape == t.shape


def torch_reader(path):
    return state_dict_tensors(read_torch_checkpoint(path), path)


@FUZZ
@given(which=st.sampled_from(["seed.safetensors", "seed.bin", "seed_bf16.bin"]), m=mutations)
def test_mutated_and_truncated_files(tmp_path, seeds, which, m):
    path = tmp_path / which
    path.write_bytes(mutate(seeds[which], *m))
    reader = read_safetensors if which.endswith(".safetensors") else torch_reader
    with time_bound():
        try:
            read_everything(reader, path)
        except OpenELMError as e:
            assert str(e)


@FUZZ
@given(
    header_len=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 4096)),
    shape=st.lists(st.integers(0, 2**62), max_size=4),
    begin=st.integers(-(2**63), 2**63),
    end=st.integers(-(2**63), 2**63),
    dtype=st.sampled_from(["F32", "BF16", "F16", "I64", "X9", 7]),
)
def test_safetensors_headers_claiming_huge_sizes(tmp_path, header_len, shape, begin, end, dtype):
    header = json.dumps({"w": {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}}).encode()
    path = tmp_path / "h.safetensors"
    claimed = header_len if header_len > 4096 else len(header)
    path.write_bytes(struct.pack("<Q", claimed) + header + b"\0" * 64)
    with time_bound():
        try:
            read_everything(read_safetensors, path)
        except OpenELMError as e:
            assert "h.safetensors" in str(e)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
CONFIG_KEYS = list(OpenELMConfig.__dataclass_fields__)


@FUZZ
@given(overrides=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=5))
def test_config_parser(overrides):
    base = small_config("tied").to_dict()
    with time_bound():
        try:
            config = OpenELMConfig.from_dict({**base, **overrides})
        except OpenELMError as e:
            assert str(e)
            return
    # whatever parsed is internally consistent
    assert len(config.num_query_heads) == config.num_transformer_layers
    assert all(q % kv == 0 for q, kv in zip(config.num_query_heads, config.num_kv_heads, strict=True))
    assert config.num_parameters() > 0


@FUZZ
@given(doc=json_values)
def test_config_json_of_any_shape(tmp_path, doc):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    with time_bound():
        try:
            OpenELMConfig.from_json(path)
        except OpenELMError as e:
            assert str(e)


def test_fuzz_seeds_parse_correctly(tmp_path, seeds):
    weights = _tiny_weights()
    for name in seeds:
        path = tmp_path / name
        path.write_bytes(seeds[name])
        reader = read_safetensors if name.endswith(".safetensors") else torch_reader
        tensors = reader(path)
        assert set(tensors) == set(weights)
        for k, t in tensors.items():
            expected = weights[k].T if name == "seed_bf16.bin" else weights[k]
            atol = 1e-2 * np.abs(expected).max() if "bf16" in name else 0
            np.testing.assert_allclose(np.asarray(t, np.float32), expected, atol=atol)
