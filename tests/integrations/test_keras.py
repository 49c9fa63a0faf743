"""emakit.integrations.keras.EMACallback in real Keras 3 runs (torch backend, set in conftest).

A small model (Dense, BatchNormalization, Dense) learns a regression. The three points: the
validation loss that ``fit`` logs is the loss of the EMA weights computed by hand; a run
interrupted and resumed (Keras' ``BackupAndRestore`` plus the callback's checkpoint) ends
bitwise where the uninterrupted run ends; the best file holds the EMA weights of the best epoch
and loads with ``model.load_weights``. And the model never keeps EMA weights after ``fit``,
``evaluate`` or ``predict``.
"""

import numpy as np
import pytest

keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
if keras.backend.backend() != "torch":  # conftest sets KERAS_BACKEND before keras is imported
    pytest.skip("these tests run Keras on the torch backend", allow_module_level=True)

import emakit
from emakit.integrations.keras import Copied, EMACallback, variables_of

DECAY = 0.8


def build(compile=True):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="hidden")(inputs)
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.ReLU()(x)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(x))
    if compile:
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    return model


def data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, (x.sum(1, keepdims=True) + 0.1 * rng.normal(size=(n, 1))).astype("float32")


TRAIN, VAL = data(64, 1), data(16, 2)


def fit(model, callbacks, epochs, **kw):
    return model.fit(*TRAIN, validation_data=VAL, batch_size=16, epochs=epochs, shuffle=False,
                     verbose=0, callbacks=callbacks, **kw)


def weights(model):
    return {v.path: v.value.detach().cpu().numpy().copy() for v in model.weights}


def ema_weights(callback):
    return {k: v.detach().cpu().numpy().copy()
            for k, v in callback.ema.model_state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def loss_by_hand(state):
    """The MSE of a fresh model holding ``state`` (path -> array) on the validation data."""
    twin = build(compile=False)
    for v in twin.weights:
        v.assign(state[v.path])
    x, y = VAL
    return float(keras.losses.MeanSquaredError()(y, twin(x, training=False)).detach())


def test_fit_validates_on_the_ema_and_keeps_the_training_weights():
    model, callback = build(), EMACallback(decay=DECAY)
    history = fit(model, [callback], 2)
    ema = callback.ema
    assert ema.num_updates == ema.step == 8  # 64 / 16 batches, 2 epochs
    assert ema.actions["norm/moving_mean"] == ema.actions["norm/moving_variance"] == "copy"
    assert ema.actions["norm/gamma"] == "average"
    average = ema_weights(callback)
    trained = weights(model)
    assert not same(trained, average)  # the model holds the training weights after fit
    assert history.history["val_loss"][-1] == loss_by_hand(average)
    # evaluate / predict with the callback run on the EMA and put the training weights back
    assert model.evaluate(*VAL, batch_size=16, verbose=0, callbacks=[callback]) == \
        loss_by_hand(average)
    assert model.evaluate(*VAL, batch_size=16, verbose=0) == \
        loss_by_hand(trained)  # without the callback: the training weights
    predicted = model.predict(VAL[0], verbose=0, callbacks=[callback])
    twin = build()
    for v in twin.weights:
        v.assign(average[v.path])
    assert np.array_equal(predicted, twin(VAL[0], training=False).detach().cpu().numpy())
    assert same(weights(model), trained)


def test_the_logged_metric_is_exactly_the_ema_metric():
    """Keras averages the batch losses with a Mean tracker; one batch of 16 keeps it exact."""
    model, callback = build(), EMACallback(decay=DECAY)
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            state = ema_weights(callback)
            seen.append((logs["val_loss"], loss_by_hand(state)))

    fit(model, [callback, Probe()], 2)
    assert [a for a, _ in seen] == [b for _, b in seen]


def test_resume_with_backup_and_restore_is_bitwise(tmp_path):
    whole, whole_cb = build(), EMACallback(decay=DECAY)
    fit(whole, [whole_cb], 4)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt  # the process dies after epoch 2

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    first = EMACallback(decay=DECAY, checkpoint=tmp_path / "ema.safetensors")
    with pytest.raises(KeyboardInterrupt):
        fit(build(), [backup, first, Interrupt()], 4)
    assert emakit.read_state(tmp_path / "ema.safetensors")["step"] == 8

    resumed = build()  # a new process: fresh model, restored by BackupAndRestore
    second = EMACallback(decay=DECAY, checkpoint=tmp_path / "ema.safetensors")
    fit(resumed, [keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), second], 4)
    a, b = whole_cb.ema.state_dict(), second.ema.state_dict()
    assert a["step"] == b["step"] == 16 and a["num_updates"] == b["num_updates"] == 16
    assert all(torch.equal(a["shadows"][k], b["shadows"][k]) for k in a["shadows"])
    assert same(weights(whole), weights(resumed))


