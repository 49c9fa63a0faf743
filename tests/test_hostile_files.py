"""Damaged, edited and hostile files: a clear error naming the file and key, work bounded by size.

Every bad file is built here (edited headers, flipped bits, hand-written pickles, torch.save
zips with a replaced pickle); nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

import emakit
from emakit.cli import main
from emakit.io.checkpoint import HEADER_CRC_KEY, HEADER_KEY
from emakit.io.export import export_weights
from emakit.io.layouts import read_checkpoint


def _saved(tmp_path: Path) -> tuple[Path, emakit.EMA]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = emakit.EMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    path = tmp_path / "ema.safetensors"
    emakit.save(ema, path)
    return path, ema


def _fresh() -> emakit.EMA:
    torch.manual_seed(1)
    return emakit.EMA(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)),
                      decay=0.5)


def _refused(path: Path, match: str, capsys: pytest.CaptureFixture[str]) -> None:
    """load, read_state and inspect all refuse ``path`` with ``match``; nothing changes."""
    ema = _fresh()
    before = {k: v.clone() for k, v in ema.averaged().items()}
    with pytest.raises(emakit.StateDictError, match=match):
        emakit.load(ema, path)
    assert ema.step == 0 and all(torch.equal(before[k], v) for k, v in ema.averaged().items())
    with pytest.raises(emakit.StateDictError, match=match):
        emakit.read_state(path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("emakit inspect: error: ")


def _edit_header(path: Path, raw: Any, *, keep_crc: bool = False) -> None:
    """Rewrite the JSON header text with ``raw(text) -> text``; recompute its checksum unless
    ``keep_crc`` (an edit, not damage, so the checks behind the checksum are tested)."""
    tensors = safetensors.torch.load_file(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    text = raw(meta[HEADER_KEY])
    crc = meta[HEADER_CRC_KEY] if keep_crc else f"{zlib.crc32(text.encode()) & 0xFFFFFFFF:08x}"
    safetensors.torch.save_file(tensors, path, metadata={HEADER_KEY: text, HEADER_CRC_KEY: crc})


def _set(key: str, value: str) -> Any:
    """An edit that sets header ``key`` to the JSON text ``value``."""
    def edit(text: str) -> str:
        header = json.loads(text)
        header[key] = "@@"
        return json.dumps(header).replace('"@@"', value)
    return edit


# ----------------------------------------------------------------------- malformed headers
EDITS = [
    ("shadow_dtypes", "[]", r"header key 'shadow_dtypes' must be a dict"),
    ("actions", "null", r"header key 'actions' must be a dict"),
    ("step", "Infinity", r"header key 'step' must be an int in \[0, 2\*\*63\), got inf"),
    ("step", "1e3", r"header key 'step' must be an int"),
    ("step", "-1", r"header key 'step' must be an int"),
    ("every", '"3"', r"header key 'every' must be an int >= 1, got '3'"),
    ("every", "0", r"header key 'every' must be an int >= 1"),
    ("format_version", "true", r"header key 'format_version' must be the int 1, got True"),
    ("format_version", "1.0", r"header key 'format_version' must be the int 1, got 1.0"),
    ("format_version", "[1]", r"header key 'format_version' must be the int 1"),
    ("decay_product", "NaN", r"header key 'decay_product' must be a number in \[0, 1\]"),
    ("decay_product", '"0"', r"header key 'decay_product' must be a number in \[0, 1\]"),
    ("init", '"ones"', r"header key 'init' must be 'copy' or 'zeros'"),
    ("backend", "3", r"header key 'backend' must be 'torch' or 'numpy'"),
    ("decay", '{"kind": "Nope"}', r"header key 'decay' is a schedule of kind 'Nope', which this process "
                                      r"does not know"),
    ("decay", '{"kind": ["x"]}', r"header key 'decay' is not a schedule emakit knows"),
    ("decay", '{"kind": "Constant", "decay": "0.5"}', r"header key 'decay' is not a schedule"),
    ("policy", "7", r"header key 'policy' must be a dict"),
    ("source_dtypes", '{"0.weight": "float33"}',
     r"header key 'source_dtypes' must map names to a dtype name; '0.weight' -> 'float33'"),
    ("shadow_dtypes", '{"0.weight": 3}', r"header key 'shadow_dtypes' must map names to a dtype name"),
    ("nonfinite_skips", '{"0.weight": "x"}', r"header key 'nonfinite_skips' must map names to an int"),
    ("nonfinite_skips", '{"0.weight": 1e30}', r"header key 'nonfinite_skips' must map names to an int"),
    ("nonfinite_skips", '"oops"', r"header key 'nonfinite_skips' must be a dict"),
    ("user", '{"run": 1}', r"header key 'user' must map names to a str"),
    ("half_life", '"long"', r"header key 'half_life' must be a number or null"),
    ("checksums", '{"algorithm": "md5"}', r"header key 'checksums' must be"),
    ("last_update_step", "99", r"header key 'last_update_step' \(99\) is after 'step' \(1\)"),
    ("step", "1" + "0" * 5000, r"header entry 'emakit' is not valid JSON"),
    ("policy", "[" * 100_000 + "]" * 100_000, r"header entry 'emakit' is nested too deeply"),
    ("policy", "[" * 40 + "]" * 40, r"the header nests deeper than 16 levels"),
]


@pytest.mark.parametrize(("key", "value", "match"), EDITS,
                         ids=[f"{k}={v[:12]}" for k, v, _ in EDITS])
def test_malformed_header_is_a_state_dict_error(tmp_path: Path, key: str, value: str, match: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _saved(tmp_path)
    _edit_header(path, _set(key, value))
    _refused(path, r"ema\.safetensors': " + match, capsys)


def test_malformed_torch_state_is_a_state_dict_error(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An ema.state_dict() inside torch.save gets the same checks when inspected or exported."""
    _, ema = _saved(tmp_path)
    for key, value, match in [("every", "3", r"state key 'every' must be an int >= 1, got '3'"),
                              ("format_version", True, r"state key 'format_version' must be the int 1"),
                              ("actions", None, r"state key 'actions' must be a dict"),
                              ("shadows", [1], r"state key 'shadows' must map names to tensors")]:
        state = ema.state_dict()
        state[key] = value
        torch.save({"ema": state}, tmp_path / "train.pt")
        with pytest.raises(emakit.StateDictError, match=r"train\.pt'\['ema'\]: " + match):
            read_checkpoint(tmp_path / "train.pt")
        assert main(["export", str(tmp_path / "train.pt"), "--out",
                     str(tmp_path / "m.safetensors")]) == 2
        assert "emakit export: error: " in capsys.readouterr().err


