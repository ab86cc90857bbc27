"""The one tensor-file module: checked safetensors headers, weights-only torch, atomic writes."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from conftest import tool

import goose_jax as gj
from goose_jax.core import tensorfile
from goose_jax.core.errors import (
    AdapterError,
    CheckpointError,
    GooseError,
    LibraryError,
    UnsafeCheckpointError,
)


def one_line(excinfo, path, *parts):
    message = str(excinfo.value)
    assert "\n" not in message and "\x1b" not in message, message
    assert str(path) in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


def _raw_safetensors(path, header, data: bytes, length: int | None = None):
    """A safetensors file written byte by byte, so its header can say anything."""
    text = json.dumps(header).encode()
    n = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + text + data)
    return path


# --- safetensors --------------------------------------------------------------------------------


def test_round_trip_lazy_and_eager(tmp_path):
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.arange(5, dtype=np.float32).astype(ml_dtypes.bfloat16),
               "empty": np.zeros((0, 3), np.int32)}
    path = tmp_path / "t.safetensors"
    tensorfile.write_safetensors(path, tensors, metadata={"format": "pt"})
    assert os.listdir(tmp_path) == ["t.safetensors"]  # no temporary file left behind
    lazy = tensorfile.SafetensorsFile(path)
    assert sorted(lazy) == ["a", "b", "empty"] and lazy.metadata == {"format": "pt"}
    assert lazy.shape_of("a") == (3, 4) and lazy.file_of("a") == str(path)
    for read in (tensorfile.read_safetensors(path), tensorfile.read_tensors(path),
                 {k: lazy[k] for k in lazy}):
        for key, want in tensors.items():
            assert read[key].dtype == want.dtype and read[key].shape == want.shape
            np.testing.assert_array_equal(read[key], want)
    fresh = tensorfile.read_safetensors(path)["a"]
    fresh += 1  # a writable array of its own, not a view of the file
    np.testing.assert_array_equal(tensorfile.read_safetensors(path)["a"], tensors["a"])


@pytest.mark.parametrize("cut", [4, 20, -7])
def test_truncated_safetensors_is_refused(tmp_path, cut):
    path = tmp_path / "t.safetensors"
    tensorfile.write_safetensors(path, {"a": np.ones((4, 4), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(AdapterError) as e:
        tensorfile.read_safetensors(path, error=AdapterError)
    one_line(e, path, "not a readable safetensors file (truncated or corrupt?)")


def test_header_that_lies_about_sizes(tmp_path):
    data = np.ones(4, np.float32).tobytes()  # 16 bytes
    lies = {
        "shape": {"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}},
        "offsets": {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}},
        "negative": {"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
        "overlap": {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
        "dtype": {"a": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}},
    }
    for name, header in lies.items():
        path = _raw_safetensors(tmp_path / f"{name}.safetensors", header, data)
        with pytest.raises(LibraryError) as e:
            tensorfile.read_safetensors(path, error=LibraryError)
        one_line(e, path, "not a readable safetensors file")
    honest = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    path = _raw_safetensors(tmp_path / "length.safetensors", honest, data, length=10 ** 6)
    with pytest.raises(CheckpointError) as e:
        tensorfile.SafetensorsFile(path)
    one_line(e, path, "header length 1000000 exceeds the file size")
    path = _raw_safetensors(tmp_path / "honest.safetensors", honest, data)
    np.testing.assert_array_equal(tensorfile.read_safetensors(path)["a"], np.ones(4))


def test_file_that_shrinks_after_opening(tmp_path):
    path = tmp_path / "t.safetensors"
    tensorfile.write_safetensors(path, {"a": np.ones((64,), np.float32)})
    lazy = tensorfile.SafetensorsFile(path)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError) as e:
        lazy["a"]
    one_line(e, path, "cannot read tensor a")


def test_dispatch_by_content_and_name(tmp_path):
    path = tmp_path / "best.pt"  # safetensors under a torch name: read by its contents
    tensorfile.write_safetensors(path, {"a": np.ones(3, np.float32)})
    assert tensorfile.is_safetensors(path)
    np.testing.assert_array_equal(tensorfile.read_tensors(path)["a"], np.ones(3))
    with pytest.raises(CheckpointError) as e:
        tensorfile.read_tensors(tmp_path / "nowhere.bin")
    one_line(e, tmp_path / "nowhere.bin", "cannot read")


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    tensorfile.write_safetensors(path, {"a": np.ones(3, np.float32)})

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorfile.os, "replace", full_disk)
    with pytest.raises(OSError):
        tensorfile.write_safetensors(path, {"a": np.zeros(5, np.float32)})
    with pytest.raises(OSError):
        tensorfile.write_atomic(path, "text")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["t.safetensors"]  # the temporary files are gone
    np.testing.assert_array_equal(tensorfile.read_safetensors(path)["a"], np.ones(3))


# --- torch pickles ------------------------------------------------------------------------------


class _RunsACommand:
    """Unpickling this object runs a shell command (what a weights-only loader must refuse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious_bin(path, marker, zip_format=True):
    torch = pytest.importorskip("torch")
    payload = {"shared.weight": torch.ones(2, 2), "hook": _RunsACommand(marker)}
    if zip_format:
        torch.save(payload, path)
    else:
        import pickle

        # A plain pickle (torch's legacy format) without tensors, so the command is what it asks
        # for first.
        path.write_bytes(pickle.dumps({"hook": payload["hook"]}, protocol=2))
    return path


def _check_refusal(e, path, marker):
    message = one_line(e, path, "refused: this pickle is not weights-only", "system")
    assert "weights_only" not in message  # torch's advice to turn the check off is not passed on
    assert "trust" not in message and "add_safe_globals" not in message
    assert not os.path.exists(marker), "the pickle ran its command"


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_refused_by_the_reader(tmp_path, zip_format):
    marker = tmp_path / "ran"
    path = _malicious_bin(tmp_path / "evil.bin", marker, zip_format)
    for error in (CheckpointError, AdapterError):
        with pytest.raises(UnsafeCheckpointError) as e:
            tensorfile.read_tensors(path, error=error)
        assert isinstance(e.value, error) and isinstance(e.value, GooseError)
        _check_refusal(e, path, marker)


def test_malicious_pickle_refused_on_the_model_path(tmp_path):
    from goose_jax.models import hf_folder
    from goose_jax.models.t5 import hf

    marker = tmp_path / "ran"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / hf_folder.CONFIG_NAME).write_text(json.dumps(gj.T5Config.preset("tiny").to_hf_dict()))
    path = _malicious_bin(folder / hf_folder.TORCH_WEIGHTS_NAME, marker)
    with pytest.raises(CheckpointError) as e:
        hf.load_hf_t5(folder)
    assert isinstance(e.value, UnsafeCheckpointError)
    _check_refusal(e, path, marker)


