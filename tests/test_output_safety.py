"""quantool never deletes what it did not write, and every OS error is one line and exit 2.

OUT is replaced only when empty or holding quantool's own earlier output (its quantool.json lists every file),
checked at the start and again just before publishing, --overwrite included."""

import errno
import json
import pathlib

import pytest
from click.testing import CliRunner

from quantool.cli import main
from quantool.errors import QuantoolError
from quantool.ptq import PTQConfig, quantize_model

CFG = dict(method="rtn", group_size=32, device="cpu")


def _rtn(model, out, *extra):
    return CliRunner().invoke(main, ["rtn", str(model), "-o", str(out), "--group-size", "32", "--device", "cpu", *extra])


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_with_user_files_is_never_replaced(tiny_llama, tmp_path, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    result = _rtn(tiny_llama, out, *(["--overwrite"] if overwrite else []))
    assert result.exit_code == 2 and "did not write (thesis.tex)" in result.output and "Traceback" not in result.output
    assert (out / "thesis.tex").read_text() == "years of work" and len(list(out.iterdir())) == 1


def test_a_file_added_to_out_during_the_run_stops_the_publish(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    def add_file(report, total):
        (out / "important.txt").write_text("x")

    with pytest.raises(QuantoolError, match=r"important\.txt"):
        quantize_model(str(tiny_llama), out, PTQConfig(**CFG), on_layer=add_file, log=lambda m: None)
    assert (out / "important.txt").read_text() == "x"
    assert (tmp_path / "out.partial" / "progress.json").exists()  # the finished work waits for --resume
    (out / "important.txt").unlink()
    assert _rtn(tiny_llama, out, "--resume").exit_code == 0
    assert (out / "quantool.json").exists() and not (tmp_path / "out.partial").exists()


def test_overwrite_replaces_only_quantools_own_output(tiny_llama, tmp_path):
    out = tmp_path / "out"
    assert _rtn(tiny_llama, out).exit_code == 0
    first = json.loads((out / "quantool.json").read_text())
    assert "quantool.json" in first["files"] and "model.safetensors" in first["files"]
    result = _rtn(tiny_llama, out)
    assert result.exit_code == 2 and "pass --overwrite" in result.output
    assert _rtn(tiny_llama, out, "--overwrite").exit_code == 0
    assert json.loads((out / "quantool.json").read_text())["run_id"] != first["run_id"]
    (out / "notes.txt").write_text("mine")
    result = _rtn(tiny_llama, out, "--overwrite")
    assert result.exit_code == 2 and "notes.txt" in result.output
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_is_a_file(tiny_llama, tmp_path, overwrite):
    out = tmp_path / "out"
    out.write_text("a file")
    result = _rtn(tiny_llama, out, *(["--overwrite"] if overwrite else []))
    assert result.exit_code == 2 and "is not a folder" in result.output and "Traceback" not in result.output
    assert out.read_text() == "a file"


def test_out_on_a_mount_point_is_refused_before_any_work(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "mnt"
    out.mkdir()
    monkeypatch.setattr("os.path.ismount", lambda p: str(p) == str(out))
    result = _rtn(tiny_llama, out)
    assert result.exit_code == 2 and "mount point" in result.output and "-o" in result.output
    assert not (tmp_path / "mnt.partial").exists()


def test_a_foreign_partial_folder_is_not_removed(tiny_llama, tmp_path):
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "data.csv").write_text("1,2")
    result = _rtn(tiny_llama, tmp_path / "out", "--overwrite")
    assert result.exit_code == 2 and "not quantool's working folder" in result.output
    assert (tmp_path / "out.partial" / "data.csv").exists()


@pytest.mark.parametrize("code,needle", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                                         (errno.ENOSPC, "disk filled up")])
def test_os_errors_are_one_line(tiny_llama, tmp_path, monkeypatch, code, needle):
    original = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            raise OSError(code, "simulated", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    result = _rtn(tiny_llama, tmp_path / "out")
    assert result.exit_code == 2 and needle in result.output and "out.partial" in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
