"""What happens to the average when the model is used inside ``swapped()``.

Evaluating inside the block must leave the average as it was, also when the model is (by
mistake) in training mode; an optimizer step inside the block is refused before it writes
(attached EMA or Snapshots) or reported on leaving the block (an EMA updated by hand).
"""

import pytest

import emakit

torch = pytest.importorskip("torch")
nn = torch.nn


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))


def snapshot(ema):
    return {k: v.clone() for k, v in ema.averaged().items()}


def assert_unchanged(ema, before):
    after = ema.averaged()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_a_training_mode_forward_inside_swapped_leaves_the_average_and_the_model_as_they_were():
    model = bn_model()
    ema = emakit.EMA(model, decay=0.9)
    model(torch.randn(64, 8))  # the training statistics move away from the shadows'
    ema.update()
    model(torch.randn(64, 8))
    before, training = snapshot(ema), {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped():
        inside = model[1].running_mean.clone()
        with torch.no_grad():
            model(torch.randn(64, 8))  # train mode: BatchNorm updates its buffers in place
        assert not torch.equal(model[1].running_mean, inside)
    assert_unchanged(ema, before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, training[k]), k


def test_an_optimizer_step_inside_swapped_is_refused_before_it_writes_when_attached():
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = emakit.EMA(model, decay=0.9)
    ema.attach(opt)
    before = snapshot(ema)
    model.eval()
    model(torch.randn(8, 8)).square().mean().backward()
    with ema.swapped(), pytest.raises(emakit.SwapError, match=r"optimizer.step\(\) called while "
                                                            ".* Nothing was stepped"):
        opt.step()
    assert_unchanged(ema, before)
    assert ema.step == 0
    model.train()
    model(torch.randn(8, 8)).square().mean().backward()
    opt.step()  # outside the block: steps and updates as usual
    assert ema.step == 1


def test_an_in_place_write_inside_swapped_is_reported_when_the_block_ends():
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = emakit.EMA(model, decay=0.9)  # not attached: updated by hand
    training = {k: v.clone() for k, v in model.state_dict().items()}
    model[0](torch.randn(4, 8)).square().mean().backward()
    block = ema.swapped()
    block.__enter__()
    opt.step()  # writes into the shadows of 0.weight and 0.bias
    with pytest.raises(emakit.SwapError, match=r"2 tensors were written in place .*'0.weight'"):
        block.__exit__(None, None, None)
    for k, v in model.state_dict().items():  # the training weights are back all the same
        assert torch.equal(v, training[k]), k


def test_snapshots_refuse_a_step_while_an_average_is_swapped_in(tmp_path):
    from emakit.posthoc import Snapshots

    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Snapshots(model, tmp_path / "snapshots", snapshot_every=10)
    rec.attach(opt)
    model(torch.randn(8, 8)).square().mean().backward()
    opt.step()
    before = snapshot(rec.emas[1])
    with rec.emas[1].swapped(), pytest.raises(emakit.SwapError, match=r"sigma_rel 0\.1 is swapped"):
        opt.step()
    assert_unchanged(rec.emas[1], before)
    assert rec.step == 1


def test_another_threads_save_waits_for_the_swapped_block_to_end(tmp_path):
    import threading

    model = bn_model()
    ema = emakit.EMA(model, decay=0.9)
    ema.update()
    inside, result = threading.Event(), []

    def checkpointer():
        inside.wait()
        emakit.save(ema, tmp_path / "ckpt.safetensors")
        result.append(ema.is_swapped)

    worker = threading.Thread(target=checkpointer)
    worker.start()
    with ema.swapped():
        inside.set()
        worker.join(timeout=0.5)  # the save waits for the block to end
        assert worker.is_alive() and result == []
    worker.join(timeout=60)
    assert result == [False]
    assert emakit.read_state(tmp_path / "ckpt.safetensors")["step"] == 1


def test_a_members_swapped_block_and_a_multi_update_in_two_threads_take_turns():
    import threading

    model = bn_model()
    multi = emakit.MultiEMA(model, decays=(0.5, 0.9))
    inside, done = threading.Event(), []

    def trainer():
        inside.wait()
        multi.update()
        done.append("update")

    worker = threading.Thread(target=trainer)
    worker.start()
    with multi[1].swapped():
        inside.set()
        multi[0].averaged()  # another member's lock: the same one, so no deadlock
    worker.join(timeout=60)
    assert not worker.is_alive() and done == ["update"]


def test_an_attached_step_in_another_thread_waits_for_the_swapped_block():
    import threading

    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = emakit.EMA(model, decay=0.9)
    ema.attach(opt)
    model(torch.randn(8, 8)).square().mean().backward()
    inside, errors = threading.Event(), []

    def trainer():
        inside.wait()
        try:
            opt.step()
        except emakit.SwapError as exc:
            errors.append(exc)

    worker = threading.Thread(target=trainer)
    worker.start()
    with ema.swapped():
        inside.set()
        worker.join(timeout=0.5)
    worker.join(timeout=60)
    assert errors == [] and ema.step == 1


@pytest.mark.parametrize("kind", ["zeros", "bema"])
def test_in_place_writes_into_temporary_swapped_values_are_not_reported(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5))  # renormalises rows in forward
    ema = emakit.EMA(model, decay=0.9, start="zeros") if kind == "zeros" else emakit.BEMA(model)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    ema.update()
    before = snapshot(ema)
    with ema.swapped():
        model(torch.arange(10))  # writes into the swapped-in values: temporaries here
    assert_unchanged(ema, before)


def test_swapped_works_for_a_model_made_under_inference_mode():
    with torch.inference_mode():  # its tensors keep no version counter
        model = nn.Sequential(nn.Linear(8, 4))
        ema = emakit.EMA(model, decay=0.9)
        model[0].weight.add_(1.0)
        ema.update()
    training = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped():
        assert torch.equal(model[0].weight, ema.averaged()["0.weight"])
    assert all(torch.equal(v, training[k]) for k, v in model.state_dict().items())


def test_the_blocks_own_error_is_raised_and_the_write_reported_as_a_warning():
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = emakit.EMA(model, decay=0.9)
    model[0](torch.randn(4, 8)).square().mean().backward()

    def evaluate_then_fail():
        with ema.swapped():
            opt.step()
            raise KeyError("from the block")

    with pytest.warns(emakit.EMAWarning, match="written in place"), \
            pytest.raises(KeyError, match="from the block"):
        evaluate_then_fail()


def test_bema_store_and_copy_to_corrects_with_the_training_weights():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    bema = emakit.BEMA(model)
    for t in range(1, 8):
        with torch.no_grad():
            model.weight.add_(0.1 * t)
        bema.update()
    before = snapshot(bema)
    bema.store()
    bema.copy_to()
    assert_unchanged(bema, before)
    bema.restore()