def test_malicious_pickle_refused_on_the_adapter_path(tmp_path, capsys):
    from goose_jax.interop.peft import ADAPTER_CONFIG, TORCH_WEIGHTS, load_peft_adapter

    marker = tmp_path / "ran"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "v"]}))
    path = _malicious_bin(folder / TORCH_WEIGHTS, marker)
    cfg = gj.T5Config.preset("tiny")
    with pytest.raises(UnsafeCheckpointError) as e:
        load_peft_adapter(folder, cfg)
    _check_refusal(e, path, marker)
    # The tool prints the same refusal as its one line on stderr and exits 1.
    base = tmp_path / "base"
    gj.save_hf_t5(cfg, gj.init_params(cfg, 0), base)
    capsys.readouterr()
    code = tool("goose-convert")(["peft", str(folder), "--base", str(base),
                                  "--out", str(tmp_path / "lib")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and str(path) in err, err
    assert "weights_only=False" not in err and "\x1b" not in err
    assert not os.path.exists(marker)


def test_corrupt_and_odd_torch_files(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "bad.bin"
    path.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(AdapterError) as e:
        tensorfile.read_torch(path, error=AdapterError)
    message = one_line(e, path, "not a readable PyTorch checkpoint")
    assert "weights_only=False" not in message and not isinstance(e.value, UnsafeCheckpointError)
    torch.save([torch.ones(2)], path)
    with pytest.raises(AdapterError) as e:
        tensorfile.read_torch(path, error=AdapterError)
    one_line(e, path, "expected a state dict", "found list")
    torch.save({"a": torch.arange(3, dtype=torch.bfloat16)}, path)
    a = tensorfile.read_tensors(path)["a"]
    assert a.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(a.astype(np.float32), [0, 1, 2])
