"""Weight files: formats by suffix, atomic replacement, clear errors for bad files."""

import os

import numpy as np
import pytest

import emakit
from emakit.io import atomic_path, read_weights, write_weights

torch = pytest.importorskip("torch")


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_torch_round_trip(tmp_path, suffix):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(2).bfloat16(),
               "t": torch.randn(4, 3).t()}  # non-contiguous
    write_weights(tensors, tmp_path / f"w{suffix}", metadata={"k": "v"})
    back, meta = read_weights(tmp_path / f"w{suffix}")
    assert meta == {"k": "v"}
    for k, v in tensors.items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_numpy_round_trip(tmp_path, suffix):
    arrays = {"a": np.random.default_rng(0).standard_normal((3, 2)), "i": np.arange(4)}
    write_weights(arrays, tmp_path / f"w{suffix}")
    back, meta = read_weights(tmp_path / f"w{suffix}", framework="numpy")
    assert meta == {}
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)


def test_tied_weights_are_saved_as_separate_copies(tmp_path):
    shared = torch.randn(4, 4)
    write_weights({"emb": shared, "head": shared}, tmp_path / "w.safetensors")
    back, _ = read_weights(tmp_path / "w.safetensors")
    assert torch.equal(back["emb"], shared) and torch.equal(back["head"], shared)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npz"])
def test_a_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch, suffix):
    """Killed after the data went out but before the rename: the old file stays, no temporary."""
    path = tmp_path / f"w{suffix}"
    write_weights({"a": torch.zeros(3)}, path)
    before = path.read_bytes()

    def crash(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        write_weights({"a": torch.ones(3)}, path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_atomic_path_replaces_only_on_success(tmp_path):
    dest = tmp_path / "x.txt"
    dest.write_text("old")
    def write_then_fail():
        with atomic_path(dest) as tmp:
            tmp.write_text("partial")
            raise ValueError("stop")

    with pytest.raises(ValueError, match="stop"):
        write_then_fail()
    assert dest.read_text() == "old" and _leftovers(tmp_path) == []
    with atomic_path(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new" and _leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError, match=r"does not exist\. Create it first"), \
            atomic_path(tmp_path / "nope" / "x.txt"):
        pass


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"cannot tell the file format of .*'\.bin'"):
        write_weights({"a": torch.zeros(1)}, tmp_path / "w.bin")
    with pytest.raises(ValueError, match=r"'h' is bfloat16, which numpy \(.npz\) cannot hold.*"
                                         r"--dtype float32.*\.safetensors or \.pt"):
        write_weights({"a": torch.zeros(1), "h": torch.zeros(1).bfloat16()}, tmp_path / "w.npz")
    assert not (tmp_path / "w.npz").exists()
    with pytest.raises(FileNotFoundError, match="no such weight file"):
        read_weights(tmp_path / "missing.safetensors")
    good = tmp_path / "good.safetensors"
    write_weights({"a": torch.zeros(100)}, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"truncated\.safetensors' is not a readable"):
        read_weights(truncated)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.pt' is not a readable \.pt weight file"):
        read_weights(junk)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="holds a list, not a dict of tensors"):
        read_weights(listed)
    with pytest.raises(ValueError, match="framework must be 'torch' or 'numpy'"):
        read_weights(good, framework="jax")


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"tensors": {"a": Evil()}}, path)
    with pytest.raises(ValueError, match=r"not a readable \.pt weight file"):
        read_weights(path)


def test_model_state_dict_is_the_whole_source_with_averages(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).to(torch.float16)
    ema = emakit.EMA(model, decay=0.5, policy=emakit.Policy(exclude=["1.running_var"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_var.fill_(4.0)
    ema.update()
    state = ema.model_state_dict(device="cpu")
    assert list(state) == list(model.state_dict())
    assert "1.running_var" not in ema.actions
    assert torch.equal(state["1.running_var"], model[1].running_var)  # untracked: as it is
    assert state["1.running_var"].data_ptr() != model[1].running_var.data_ptr()
    w = ema.averaged()["0.weight"]
    assert w.dtype == torch.float32 and state["0.weight"].dtype == torch.float16
    assert torch.equal(state["0.weight"], w.half())
    with ema.swapped():
        inside = ema.model_state_dict()
    for k in state:
        assert torch.equal(inside[k], state[k])


def test_npz_metadata_key_does_not_leak(tmp_path):
    write_weights({"a": np.zeros(1)}, tmp_path / "w.npz", metadata={"x": "1"})
    with np.load(tmp_path / "w.npz") as z:
        assert sorted(z.files) == ["__metadata__", "a"]
    back, meta = read_weights(tmp_path / "w.npz")
    assert list(back) == ["a"] and meta == {"x": "1"}


def test_pt_file_is_a_plain_state_dict(tmp_path):
    """A .pt weight file loads straight into a model; the metadata rides along as an attribute."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    write_weights(model.state_dict(), tmp_path / "m.pt", metadata={"emakit.step": "4"})
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    fresh.load_state_dict(loaded)  # strict: no extra keys
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values()))
    assert loaded.emakit_metadata == {"emakit.step": "4"}
    assert read_weights(tmp_path / "m.pt")[1] == {"emakit.step": "4"}


def test_pt_files_of_the_old_layout_still_read(tmp_path):
    """emakit 0.1.0 wrote {"tensors": ..., "metadata": ...}."""
    torch.save({"tensors": {"w": torch.ones(2)}, "metadata": {"emakit.step": "3"}},
               tmp_path / "old.pt")
    tensors, meta = read_weights(tmp_path / "old.pt")
    assert list(tensors) == ["w"] and meta == {"emakit.step": "3"}


def test_torch_tensors_go_to_npz_as_numpy(tmp_path):
    tensors = {"a": torch.randn(3, 2), "i": torch.arange(4), "h": torch.randn(2).half()}
    write_weights(tensors, tmp_path / "w.npz", metadata={"k": "v"})
    with np.load(tmp_path / "w.npz") as z:
        for k, v in tensors.items():
            np.testing.assert_array_equal(z[k], v.numpy())
    assert read_weights(tmp_path / "w.npz")[1] == {"k": "v"}


def test_a_tensor_named_like_an_npz_argument(tmp_path):
    """np.savez(file, **arrays) could not take an array named 'file'; the writer can."""
    write_weights({"file": np.ones(2), "allow_pickle": np.zeros(1)}, tmp_path / "w.npz")
    back, _ = read_weights(tmp_path / "w.npz")
    assert sorted(back) == ["allow_pickle", "file"]
