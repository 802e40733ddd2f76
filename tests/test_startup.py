"""Start-up: the verification record (a file whose stat is unchanged since its sha256 matched is not hashed again;
any change is), verification beside the sessions, and the vision session made after ready."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from edgevlm.runtime import package as package_module
from edgevlm.runtime.errors import PackageError
from edgevlm.runtime.package import ModelPackage

DECODER = "decoder_model_fused.onnx"


@pytest.fixture
def record(tmp_path, monkeypatch):
    """A private verification record; files count as settled at once (no 3 s "racy" wait, tested on its own)."""
    path = tmp_path / "cache" / "verified.json"
    monkeypatch.setenv(package_module.RECORD_ENV, str(path))
    monkeypatch.delenv(package_module.VERIFY_ENV, raising=False)
    monkeypatch.setattr(package_module, "RACY_NS", 0)
    return path


@pytest.fixture
def package_copy(tiny_package, tmp_path):
    return shutil.copytree(tiny_package, tmp_path / "pkg")


@pytest.fixture
def hashed(monkeypatch):
    """The names of the files `sha256_file` hashes."""
    calls: list[str] = []
    real = package_module.sha256_file

    def counting(path, *args, **kwargs):
        calls.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(package_module, "sha256_file", counting)
    return calls


def test_an_unchanged_package_loads_without_hashing(package_copy, record, hashed, monkeypatch):
    files = set(ModelPackage.load(package_copy, verify=False).manifest["files"])
    ModelPackage.load(package_copy)
    assert set(hashed) == files  # first load: every file, then remembered
    assert set(json.loads(record.read_text())["files"]) == {str((package_copy / f).absolute()) for f in files}
    hashed.clear()
    ModelPackage.load(package_copy)
    assert hashed == []
    ModelPackage.load(package_copy, verify="always")  # forced: every file, whatever the record says
    assert set(hashed) == files
    hashed.clear()
    monkeypatch.setenv(package_module.VERIFY_ENV, "always")  # the environment forces it too
    ModelPackage.load(package_copy)
    assert set(hashed) == files


def test_a_file_rewritten_in_place_after_verification_is_hashed_and_refused(package_copy, record, hashed):
    ModelPackage.load(package_copy)
    graph = package_copy / DECODER
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(graph, "r+b") as f:  # same size, same inode: only mtime and ctime move
        f.write(data)
    hashed.clear()
    with pytest.raises(PackageError, match=r"decoder_model_fused\.onnx does not match its sha256"):
        ModelPackage.load(package_copy)
    assert hashed == [DECODER]  # the unchanged files came from the record


def test_a_file_replaced_with_its_mtime_set_back_is_still_hashed_and_refused(package_copy, record):
    ModelPackage.load(package_copy)
    graph = package_copy / DECODER
    before = os.stat(graph)
    data = bytearray(graph.read_bytes())
    data[-100] ^= 0xFF
    replacement = package_copy / "replacement.tmp"
    replacement.write_bytes(bytes(data))
    os.replace(replacement, graph)
    os.utime(graph, ns=(before.st_atime_ns, before.st_mtime_ns))  # what `touch -r` or a careful copy does
    after = os.stat(graph)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert (after.st_ino, after.st_ctime_ns) != (before.st_ino, before.st_ctime_ns)
    with pytest.raises(PackageError, match=r"decoder_model_fused\.onnx does not match its sha256"):
        ModelPackage.load(package_copy)


def test_a_remembered_file_whose_ctime_moved_is_hashed_again(package_copy, record, hashed):
    """Same content, same mtime, only the ctime moved (chmod): hashed again, found good, loads."""
    ModelPackage.load(package_copy)
    graph = package_copy / DECODER
    os.chmod(graph, 0o600)
    hashed.clear()
    ModelPackage.load(package_copy)
    assert hashed == [DECODER]


def test_an_unwritable_record_still_verifies_every_file_and_loads(package_copy, tmp_path, monkeypatch, hashed):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")  # mkdir fails, even for root
    monkeypatch.setenv(package_module.RECORD_ENV, str(blocker / "edgevlm" / "verified.json"))
    monkeypatch.setattr(package_module, "RACY_NS", 0)
    files = set(ModelPackage.load(package_copy, verify=False).manifest["files"])
    for _ in range(2):
        hashed.clear()
        ModelPackage.load(package_copy)
        assert set(hashed) == files


def test_a_damaged_record_is_ignored(package_copy, record, hashed):
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    ModelPackage.load(package_copy)
    assert hashed  # hashed in full, then the record is rewritten whole
    assert json.loads(record.read_text())["version"] == 1
    hashed.clear()
    ModelPackage.load(package_copy)
    assert hashed == []


def test_a_file_changed_just_before_its_hashing_is_not_remembered(package_copy, record, hashed, monkeypatch):
    """Coarse file timestamps (FAT: 2 s) could hide a same-size rewrite right after the hash: a file changed
    within RACY_NS of its hashing is hashed again next time (the package copy was just written)."""
    monkeypatch.setattr(package_module, "RACY_NS", 3_000_000_000)
    ModelPackage.load(package_copy)
    hashed.clear()
    ModelPackage.load(package_copy)
    assert hashed  # still hashed


def test_the_record_keeps_a_bounded_number_of_files(package_copy, record, monkeypatch):
    monkeypatch.setattr(package_module, "RECORD_LIMIT", 2)
    ModelPackage.load(package_copy)
    assert len(json.loads(record.read_text())["files"]) == 2


def test_model_load_verifies_beside_the_sessions_and_reports_the_corrupted_file(package_copy, record):
    """A graph made unreadable for onnxruntime (same size): the error is its sha256 mismatch, as before, not the
    onnxruntime parse error it also causes."""
    from edgevlm.runtime.vlm import VisionLanguageModel

    graph = package_copy / DECODER
    graph.write_bytes(b"\0" * graph.stat().st_size)
    with pytest.raises(PackageError, match=r"decoder_model_fused\.onnx does not match its sha256"):
        VisionLanguageModel.load(package_copy)


def test_a_deferred_vision_session_is_made_on_first_use(tiny_package, record):
    from edgevlm.runtime.vlm import VisionLanguageModel

    model = VisionLanguageModel.load(tiny_package, defer_vision=True)
    try:
        assert model.engine._vision is None
        session = model.engine.vision  # what the first image's run calls
        assert session is model.engine.open_vision() and model.engine._vision is session
    finally:
        model.close()