def test_best_file_holds_the_best_ema_weights_and_loads_with_load_weights(tmp_path):
    path = tmp_path / "best.weights.h5"
    model, callback = build(), EMACallback(decay=DECAY, save_best=path)
    seen = []

    class Probe(keras.callbacks.Callback):  # after the EMA callback
        def on_epoch_end(self, epoch, logs=None):
            seen.append((logs["val_loss"], ema_weights(callback)))

    fit(model, [callback, Probe()], 5)
    best_loss, best = min(seen, key=lambda s: s[0])
    assert callback.keep_best.best == best_loss
    loaded = build(compile=False)  # a model to deploy (compiled, Keras notes it skips the
    loaded.load_weights(str(path))  # optimizer state in the file); Keras' own loader
    assert same(weights(loaded), best)
    assert not same(weights(model), best)


def test_an_evaluation_that_fails_gives_the_training_weights_back():
    model, callback = build(), EMACallback(decay=DECAY)
    fit(model, [callback], 1)
    trained = weights(model)

    class Fail(keras.callbacks.Callback):
        def on_test_batch_end(self, batch, logs=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.evaluate(*VAL, verbose=0, callbacks=[callback, Fail()])
    assert not same(weights(model), trained)  # Keras has no on_exception: still swapped ...
    callback.restore()  # ... until the callback's next event, or restore()
    assert same(weights(model), trained)


def test_non_trainable_weights_by_choice():
    model = build()
    fit(model, [averaged := EMACallback(decay=DECAY, non_trainable="average")], 1)
    assert averaged.ema.actions["norm/moving_mean"] == "average"
    fit(model, [skipped := EMACallback(decay=DECAY, non_trainable="skip")], 1)
    assert "norm/moving_mean" not in skipped.ema.actions
    assert set(skipped.ema.actions) == {"hidden/kernel", "hidden/bias", "norm/gamma",
                                        "norm/beta", "out/kernel", "out/bias"}


def test_the_numpy_view_for_other_backends_swaps_by_assign():
    model = build()
    view, frozen = variables_of(model, copies=True)
    assert isinstance(view, Copied) and frozen == ["norm/moving_mean", "norm/moving_variance"]
    ema = emakit.EMA(view.source, decay=0.5, policy=emakit.Policy(copy=tuple(frozen)))
    before = weights(model)
    fit(model, [], 1)
    view.refresh()
    ema.update()
    after = weights(model)
    view.apply(ema)
    assert same(weights(model), {k: np.array(v) for k, v in ema.model_state_dict().items()})
    np.testing.assert_allclose(weights(model)["out/kernel"],
                               0.5 * before["out/kernel"] + 0.5 * after["out/kernel"])
    view.restore(ema)
    assert same(weights(model), after)


def test_bad_arguments_are_refused_when_the_callback_is_made():
    with pytest.raises(ValueError, match="non_trainable must be one of"):
        EMACallback(non_trainable="freeze")
    with pytest.raises(ValueError, match=r"save_best must end in '\.weights\.h5'"):
        EMACallback(save_best="best.h5")
    with pytest.raises(ValueError, match=r"checkpoint must end in '\.safetensors'"):
        EMACallback(checkpoint="ema.pt")
    with pytest.raises(ValueError, match="decay"):
        EMACallback(decay=2.0)
    with pytest.raises(ValueError, match="mode must be"):
        EMACallback(mode="best")


def test_one_update_per_optimizer_step_with_gradient_accumulation():
    model = build(compile=False)
    model.compile(optimizer=keras.optimizers.SGD(0.05, gradient_accumulation_steps=2),
                  loss="mse")
    callback = EMACallback(decay=DECAY)
    model.fit(*TRAIN, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    assert callback.ema.step == callback.ema.num_updates == 2  # 4 batches, 2 optimizer steps


def unnamed():
    """The model of :func:`build` with the layer names Keras chooses (numbered per process)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                              keras.layers.BatchNormalization(), keras.layers.ReLU(),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    return model


def test_resume_matches_layers_keras_named_differently_by_their_position(tmp_path):
    whole_cb = EMACallback(decay=DECAY)
    fit(unnamed(), [whole_cb], 4)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    first = EMACallback(decay=DECAY, checkpoint=tmp_path / "ema.safetensors")
    with pytest.raises(KeyboardInterrupt):
        fit(unnamed(), [keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), first,
                        Interrupt()], 4)
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])  # moves Keras' numbering on
    resumed = unnamed()
    saved = list(emakit.read_state(tmp_path / "ema.safetensors")["shadows"])
    assert not set(saved) & {v.path for v in resumed.weights}  # no name in common
    second = EMACallback(decay=DECAY, checkpoint=tmp_path / "ema.safetensors")
    fit(resumed, [keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), second], 4)
    a, b = whole_cb.ema.state_dict(), second.ema.state_dict()
    assert a["step"] == b["step"] == 16
    assert len(a["shadows"]) == len(b["shadows"])
    assert all(torch.equal(x, y) for x, y in zip(a["shadows"].values(), b["shadows"].values()))
