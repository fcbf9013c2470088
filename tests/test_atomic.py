"""Crash-safe writes (tcd_ds/atomic.py) give files the mode of any file the user writes (umask)."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from tcd_ds import atomic


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_is_read_without_changing_it(umask):
    assert atomic.current_umask() == umask
    assert atomic.current_umask() == umask
    assert atomic.user_file_mode() == 0o666 & ~umask


def test_safetensors_get_the_users_mode_not_0600(umask, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "model.safetensors"
    atomic.save_safetensors_atomic({"w": torch.arange(6.0).view(2, 3)}, path, metadata={"format": "pt"})
    assert mode(path) == 0o666 & ~umask  # 0644 under the usual umask; safetensors alone writes 0600
    assert torch.equal(load_file(path)["w"], torch.arange(6.0).view(2, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_text_and_json_get_the_users_mode_and_replace_atomically(umask, tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    os.chmod(path, 0o600)
    atomic.write_json_atomic(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n' and mode(path) == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "latest"
    path.write_text("step_1\n")

    def fail(tmp):
        tmp.write_text("step_2 (cut off")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic.write_atomic(path, fail)
    assert path.read_text() == "step_1\n" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_export_weights_get_the_users_mode(tmp_path):
    from tcd_ds.config import ModelConfig
    from tcd_ds.model.bert import BertForMaskedLM
    from tcd_ds.model.hf import save_pretrained

    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position=16)
    out = save_pretrained(BertForMaskedLM(cfg), cfg, tmp_path / "export")
    assert mode(out / "model.safetensors") == atomic.user_file_mode() == mode(out / "config.json")


def test_read_json_and_jsonl_tolerate_missing_and_torn_files(tmp_path):
    path = tmp_path / "done.json"
    assert atomic.read_json(path) is None  # missing
    atomic.write_json_atomic(path, {"a": [1, 2]})
    assert atomic.read_json(path) == {"a": [1, 2]}
    path.write_text('{"a": [1,')  # cut off
    assert atomic.read_json(path) is None
    path.write_bytes(b"\xff\xfe")  # not UTF-8
    assert atomic.read_json(path) is None

    lines = tmp_path / "runs.jsonl"
    assert atomic.read_jsonl(lines) == []
    lines.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')  # a torn last line
    bad = []
    assert atomic.read_jsonl(lines, lambda n, line: bad.append((n, line))) == [{"step": 1}, {"step": 2}]
    assert bad == [(4, '{"step": 3, "lo')]
