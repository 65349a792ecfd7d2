"""``convert --force`` never destroys what the user had (issue 11, point 4)."""

import subprocess
import sys

import pytest
from helpers import random_weights, small_config, write_hf_folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    config = small_config("tied")
    return write_hf_folder(tmp_path_factory.mktemp("force") / "data" / "src", config, random_weights(config))


def convert_cli(src, dst, *extra):
    return subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "convert", "--hf-path", str(src), "--mlx-path", str(dst), *extra],
        capture_output=True,
        text=True,
    )


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["source", "parent", "grandparent"])
@pytest.mark.parametrize("forces", [1, 2])
def test_destination_holding_the_source_is_refused(source, where, forces):
    dst = {"source": source, "parent": source.parent, "grandparent": source.parent.parent}[where]
    before = snapshot(dst)
    out = convert_cli(source, dst, *["--force"] * forces)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    what = "is" if where == "source" else "contains"
    assert f"--mlx-path {dst} {what} the source {source}" in out.stderr and "choose another" in out.stderr
    assert snapshot(dst) == before


def test_single_file_source_inside_the_destination(tmp_path, source):
    out = convert_cli(source / "model.safetensors", source.parent, "--force", "--force", "--config",
                      str(source / "config.json"))  # fmt: skip
    assert out.returncode == 1 and "contains the source" in out.stderr


def test_a_folder_that_is_not_a_conversion_is_never_replaced(tmp_path, source):
    """Issue 23: --force --force used to replace anything; now nothing of the user's is replaced."""
    dst = tmp_path / "notes"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    for forces in (1, 2):
        out = convert_cli(source, dst, *["--force"] * forces)
        assert out.returncode == 1 and "holds files openelm-mlx did not write (notes.txt)" in out.stderr
        assert (dst / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_regular_file_is_never_replaced(tmp_path, source):
    dst = tmp_path / "model"
    dst.write_text("a file of the user's")
    for forces in (1, 2):
        out = convert_cli(source, dst, *["--force"] * forces)
        assert out.returncode == 1 and "it is a file, not a folder" in out.stderr
    assert dst.read_text() == "a file of the user's"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_an_earlier_conversion_is_replaced_with_one_force(tmp_path, source):
    dst = tmp_path / "model"
    assert convert_cli(source, dst).returncode == 0
    again = convert_cli(source, dst, "-q", "--force")
    assert again.returncode == 0, again.stderr
    assert "quantization" in (dst / "config.json").read_text()
    (dst / "my-notes.md").write_text("added by the user")  # now it holds something of the user's
    refused = convert_cli(source, dst, "--force")
    assert refused.returncode == 1 and "my-notes.md" in refused.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
