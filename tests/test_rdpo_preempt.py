"""Preemption: a real SIGTERM/SIGUSR1 during a step -> the step finishes, a checkpoint is written, the exit status
is 128 + signal; the same run again resumes and its table files equal an uninterrupted run's byte for byte."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from _rdpo_tiny import TargetReward, table_bytes, tiny_trainer
from epd.rdpo.preempt import PreemptSignal, exit_code

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sig, status, at", [(signal.SIGTERM, 143, 3), (signal.SIGUSR1, 138, 6)])
def test_signal_checkpoints_after_the_step_and_resume_is_byte_identical(tmp_path, sig, status, at):
    full = tiny_trainer(tmp_path / "full", save_interval=4)
    full.train()
    def hook(prompts):  # scoring step `at`'s rollout (16 images; evaluations score 40) signals this very process
        if len(prompts) == 16 and part.step == at - 1:
            os.kill(os.getpid(), sig)

    with PreemptSignal() as pre:
        part = tiny_trainer(tmp_path / "part", save_interval=4, preempt=pre, reward=TargetReward(hook))
        part.train()
    assert part.preempted == int(sig) and exit_code(part.preempted) == status
    assert part.step == at  # the step in flight finished, no further one started
    st = torch.load(tmp_path / "part" / "checkpoints" / "trainer-state.pt", weights_only=True)
    assert st["step"] == at and st["history_len"] == len(part.history)
    assert not (tmp_path / "part" / "table_final.safetensors").exists()
    resumed = tiny_trainer(tmp_path / "part", save_interval=4)
    resumed.train()
    assert resumed.preempted is None and resumed.step == full.step
    assert table_bytes(tmp_path / "part") == table_bytes(tmp_path / "full")
    strip = lambda h: [{k: v for k, v in r.items() if k != "elapsed_sec"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    assert (tmp_path / "part" / "stop.json").read_text() == (tmp_path / "full" / "stop.json").read_text()


def test_handlers_are_restored_and_only_the_first_signal_counts():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptSignal() as pre:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert pre.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
