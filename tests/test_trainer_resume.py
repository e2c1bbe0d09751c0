"""Resuming from a checkpoint repeats the uninterrupted run exactly (fixed seed, CPU).

What makes it exact: the checkpoint holds student, teacher (with BatchNorm buffers), AdamW state, the
loss center and the step; the batch sampler is a function of (seed, epoch) and starts at the step's
offset inside the epoch; the augmentation generator is seeded from (seed, step, rank). So step k does
the same arithmetic whether or not the process stopped before it.
"""

from __future__ import annotations

import pytest
import torch

from trainer import train

from trainer_tiny import one_thread, tiny_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8  # 3 steps per epoch: the resumed part crosses an epoch boundary


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    result = train(_config(), out_dir=tmp_path_factory.mktemp("full"))
    torch.set_num_threads(before)
    assert result.status == "ok" and len(result.losses) == STEPS
    return result.losses, result.summary


def _config():
    # eval.at_start off and one kNN at the end keep the test short; evaluation does not touch training state.
    return tiny_config(budget__steps=STEPS, checkpoint_every_steps=4, eval__at_start=False)


def test_stopped_then_resumed_run_repeats_the_loss_sequence_exactly(tmp_path, uninterrupted_losses):
    expected, full_summary = uninterrupted_losses

    def stop_after_second_window(event, payload):
        return event == "window" and payload["window"] == 2  # after step 5, in the middle of epoch 1

    first = train(_config(), callback=stop_after_second_window, out_dir=tmp_path)
    assert first.summary["stopped_early"] is True and first.summary["steps"] == 5
    assert first.losses == expected[:5]

    resumed = train(_config(), out_dir=tmp_path, resume=True)
    assert resumed.status == "ok" and resumed.summary["steps"] == STEPS
    assert resumed.losses == expected  # bit-for-bit, including the restored first five
    assert resumed.summary["knn_top1"] == full_summary["knn_top1"]
    assert resumed.summary["throughput_img_s"] == first.summary["throughput_img_s"]  # speed phase not re-run
    # training time carries over: the resumed total exceeds the first part, and throughput covers all steps
    assert resumed.summary["train_s"] > first.summary["train_s"] > 0
    assert resumed.summary["train_throughput_img_s"] == pytest.approx(
        STEPS * resumed.summary["images_per_step"] / resumed.summary["train_s"])


def test_run_that_crashed_resumes_from_its_last_periodic_checkpoint(tmp_path, monkeypatch, uninterrupted_losses):
    expected, _ = uninterrupted_losses
    monkeypatch.setenv("TRAINER_INJECT_FAULT", "nan@5")
    crashed = train(_config(), out_dir=tmp_path)
    assert crashed.status == "failed" and crashed.failure["step"] == 5
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 4  # checkpoint_every_steps=4: the last one before the crash

    monkeypatch.delenv("TRAINER_INJECT_FAULT")
    resumed = train(_config(), out_dir=tmp_path, resume=True)
    assert resumed.status == "ok"
    assert torch.equal(torch.tensor(resumed.losses), torch.tensor(expected))


def test_resume_with_a_different_config_is_refused(tmp_path):
    from trainer import ConfigError

    train(tiny_config(budget__steps=1, eval__at_start=False), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="different config"):
        train(tiny_config(budget__steps=2, eval__at_start=False), out_dir=tmp_path, resume=True)


def test_segments_of_one_run_stopped_at_steps_and_resumed_repeat_it_exactly(tmp_path, uninterrupted_losses):
    """`budget.stop_at_step` ends a run early with the full run's schedules; resuming with a later stop
    continues it (what the tuner's promotion rungs do), and the last segment equals the whole run."""
    expected, full_summary = uninterrupted_losses
    seen = []
    first = train(_config().with_overrides({"budget.stop_at_step": 3}), out_dir=tmp_path,
                  callback=lambda event, payload: seen.append(payload) if event == "build" else None)
    assert seen[0]["total_steps"] == 3 and seen[0]["schedule_steps"] == STEPS
    assert first.status == "ok" and first.summary["steps"] == 3 and first.losses == expected[:3]
    assert first.summary["stopped_early"] is False and first.summary["knn_top1"] is not None
    second = train(_config().with_overrides({"budget.stop_at_step": 6}), out_dir=tmp_path, resume=True)
    assert second.summary["steps"] == 6 and second.losses == expected[:6]
    last = train(_config(), out_dir=tmp_path, resume=True)
    assert last.losses == expected and last.summary["knn_top1"] == full_summary["knn_top1"]
    with pytest.raises(Exception, match="only budget.stop_at_step and when to evaluate may differ"):
        train(_config().with_overrides({"optim.lr": 0.1}), out_dir=tmp_path, resume=True)