@pytest.mark.parametrize(("obj", "match"), [
    ({"current_model_state": {}, "state_dict": {"w": torch.ones(1)}, "averaging_state": 3},
     None),  # a non-dict averaging state is "not recorded"
    ({"shadow_params": [torch.ones(1)], "decay": "0.9", "num_updates": 1},
     r"'decay' must be a finite number, got '0.9'"),
    ({"shadow_params": [torch.ones(1)], "decay": 2.0, "num_updates": 1},
     r"'decay' is not a valid decay"),
    ({"shadow_params": [torch.ones(1)], "optimization_step": 3, "use_ema_warmup": True,
      "inv_gamma": [1]}, r"'inv_gamma' must be a finite number"),
    ({"ema_model.w": torch.ones(1), "initted": torch.ones(3), "step": 2}, None),
    ({"ema_model.w": torch.ones(1), "step": float("inf")}, None),
    ({"ema": {"w": "not a tensor"}, "updates": 1}, r"entry 'w' is not a dense tensor"),
])
def test_malformed_foreign_files(tmp_path: Path, obj: dict[str, Any], match: str | None) -> None:
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    if match is None:
        found = read_checkpoint(path, names=["w"])
        assert list(found.weights) == ["w"]
        return
    with pytest.raises(emakit.StateDictError, match=r"x\.pt'.*" + match):
        read_checkpoint(path, names=["w"])


