"""Recording for post-hoc EMA: snapshot files, the manifest, attach / every, exact resume."""

import copy
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

import emakit
from emakit.posthoc import Snapshots, read_manifest
from emakit.posthoc.manifest import MANIFEST

torch = pytest.importorskip("torch")


def _weights(n=5, dtype=np.float32):
    return {"a": np.zeros(n, dtype=dtype), "b": np.zeros((2, 3), dtype=dtype)}


def _run(rec, w, steps, rng, **update):
    for _ in range(steps):
        for v in w.values():
            v += (0.01 + rng.normal(size=v.shape)).astype(v.dtype)
        rec.update(**update)


def test_import_emakit_does_not_import_posthoc_and_posthoc_does_not_import_torch():
    code = ("import sys, emakit; assert 'emakit.posthoc' not in sys.modules; "
            "import emakit.posthoc; print(sorted(m for m in ('torch', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_snapshots_are_emakit_files_of_each_average_and_the_manifest_lists_them(tmp_path):
    w = _weights()
    rec = Snapshots(w, tmp_path / "snaps", snapshot_every=10)  # the folder is created
    rng = np.random.default_rng(0)
    _run(rec, w, 25, rng)
    manifest = read_manifest(tmp_path / "snaps")
    assert [(e.step, e.sigma_rel) for e in manifest.entries] == \
        [(10, 0.05), (10, 0.1), (20, 0.05), (20, 0.1)]
    assert manifest.gammas == rec.gammas and manifest.snapshot_every == 10
    assert rec.next_snapshot == 30 and rec.step == 25
    for e in manifest.entries:
        path = tmp_path / "snaps" / e.file
        assert path.stat().st_size == e.bytes
        state = emakit.read_state(path)  # an ordinary emakit file, checksums verified
        assert state["step"] == state["last_update_step"] == e.step
        assert state["decay"] == {"kind": "PowerFunction", "gamma": e.gamma,
                                  "sigma_rel": pytest.approx(e.sigma_rel)}
        assert {n: str(t.dtype) for n, t in state["shadows"].items()} == \
            {"a": "float32", "b": "float32"}
        assert state["header"]["user"]["posthoc.run"] == manifest.run


def test_the_files_hold_exactly_the_averages_at_their_steps(tmp_path):
    w = _weights()
    rec = Snapshots(w, tmp_path, snapshot_every=10)
    rng = np.random.default_rng(1)
    _run(rec, w, 20, rng)
    for k, ema in enumerate(rec.emas):
        state = emakit.read_state(tmp_path / f"s0000000020-ema{k}.safetensors")
        for name, value in ema.averaged().items():
            np.testing.assert_array_equal(state["shadows"][name], value)


def test_bf16_model_gives_fp32_snapshots_and_16_bit_shadows_are_refused(tmp_path):
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    rec = Snapshots(model, tmp_path / "a", snapshot_every=1)
    rec.update()
    state = emakit.read_state(tmp_path / "a" / "s0000000001-ema0.safetensors")
    assert {str(t.dtype) for t in state["shadows"].values()} == {"torch.float32"}
    assert state["source_dtypes"] == {"weight": "bfloat16", "bias": "bfloat16"}
    for dtype in (torch.float16, torch.bfloat16, "float16"):
        with pytest.raises(ValueError, match="snapshots are kept in float32 or wider"):
            Snapshots(model, tmp_path / "b", snapshot_every=1, dtype=dtype)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"snapshot_every": 0}, "snapshot_every must be an int >= 1"),
    ({"snapshot_every": 2.5}, "snapshot_every must be an int >= 1"),
    ({"snapshot_every": 10, "every": 3}, r"not a multiple of every=3.*snapshot_every=9"),
    ({"snapshot_every": 10, "sigma_rels": (0.05,)}, "two or more widths"),
    ({"snapshot_every": 10, "sigma_rels": "0.05"}, "two or more widths"),
    ({"snapshot_every": 10, "sigma_rels": (0.05, 0.05)}, "must be distinct"),
    ({"snapshot_every": 10, "sigma_rels": (0.05, 0.3)}, "sigma_rel must be in"),
    ({"snapshot_every": 10, "start": "zeros"}, "needs no zero start"),
    ({"snapshot_every": 10, "start": -1}, "start must be the optimizer step"),
])
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Snapshots(_weights(), tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()  # nothing created before the checks passed


def test_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        Snapshots(_weights(), tmp_path / "f", snapshot_every=10)


def test_every_k_updates_and_snapshots_on_multiples(tmp_path):
    w = _weights()
    rec = Snapshots(w, tmp_path, snapshot_every=12, every=4)
    changed = []
    for _ in range(30):
        w["a"] += 1.0
        changed.append(rec.update())
    assert changed == [(t % 4 == 0) for t in range(1, 31)]
    assert sorted({e.step for e in rec.entries()}) == [12, 24]
    assert read_manifest(tmp_path).every == 4


def test_explicit_steps_that_jump_snapshot_at_the_update_after_the_due_step(tmp_path):
    w = _weights()
    rec = Snapshots(w, tmp_path, snapshot_every=100)
    for step in (50, 90, 250, 260, 301):
        w["a"] += 1.0
        rec.update(step=step)
    assert sorted({e.step for e in rec.entries()}) == [250, 301]
    assert rec.next_snapshot == 400


def test_a_mid_run_start_counts_from_its_step(tmp_path):
    w = _weights()
    rec = Snapshots(w, tmp_path, snapshot_every=100, start=250)
    assert rec.next_snapshot == 300
    for step in range(251, 301):
        w["a"] += 1.0
        rec.update(step=step)
    assert sorted({e.step for e in rec.entries()}) == [300]


def test_attach_updates_once_per_optimizer_step(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Snapshots(model, tmp_path, snapshot_every=3)
    handle = rec.attach(opt)
    with pytest.raises(ValueError, match="attached: each step would update them twice"):
        rec.attach(opt)
    for _ in range(7):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    assert rec.step == 7 and sorted({e.step for e in rec.entries()}) == [3, 6]
    with pytest.raises(ValueError, match="would count the step twice"):
        rec.update()
    handle.remove()
    rec.update()  # by hand again
    assert rec.step == 8
    handle = rec.attach(opt)  # attach again after remove
    handle.remove()


def test_attach_needs_an_optimizer(tmp_path):
    rec = Snapshots(torch.nn.Linear(2, 2), tmp_path, snapshot_every=3)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        rec.attach(object())


def test_snapshot_now_writes_the_last_update_once(tmp_path):
    w = _weights()
    rec = Snapshots(w, tmp_path, snapshot_every=100)
    with pytest.raises(ValueError, match="before the first update"):
        rec.snapshot()
    _run(rec, w, 42, np.random.default_rng(3))
    paths = rec.snapshot()
    assert [p.name for p in paths] == ["s0000000042-ema0.safetensors",
                                       "s0000000042-ema1.safetensors"]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert rec.snapshot() == paths and [p.stat().st_mtime_ns for p in paths] == mtimes
    assert len(rec.entries()) == 2


def test_another_recordings_folder_is_refused_at_the_first_update(tmp_path):
    w = _weights()
    first = Snapshots(w, tmp_path, snapshot_every=5)
    _run(first, w, 5, np.random.default_rng(4))
    second = Snapshots(w, tmp_path, snapshot_every=5)  # the constructor cannot know yet
    with pytest.raises(ValueError, match=r"holds the snapshots of another recording.*new folder"):
        second.update()
    assert second.step == 0  # refused before anything was averaged
    third = Snapshots(w, tmp_path, snapshot_every=5, sigma_rels=(0.05, 0.1, 0.2))
    with pytest.raises(ValueError, match="another recording"):
        third.update()


def _straight_and_resumed(tmp_path, stop, total, rng_seed=5, every=1):
    """A run of ``total`` steps, and one saved at ``stop`` and resumed into fresh objects."""
    def trajectory():
        rng = np.random.default_rng(rng_seed)
        return [rng.normal(size=5).astype(np.float32) for _ in range(total)]

    steps = trajectory()
    w = {"a": np.zeros(5, np.float32)}
    straight = Snapshots(w, tmp_path / "straight", snapshot_every=4 * every, every=every)
    for x in steps:
        w["a"][:] = x
        straight.update()

    w = {"a": np.zeros(5, np.float32)}
    rec = Snapshots(w, tmp_path / "resumed", snapshot_every=4 * every, every=every)
    for x in steps[:stop]:
        w["a"][:] = x
        rec.update()
    saved = copy.deepcopy(rec.state_dict())  # what a checkpoint keeps (numpy: not torch.save)
    return steps, straight, saved, w["a"].copy()


@pytest.mark.parametrize("every", [1, 2])
def test_resume_is_exact(tmp_path, every):
    steps, _, saved, weights = _straight_and_resumed(tmp_path, 10, 30, every=every)
    w = {"a": weights}
    rec = Snapshots(w, tmp_path / "resumed", snapshot_every=4 * every, every=every)
    rec.load_state_dict(saved)
    assert rec.step == 10 and rec.next_snapshot == (12 if every == 1 else 16)
    for x in steps[10:]:
        w["a"][:] = x
        rec.update()
    a, b = read_manifest(tmp_path / "straight"), read_manifest(tmp_path / "resumed")
    assert [(e.step, e.gamma, e.file) for e in a.entries] == \
        [(e.step, e.gamma, e.file) for e in b.entries]
    for ea in a.entries:
        sa = emakit.read_state(tmp_path / "straight" / ea.file)["shadows"]
        sb = emakit.read_state(tmp_path / "resumed" / ea.file)["shadows"]
        np.testing.assert_array_equal(sa["a"], sb["a"])


def test_resume_from_an_earlier_checkpoint_drops_the_snapshots_written_after_it(tmp_path):
    steps, _, saved, _ = _straight_and_resumed(tmp_path, 10, 30)
    w = {"a": np.zeros(5, np.float32)}
    crashed = Snapshots(w, tmp_path / "resumed", snapshot_every=4)
    crashed.load_state_dict(saved)
    for x in steps[10:22]:  # the run went on past the checkpoint, then died
        w["a"][:] = x * 2.0  # (on other data: its snapshots must not survive)
        crashed.update()
    assert max(e.step for e in crashed.entries()) == 20
    rec = Snapshots(w, tmp_path / "resumed", snapshot_every=4)
    with pytest.warns(emakit.EMAWarning, match=r"dropped 6 snapshot files after step 10 "
                                               r"\(steps 12-20\)"):
        rec.load_state_dict(saved)
    assert sorted({e.step for e in read_manifest(tmp_path / "resumed").entries}) == [4, 8]
    assert not (tmp_path / "resumed" / "s0000000016-ema0.safetensors").exists()
    for x in steps[10:]:
        w["a"][:] = x
        rec.update()
    for e in read_manifest(tmp_path / "straight").entries:
        sa = emakit.read_state(tmp_path / "straight" / e.file)["shadows"]["a"]
        sb = emakit.read_state(tmp_path / "resumed" / e.file)["shadows"]["a"]
        np.testing.assert_array_equal(sa, sb)


def test_resume_into_a_folder_without_the_snapshots_warns(tmp_path):
    _, _, saved, _ = _straight_and_resumed(tmp_path, 10, 12)
    rec = Snapshots({"a": np.zeros(5, np.float32)}, tmp_path / "elsewhere", snapshot_every=4)
    with pytest.warns(emakit.EMAWarning, match="4 snapshot files were written.*lists 0"):
        rec.load_state_dict(saved)


def test_resume_with_another_snapshot_every_warns_and_keeps_the_current(tmp_path):
    _, _, saved, _ = _straight_and_resumed(tmp_path, 10, 12)
    rec = Snapshots({"a": np.zeros(5, np.float32)}, tmp_path / "resumed", snapshot_every=6)
    with pytest.warns(emakit.EMAWarning, match="snapshot_every=4.*use 6 from step 12"):
        rec.load_state_dict(saved)
    assert rec.snapshot_every == 6


def _corrupt(saved, **changes):
    bad = dict(saved)
    bad.update(changes)
    return bad


@pytest.mark.parametrize(("change", "message"), [
    ({"kind": "multi-ema"}, "not a Snapshots.state_dict"),
    ({"format_version": 2}, "unknown Snapshots format_version 2"),
    ({"run": "x" * 32}, "'run' must be 32 hex digits"),
    ({"next_snapshot": 0}, "'next_snapshot' must be an int >= 1"),
    ({"next_snapshot": True}, "'next_snapshot' must be an int >= 1"),
    ({"gammas": [1.0, 2.0]}, "Build the Snapshots with the saved sigma_rels"),
    ({"written": -1}, "'written' must be an int >= 0"),
    ({"snapshot_every": "4"}, "'snapshot_every' must be an int >= 0"),
    ({"emas": {"kind": "multi-ema", "members": []}}, "averages"),
])
def test_a_bad_state_loads_nothing(tmp_path, change, message):
    _, _, saved, _ = _straight_and_resumed(tmp_path, 10, 12)
    w = {"a": np.ones(5, np.float32)}
    rec = Snapshots(w, tmp_path / "resumed", snapshot_every=4)
    before = rec.state_dict()
    with pytest.raises(emakit.StateDictError, match=message):
        rec.load_state_dict(_corrupt(saved, **change))
    after = rec.state_dict()
    assert after["run"] == before["run"] and after["next_snapshot"] == before["next_snapshot"]
    assert rec.step == 0


def test_a_state_of_another_folders_run_is_refused(tmp_path):
    _, _, saved, _ = _straight_and_resumed(tmp_path, 10, 12)
    with pytest.raises(ValueError, match="another recording"):
        Snapshots({"a": np.zeros(5, np.float32)}, tmp_path / "straight",
                  snapshot_every=4).load_state_dict(saved)


def test_a_crash_while_writing_a_snapshot_keeps_the_manifest_and_retries(tmp_path, monkeypatch):
    w = _weights()
    rec = Snapshots(w, tmp_path, snapshot_every=5)
    rng = np.random.default_rng(6)
    _run(rec, w, 5, rng)
    manifest = (tmp_path / MANIFEST).read_bytes()
    calls = []
    real = emakit.save

    def failing(ema, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(ema, path, **kw)

    monkeypatch.setattr(emakit, "save", failing)
    _run(rec, w, 4, rng)
    with pytest.raises(OSError, match="No space left"):
        _run(rec, w, 1, rng)  # step 10: the second file fails
    assert (tmp_path / MANIFEST).read_bytes() == manifest  # still the list of step 5
    assert rec.step == 10 and rec.next_snapshot == 10
    monkeypatch.setattr(emakit, "save", real)
    _run(rec, w, 1, rng)  # step 11: due since step 10, written now
    assert sorted({e.step for e in rec.entries()}) == [5, 11]
    assert sorted({e.step for e in read_manifest(tmp_path).entries}) == [5, 11]


def test_the_manifest_is_plain_json_and_its_state_dict_saves_with_torch(tmp_path):
    model = torch.nn.Linear(3, 2)
    rec = Snapshots(model, tmp_path, snapshot_every=5)
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(0.1)
        rec.update()
    data = json.loads((tmp_path / MANIFEST).read_text())
    assert data["kind"] == "emakit-posthoc-snapshots" and data["format_version"] == 1
    assert set(data["snapshots"][0]) == {"step", "sigma_rel", "gamma", "file", "bytes",
                                         "header_crc32"}
    torch.save(rec.state_dict(), tmp_path / "s.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["written"] == 2 and state["kind"] == "posthoc-snapshots"
    fresh = Snapshots(torch.nn.Linear(3, 2), tmp_path, snapshot_every=5)
    fresh.load_state_dict(state)  # resumes the same recording, in the same folder
    assert fresh.step == 5 and fresh.next_snapshot == 10
