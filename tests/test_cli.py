"""The emakit command line: demo, smooth, plan -- the paths a user takes, bad input included."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emakit.cli import main

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pd = pytest.importorskip("pandas")

PNG = b"\x89PNG\r\n\x1a\n"


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _demo(capsys, tmp_path, *extra, name="out"):
    out = tmp_path / name
    rc, stdout, err = _run(capsys, "demo", "--epochs", 2, "--out", out, "--no-progress", *extra)
    assert rc == 0, err
    return out, stdout


# ---------------------------------------------------------------------------------- demo
def test_demo_writes_table_checkpoint_report_and_picture(capsys, tmp_path):
    out, stdout = _demo(capsys, tmp_path)
    assert "epoch  raw acc  EMA acc  train loss  decay" in stdout
    assert "test accuracy: final raw weights" in stdout
    report = json.loads((out / "report.json").read_text())
    assert [r["epoch"] for r in report["epochs"]] == [1, 2]
    assert report["settings"]["split"] == {"train": 1078, "val": 359, "test": 360}
    assert set(report["timings"]) == {"total_s", "train_s", "eval_and_save_s"}
    assert (out / "curves.png").read_bytes()[:8] == PNG
    # The kept file is the EMA at the best epoch and loads into a plain model.
    from safetensors.torch import load_file

    from emakit.cli import demo

    model = demo._model((1, 1, 8, 8), 10)
    model.load_state_dict(load_file(out / "best_ema.safetensors"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {"epoch", "model", "optimizer", "ema", "keep_best"}
    best = report["best"]
    assert ckpt["keep_best"]["best"] == best["val_ema_acc"] == report["summary"]["best_ema_val_acc"]
    # With the warmup the EMA still improves at epoch 2 (seed 0), so the kept file holds the
    # final shadows, cast to the model's dtypes.
    assert best["epoch"] == 2 and ckpt["keep_best"]["best_step"] == ckpt["ema"]["step"]
    for k, v in ckpt["ema"]["shadows"].items():
        assert torch.equal(model.state_dict()[k], v.to(model.state_dict()[k].dtype)), k
    # The emakit.save file holds the same EMA state as the torch checkpoint.
    import emakit

    saved = emakit.read_state(out / "ema.safetensors")
    assert saved["step"] == ckpt["ema"]["step"] and saved["header"]["user"] == {"epoch": "2"}
    assert all(torch.equal(saved["shadows"][k], v) for k, v in ckpt["ema"]["shadows"].items())
    assert "emakit inspect" in stdout


def test_demo_is_deterministic_for_a_seed(capsys, tmp_path):
    a, _ = _demo(capsys, tmp_path, "--seed", 3, name="a")
    b, _ = _demo(capsys, tmp_path, "--seed", 3, name="b")
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    for row in ra["epochs"] + rb["epochs"]:
        row.pop("seconds")
    assert ra["epochs"] == rb["epochs"] and ra["summary"] == rb["summary"]
    from emakit.io import read_weights

    (ta, ma), (tb, mb) = (read_weights(p / "best_ema.safetensors") for p in (a, b))
    assert ma == mb and list(ta) == list(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_demo_runs_single_threaded_by_default_and_restores_the_callers_settings(capsys,
                                                                              tmp_path):
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(2)
        torch.use_deterministic_algorithms(False)
        a, _ = _demo(capsys, tmp_path, name="a")
        assert json.loads((a / "report.json").read_text())["settings"]["threads"] == 1
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
        b, _ = _demo(capsys, tmp_path, "--threads", 2, name="b")
        assert json.loads((b / "report.json").read_text())["settings"]["threads"] == 2
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
        # a failing run restores them too
        rc, _, err = _run(capsys, "demo", "--epochs", 1, "--out", tmp_path / "c",
                          "--no-progress", "--threads", 1, "--data", tmp_path / "missing.npz")
        assert rc == 2 and "no such file" in err
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def test_demo_decay_option(capsys, tmp_path):
    out, _stdout = _demo(capsys, tmp_path, "--decay", "0.9")
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["schedule"] == {"kind": "TFWarmup", "decay": 0.9}


@pytest.mark.parametrize("shape", [(60, 5), (60, 6, 6), (60, 2, 5, 5)])
def test_demo_on_user_data(capsys, tmp_path, shape):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, shape[0]) * 10 + 5  # any integer labels
    x = rng.standard_normal(shape) + (y // 10).reshape((-1,) + (1,) * (len(shape) - 1))
    np.savez(tmp_path / "mine.npz", X=x, y=y)
    out, _stdout = _demo(capsys, tmp_path, "--data", tmp_path / "mine.npz")
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["data"] == "mine.npz (60 samples, 3 classes)"


def _bad_npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing.npz", "no such file"),
    (lambda p: (p / "t.npz").write_text("hello") and p / "t.npz", "is not a readable .npz file"),
    (lambda p: _bad_npz(p, X=np.zeros((30, 2))), r"lacks the array\(s\) \['y'\]"),
    (lambda p: _bad_npz(p, X=np.zeros((30, 2)), y=np.zeros(29)), "one label per row of X"),
    (lambda p: _bad_npz(p, X=np.zeros((30, 2)), y=np.full(30, 0.5)), "integer class labels"),
    (lambda p: _bad_npz(p, X=np.full((30, 2), np.nan), y=np.arange(30) % 2), "NaN or infinite"),
    (lambda p: _bad_npz(p, X=np.zeros((30, 2)), y=np.zeros(30)), "2 classes"),
    (lambda p: _bad_npz(p, X=np.zeros(30), y=np.arange(30) % 2), "X must be numbers shaped"),
])
def test_demo_bad_data(capsys, tmp_path, make, message):
    rc, _, err = _run(capsys, "demo", "--epochs", 1, "--out", tmp_path / "o", "--no-progress",
                      "--data", make(tmp_path))
    assert rc == 2
    assert err.startswith("emakit demo: error: --data")
    assert re.search(message, err), err
    assert not (tmp_path / "o" / "best_ema.safetensors").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--decay", "1.5"], r"--decay must be in \[0, 1\], got 1.5"),
    (["--half-life", "-3"], "--half-life must be a number of steps > 0, got -3.0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
])
def test_demo_bad_options(capsys, tmp_path, args, message):
    rc, _, err = _run(capsys, "demo", "--out", tmp_path, *args)
    assert rc == 2 and re.search(message, err), err


def test_demo_decay_and_half_life_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--decay", "0.9", "--half-life", "10"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_defaults_the_ema_wins(capsys, tmp_path):
    """The default run: the EMA beats the training weights. How long it takes is measured in
    benchmarks/demo_gain.py, not asserted here (a shared machine can be any amount slower)."""
    rc, _stdout, err = _run(capsys, "demo", "--out", tmp_path, "--no-progress")
    assert rc == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["epochs"]) == 30
    s = report["summary"]
    assert s["best_ema_val_acc"] > s["best_raw_val_acc"]
    assert s["test_acc_best_ema"] > s["test_acc_final_raw"]


def test_python_dash_m_and_version():
    done = subprocess.run([sys.executable, "-m", "emakit", "--version"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.startswith("emakit ")
    bad = subprocess.run([sys.executable, "-m", "emakit", "plan", "--decay", "7"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "emakit plan: error: --decay must be in [0, 1]" in bad.stderr


# -------------------------------------------------------------------------------- smooth
def _log_csv(path, n=300):
    rng = np.random.default_rng(1)
    loss = 2 * np.exp(-np.arange(n) / 100) + rng.random(n)
    rows = ["step,loss,lr"] + [f"{i + 1},{'' if i == 5 else v},0.1" for i, v in enumerate(loss)]
    path.write_text("\n".join(rows) + "\n")
    loss[5] = np.nan
    return loss


def test_smooth_keeps_every_digit_of_a_wall_clock_x(capsys, tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,loss,time\n1,0.5,1717171717.123456\n2,0.25,1717171717.5\n")
    rc, out, _ = _run(capsys, "smooth", log, "--column", "loss", "--alpha", "0.5", "--x", "time")
    assert rc == 0
    assert [line.split(",")[0] for line in out.splitlines()[1:]] == ["1717171717.123456",
                                                                      "1717171717.5"]


def test_smooth_checks_the_plot_folder_before_writing_anything(capsys, tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,loss\n1,0.5\n2,0.4\n")
    rc, _, err = _run(capsys, "smooth", log, "--column", "loss", "--alpha", "0.5",
                      "--out", tmp_path / "ok.csv", "--plot", tmp_path / "missing" / "x.png")
    assert rc == 2 and "does not exist; create it first. Nothing was written." in err
    assert not (tmp_path / "ok.csv").exists()


def test_smooth_names_a_folder_as_a_folder(capsys, tmp_path):
    rc, _, err = _run(capsys, "smooth", tmp_path, "--column", "loss", "--alpha", "0.1")
    assert rc == 2 and "is a folder; give the log file" in err


def test_smooth_csv_matches_pandas(capsys, tmp_path):
    loss = _log_csv(tmp_path / "log.csv")
    rc, _out, _ = _run(capsys, "smooth", tmp_path / "log.csv", "--column", "loss",
                      "--half-life", 20, "--out", tmp_path / "s.csv", "--plot", tmp_path / "s.png")
    assert rc == 0
    table = pd.read_csv(tmp_path / "s.csv")
    assert list(table.columns) == ["step", "loss", "loss_smoothed"]
    want = pd.Series(loss).ewm(halflife=20).mean().to_numpy()
    np.testing.assert_allclose(table["loss_smoothed"], want, rtol=1e-9)
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG


def test_smooth_jsonl_to_stdout_skips_other_records(capsys, tmp_path):
    lines = [{"step": 1, "loss": 4.0}, {"step": 1, "val_acc": 0.5}, {"step": 2, "loss": None},
             {"step": 3, "loss": 2.0}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rc, out, _ = _run(capsys, "smooth", tmp_path / "log.jsonl", "--column", "loss",
                      "--alpha", 0.4, "--no-adjust")
    assert rc == 0
    # (0.6^2 * 4 + 0.4 * 2) / (0.6^2 + 0.4): the gap decays the old weight twice, as in pandas
    assert out.splitlines() == ["step,loss,loss_smoothed", "1,4,4", "2,,4", "3,2,2.947368421"]
    want = pd.Series([4.0, np.nan, 2.0]).ewm(alpha=0.4, adjust=False).mean().iloc[-1]
    assert want == pytest.approx(2.947368421)


@pytest.mark.parametrize(("content", "args", "message"), [
    (None, [], "no such file"),
    ("", [], "is empty"),
    ("step,loss\n", [], "has a header but no rows"),
    ("step,los\n1,2\n", [], "has no column 'loss'; its columns are step, los"),
    ("step,loss\n1,abc\n", [], r"log\.csv:2: 'loss' is 'abc', not a number"),
    ('{"loss": 1}\n{"loss": \n', [], r"log\.csv:2: not valid JSON"),
    ('{"acc": 1}\n', [], "no line has the key 'loss'"),
    ("step,loss\n1,2\n", ["--x", "epoch"], "has no column 'epoch' for --x"),
    ("step,loss\n1,2\n", ["--alpha", "0"], r"alpha must be in \(0.0, 1.0\], got 0.0"),
])
def test_smooth_bad_input(capsys, tmp_path, content, args, message):
    path = tmp_path / "log.csv"
    if content is not None:
        path.write_text(content)
    how = [] if any(a.startswith("--alpha") for a in args) else ["--span", "3"]
    rc, _out, err = _run(capsys, "smooth", path, "--column", "loss", *how, *args)
    assert rc == 2 and err.startswith("emakit smooth: error:")
    assert re.search(message, err), err


def test_smooth_never_writes_over_its_input(capsys, tmp_path):
    _log_csv(tmp_path / "log.csv")
    before = (tmp_path / "log.csv").read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.csv").symlink_to(tmp_path / "log.csv")
    for flag, target in [("--out", tmp_path / "log.csv"), ("--out", tmp_path / "sub/../log.csv"),
                         ("--out", tmp_path / "link.csv"), ("--plot", tmp_path / "log.csv")]:
        rc, _out, err = _run(capsys, "smooth", tmp_path / "log.csv", "--column", "loss",
                             "--span", 3, flag, target)
        assert rc == 2 and f"{flag} " in err and "is the input file itself" in err, err
    assert (tmp_path / "log.csv").read_bytes() == before
    rc, _out, err = _run(capsys, "smooth", tmp_path / "log.csv", "--column", "loss", "--span", 3,
                         "--out", tmp_path / "x", "--plot", tmp_path / "x")
    assert rc == 2 and "--out and --plot are the same file" in err
    assert not (tmp_path / "x").exists()


def test_smooth_missing_values_are_the_documented_spellings(capsys, tmp_path):
    """Empty, nan, na, null, none (any case), inf, -inf and overflowing numbers are missing."""
    cells = ["1", "", "NaN", "NA", "null", "None", "inf", "-Infinity", "1e999", "4", " 2 "]
    # blank lines are no rows (as csv.DictReader has it); a quoted empty cell is a missing value
    (tmp_path / "log.csv").write_text("loss\n\n" + "\n".join(f'"{c}"' for c in cells) + "\n\n")
    rc, out, _ = _run(capsys, "smooth", tmp_path / "log.csv", "--column", "loss", "--alpha", 0.3)
    assert rc == 0
    rows = [line.split(",") for line in out.splitlines()[1:]]
    raw = np.array([float(c) if c.strip().lower() not in ("", "nan", "na", "null", "none")
                    else np.nan for c in cells])
    want = pd.Series(raw).ewm(alpha=0.3).mean().to_numpy()  # pandas: +-inf are missing too
    np.testing.assert_allclose([float(r[2]) for r in rows], want, rtol=1e-9)
    # the raw column keeps what was read: NaN empty, infinities as they are
    assert [r[1] for r in rows] == ["1", "", "", "", "", "", "inf", "-inf", "inf", "4", "2"]
    assert [r[0] for r in rows] == [str(i) for i in range(11)]  # the row number
    from emakit.cli import smooth

    assert smooth.MISSING == ("", "nan", "na", "null", "none")
    for spelling in ("empty", "``nan``", "``na``", "``null``", "``none``", "``inf``", "``-inf``"):
        assert spelling in smooth.__doc__, spelling  # the docs list every spelling the code reads


def test_smooth_streams_a_large_log_and_keeps_every_digit_of_the_step(capsys, tmp_path):
    n = 200_003  # several write blocks, not a multiple of the block
    steps = np.arange(n, dtype=np.int64) * 7 + 10**12  # beyond 10 significant digits
    loss = np.random.default_rng(2).random(n)
    with open(tmp_path / "log.csv", "w") as f:
        f.write("lr,loss,step\n")
        f.writelines(f"0.1,{v!r},{s}\n" for v, s in zip(loss.tolist(), steps.tolist()))
    rc, _out, _ = _run(capsys, "smooth", tmp_path / "log.csv", "--column", "loss", "--span", 9,
                       "--out", tmp_path / "s.csv")
    assert rc == 0
    table = pd.read_csv(tmp_path / "s.csv", dtype={"step": np.int64})
    np.testing.assert_array_equal(table["step"], steps)
    np.testing.assert_allclose(table["loss"], loss, rtol=1e-9)
    np.testing.assert_allclose(table["loss_smoothed"], pd.Series(loss).ewm(span=9).mean(),
                               rtol=1e-9)


@pytest.mark.parametrize(("argv", "message"), [
    (["--half-life", "1e300"], r"half_life=1e\+300 gives alpha=6.93e-301, which is too small"),
    (["--span", "1e308"], r"span=1e\+308 gives alpha=2e-308, which is too small"),
    (["--com", "1e308"], r"com=1e\+308 gives alpha=1e-308, which is too small"),
    (["--alpha", "1e-300"], r"alpha=1e-300 is too small for float64"),
])
def test_smooth_huge_windows_are_one_line_errors(capsys, tmp_path, argv, message):
    _log_csv(tmp_path / "log.csv")
    rc, _out, err = _run(capsys, "smooth", tmp_path / "log.csv", "--column", "loss", *argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err) and "half_life <= 6.24e+15" in err, err


def test_smooth_deeply_nested_json_is_a_one_line_error(capsys, tmp_path):
    deep = '{"loss": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    (tmp_path / "log.jsonl").write_text('{"loss": 1}\n' + deep)
    rc, _out, err = _run(capsys, "smooth", tmp_path / "log.jsonl", "--column", "loss",
                         "--span", 3)
    assert rc == 2 and err.strip() == (
        f"emakit smooth: error: {tmp_path / 'log.jsonl'}:2: JSON nested too deeply to read.")


def test_smooth_writes_a_pipe_or_device_in_place_and_a_full_disk_is_one_line(capsys, tmp_path):
    _log_csv(tmp_path / "log.csv")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the output (~10 KB) fits the buffer
    try:
        rc, _out, err = _run(capsys, "smooth", tmp_path / "log.csv", "--column", "loss",
                             "--span", 3, "--out", fifo)
        assert rc == 0, err
        assert fifo.is_fifo()  # written through, not replaced by a regular file
        assert os.read(reader, 1 << 16).startswith(b"step,loss,loss_smoothed\n1,")
    finally:
        os.close(reader)
    # Only once writing in place is shown (above) is /dev/full used: a regression must never
    # replace the device when the tests run as root.
    if Path("/dev/full").is_char_device():
        rc, _out, err = _run(capsys, "smooth", tmp_path / "log.csv", "--column", "loss",
                             "--span", 3, "--out", "/dev/full")
        assert rc == 2 and "No space left on device" in err
        assert len(err.strip().splitlines()) == 1 and Path("/dev/full").is_char_device()


def test_errors_users_cause_are_one_line_but_bugs_keep_their_traceback(capsys, monkeypatch):
    from emakit.cli import plan

    def fail(exc):
        def run(args):
            raise exc
        return run

    cases = [(OverflowError("(34, 'Numerical result out of range')"),
              "a number given is out of the computable range (OverflowError: "),
             (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
             (type("SafetensorError", (Exception,), {})(
                 "Error while serializing: I/O error: No space left on device (os error 28)"),
              "could not write a file: Error while serializing: I/O error: No space left")]
    for exc, message in cases:
        monkeypatch.setattr(plan, "run", fail(exc))
        rc, _out, err = _run(capsys, "plan", "--decay", 0.9)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setattr(plan, "run", fail(KeyError("a bug")))
    with pytest.raises(KeyError, match="a bug"):
        main(["plan", "--decay", "0.9"])


# ---------------------------------------------------------------------------------- plan
def test_plan_constant_decay_and_the_trap(capsys):
    rc, out, _ = _run(capsys, "plan", "--decay", 0.9999, "--steps", 5000)
    assert rc == 0
    assert "half-life: 6,931 optimizer steps" in out
    assert "effective window 1/(1-d): 10,000 steps" in out
    assert "60.65% the initial weights" in out
    assert "WARNING: the window is too long for a 5,000-step run" in out


def test_plan_half_life_every_json(capsys):
    rc, out, _ = _run(capsys, "plan", "--half-life", 100, "--every", 4, "--steps", 4000,
                      "--last", 100, "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["half_life_steps"] == pytest.approx(100)
    assert report["share_of_last"]["100"] == pytest.approx(0.5, abs=1e-9)
    assert report["initial_share"] < 1e-9 and "warning" not in report


def test_plan_every_counts_updates_and_says_where_the_last_one_was(capsys):
    rc, out, _ = _run(capsys, "plan", "--decay", 0.999, "--every", 4)
    assert rc == 0
    assert "= a half-life of 173 and a window of 250 updates of every 4 steps" in out
    rc, out, _ = _run(capsys, "plan", "--decay", 0.9, "--every", 7, "--steps", 100)
    assert rc == 0 and "after 100 steps the average holds (its last update was at step 98" in out


def test_plan_suggests_the_half_life_that_leaves_five_percent(capsys):
    rc, out, _ = _run(capsys, "plan", "--decay", 0.9, "--steps", 5)
    assert rc == 0 and "Use a half-life below about 1.2 steps" in out
    rc, out, _ = _run(capsys, "plan", "--half-life", 1.15, "--steps", 5)
    assert rc == 0 and "WARNING" not in out  # the suggestion is below the threshold it names


def test_plan_schedule_at_steps_and_plot(capsys, tmp_path):
    rc, out, _ = _run(capsys, "plan", "--schedule", "inverse-gamma:power=0.75,max_decay=0.999",
                      "--at", "1,10,1000", "--steps", 2000, "--plot", tmp_path / "w.png")
    assert rc == 0
    assert "decay at step: 1: 0, 10: 0.822172, 1,000: 0.994377" in out
    assert (tmp_path / "w.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(("args", "message"), [
    (["--schedule", "cosine"], "unknown schedule 'cosine'"),
    (["--schedule", "power:gamma"], "'gamma' is not key=value"),
    (["--schedule", "power:gamma=x"], "gamma='x' is not a number"),
    (["--schedule", "power:gamma=-3"], "gamma must be in"),
    (["--schedule", "power:gamma=-0.5"], "gamma must be in [0.0, inf), got -0.5"),
    (["--schedule", "power-function:sigma_rel=0.29"], "sigma_rel must be in (0.0, 0.2886"),
    (["--schedule", "power:gamma=inf"], "gamma must be in [0.0, inf), got inf"),
    (["--schedule", "power:gamma=1,sigma_rel=0.1"], "exactly one of gamma or sigma_rel"),
    (["--schedule", "inverse-gamma:update_after_step=2.5"], "is not a whole number of steps"),
    (["--schedule", "inverse-gamma:update_after_step=inf"], "is not a whole number of steps"),
    (["--decay", "0.9", "--plot", "x.png"], "--plot needs --steps"),
    (["--decay", "0.9", "--every", "0"], "--every must be >= 1, got 0"),
    (["--half-life", "0"], "--half-life must be a finite number of steps > 0"),
    (["--decay", "0.9", "--at", "a,b"], "give whole step numbers"),
])
def test_plan_bad_input(capsys, args, message):
    rc, _, err = _run(capsys, "plan", *args)
    assert rc == 2 and message in err, err


# ---------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", ["demo", "smooth", "plan", "inspect", "export", "bench"])
def test_help_is_plain_text(capsys, command):
    """--help shows each command's docstring without reStructuredText markup."""
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"emakit {command}: " in out  # the docstring's first line, markup gone
    assert "``" not in out and not re.search(r":(func|mod|class|meth|attr):`", out), out


def test_plan_huge_gamma_is_computed_not_a_traceback(capsys):
    rc, out, err = _run(capsys, "plan", "--schedule", "power:gamma=1e308", "--steps", 100,
                        "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["schedule"]["sigma_rel"] == pytest.approx(1e-308, rel=1e-12)
    assert report["initial_share"] == 0.0 and report["share_of_last"]["1"] == 1.0


def test_a_reader_that_stops_early_gets_no_error_message():
    """`emakit plan ... | head -1`: a pipe closed by its reader is not reported as an error."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before emakit writes: every write fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "emakit", "plan", "--decay", "0.9"],
                              stdout=write, stderr=subprocess.PIPE, timeout=120, check=False)
    finally:
        os.close(write)
    assert proc.returncode == 1
    assert proc.stderr.decode() == ""