# ------------------------------------------------------------------------------ checksums
def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_a_flipped_bit_in_a_tensor_is_caught(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path, ema = _saved(tmp_path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        layout = json.loads(f.read(n))
    begin = layout["0.weight"]["data_offsets"][0]
    _flip(path, _data_start(path) + begin + 1)  # a low mantissa bit of 0.weight[0, 0]
    _refused(path, r"ema\.safetensors': tensor '0\.weight' does not match its checksum "
                   r"\(crc32 stored [0-9a-f]{8}, computed [0-9a-f]{8}\).*verify=False", capsys)
    fresh = _fresh()
    emakit.load(fresh, path, verify=False)  # the opt-out reads the damaged value
    got, want = fresh.averaged()["0.weight"], ema.averaged()["0.weight"]
    assert not torch.equal(got, want) and torch.allclose(got, want, rtol=1e-3)
    assert main(["inspect", str(path), "--no-verify"]) == 0
    assert "crc32 of the header and every tensor, not verified" in capsys.readouterr().out


def test_a_flipped_digit_in_the_header_is_caught(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _saved(tmp_path)

    def one_digit(text: str) -> str:
        key = '"decay_product": 0.5'
        assert key in text
        return text.replace(key, '"decay_product": 0.4')

    _edit_header(path, one_digit, keep_crc=True)
    _refused(path, r"ema\.safetensors': the header does not match its checksum", capsys)
    fresh = _fresh()
    emakit.load(fresh, path, verify=False)  # skips the check
    assert fresh.state_dict()["decay_product"] == 0.4


def test_a_removed_header_checksum_is_caught(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _saved(tmp_path)
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    safetensors.torch.save_file(tensors, path, metadata={HEADER_KEY: meta[HEADER_KEY]})
    _refused(path, r"records tensor checksums but its own checksum entry "
                   r"'emakit\.header_crc32' is missing", capsys)


def test_files_without_checksums_still_load(tmp_path: Path) -> None:
    """A file written before checksums (no 'checksums' key, no header CRC) loads unchecked."""
    path, ema = _saved(tmp_path)

    def strip(text: str) -> str:
        header = json.loads(text)
        del header["checksums"]
        return json.dumps(header)

    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        text = strip(f.metadata()[HEADER_KEY])
    safetensors.torch.save_file(tensors, path, metadata={HEADER_KEY: text})
    fresh = _fresh()
    emakit.load(fresh, path)
    assert torch.equal(fresh.averaged()["0.weight"], ema.averaged()["0.weight"])
    assert "no checksums" in " ".join(read_checkpoint(path).notes)


def test_numpy_checkpoints_are_checked_too(tmp_path: Path) -> None:
    w = {"w": np.arange(6, dtype=np.float64).reshape(2, 3)}
    ema = emakit.EMA(w, decay=0.5)
    emakit.save(ema, tmp_path / "n.safetensors")
    _flip(tmp_path / "n.safetensors", _data_start(tmp_path / "n.safetensors") + 9, 3)
    with pytest.raises(emakit.StateDictError, match="tensor 'w' does not match its checksum"):
        emakit.load(emakit.EMA({"w": np.zeros((2, 3))}, decay=0.5), tmp_path / "n.safetensors")


# ------------------------------------------------------------------------ hostile pickles
def _with_pickle(tmp_path: Path, name: str, payload: bytes) -> Path:
    """A torch.save zip whose data.pkl is replaced by ``payload``."""
    good = tmp_path / "good.pt"
    torch.save({"ema": {"w": torch.ones(2)}, "updates": 1}, good)
    path = tmp_path / name
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, payload if item.filename.endswith("/data.pkl") else data)
    return path


def _peak_bytes(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


GLOBAL = b"c" + b"ultralytics.nn.tasks\nDetectionModel\n"  # refused by weights_only: read inert


@pytest.mark.parametrize(("payload", "match"), [
    (b"\x80\x02" + GLOBAL + b"r\xff\xff\xff\x7f.", r"LONG_BINPUT at byte \d+ stores memo index "
                                                   r"2,147,483,647 after only 3 opcodes"),
    (b"\x80\x02" + GLOBAL + b"B" + (2**32 - 16).to_bytes(4, "little") + b"x.",
     r"malformed pickle after 2 opcodes: expected 4294967280 bytes"),
])
def test_a_tiny_pickle_cannot_allocate_gigabytes(tmp_path: Path, payload: bytes,
                                                 match: str) -> None:
    path = _with_pickle(tmp_path, "memo.pt", payload)
    assert len(payload) < 64

    def read() -> None:
        with pytest.raises(ValueError, match=r"memo\.pt' is not a readable torch checkpoint: "
                                             + match):
            read_checkpoint(path)

    assert _peak_bytes(read) < 50 * 2**20


def _shared_dag(depth: int) -> torch.nn.Module:
    """``depth`` levels, each a module holding the one below twice (2**depth paths)."""
    module = torch.nn.Linear(2, 2)
    for _ in range(depth):
        parent = torch.nn.Module()
        parent.a = module
        parent.b = module
        module = parent
    return module


def test_modules_shared_along_many_paths_are_walked_once(tmp_path: Path) -> None:
    torch.save({"ema": _shared_dag(40), "updates": 5}, tmp_path / "dag.pt")
    assert (tmp_path / "dag.pt").stat().st_size < 20_000
    found = read_checkpoint(tmp_path / "dag.pt")
    assert found.layout == "ultralytics"
    assert list(found.weights) == ["a." * 40 + "weight", "a." * 40 + "bias"]  # first path only


def test_a_module_that_contains_itself(tmp_path: Path) -> None:
    looped = torch.nn.Linear(2, 2)
    looped._modules["again"] = looped
    torch.save({"ema": looped, "updates": 5}, tmp_path / "loop.pt")
    found = read_checkpoint(tmp_path / "loop.pt")
    assert list(found.weights) == ["weight", "bias"]


def test_an_expanded_tensor_is_refused(tmp_path: Path) -> None:
    """One stored float viewed as 750M elements (stride 0): refused, nothing written."""
    torch.save({"w": torch.zeros(1).expand(750_000_000)}, tmp_path / "wide.pt")
    assert (tmp_path / "wide.pt").stat().st_size < 2_000
    with pytest.raises(emakit.StateDictError,
                       match=r"wide\.pt': tensor 'w' has 750,000,000 elements but its storage "
                             r"holds 1 \(expanded or overlapping strides\)"):
        export_weights(tmp_path / "wide.pt", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_one_tensor_under_thousands_of_names_is_refused(tmp_path: Path) -> None:
    shared = torch.zeros(25_000)  # 100 KB, stored once
    torch.save({f"w{i}": shared for i in range(3000)}, tmp_path / "names.pt")
    size = (tmp_path / "names.pt").stat().st_size
    assert size < 300_000
    with pytest.raises(emakit.StateDictError,
                       match=r"names\.pt': the tensors take 300,000,000 bytes under their 3,000 "
                             r"names, more than 4x the file's"):
        export_weights(tmp_path / "names.pt", tmp_path / "out.safetensors")
    tied = torch.zeros(25_000)  # tied weights (two names) are fine
    torch.save({"emb": tied, "head": tied}, tmp_path / "tied.pt")
    assert export_weights(tmp_path / "tied.pt", tmp_path / "out.safetensors").tensors == 2


def test_a_global_naming_a_lazy_torch_module_imports_nothing(tmp_path: Path) -> None:
    path = _with_pickle(tmp_path, "dyn.pt", b"\x80\x02ctorch\n_dynamo\nq\x00.")
    code = ("import sys; from emakit.io.layouts import read_checkpoint\n"
            "try:\n"
            f"    read_checkpoint({str(path)!r})\n"
            "except ValueError as exc:\n"
            "    print(type(exc).__name__)\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["ValueError", "False"]


def test_hand_written_inert_pickle_is_bounded() -> None:
    """The opcode scan runs before the C unpickler for every pickle read inert."""
    from emakit.io import inert_pickle

    good = pickle.dumps({"a": [1, 2, 3]}, protocol=2)
    assert inert_pickle.Unpickler(io.BytesIO(good)).load() == {"a": [1, 2, 3]}
    bad = b"\x80\x02]r\xe8\x03\x00\x00."  # a list stored at memo index 1000
    with pytest.raises(pickle.UnpicklingError, match="memo index 1,000 after only 3 opcodes"):
        inert_pickle.Unpickler(io.BytesIO(bad)).load()


def test_a_compressed_archive_cannot_expand_much(tmp_path: Path) -> None:
    """A 20 MB array of zeros compressed into an .npz of a few KB is refused before reading."""
    np.savez_compressed(tmp_path / "bomb.npz", w=np.zeros(5_000_000, dtype=np.float32))
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000

    def read() -> None:
        with pytest.raises(emakit.StateDictError, match=r"bomb\.npz': its zip members expand to "
                                                        r"20,000,\d+ bytes, more than 4x"):
            read_checkpoint(tmp_path / "bomb.npz")
        with pytest.raises(ValueError, match=r"savez_compressed"):
            emakit.io.read_weights(tmp_path / "bomb.npz")

    assert _peak_bytes(read) < 5 * 2**20
    np.savez_compressed(tmp_path / "fine.npz", w=np.random.default_rng(0).standard_normal(1000))
    assert list(read_checkpoint(tmp_path / "fine.npz").weights) == ["w"]
