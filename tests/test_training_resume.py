"""A CPU training run spans sessions: `train events --resume` goes on from the last
checkpoint and ends with exactly the weights of a run that was never stopped."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from smartscope.training import events  # noqa: E402


class _Stop(Exception):
    pass


def test_a_resumed_event_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "EPISODES", 4)
    monkeypatch.setattr(events, "CHECKPOINT_EVERY", 2)
    finals = {}  # out_dir -> weights at the end of training (the card's scoring is not under test)
    monkeypatch.setattr(events, "export_and_score", lambda net, seed, out_dir, training, **_: finals.setdefault(
        str(out_dir), {k: v.clone() for k, v in net.state_dict().items()}))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    events.train_and_export(seed=3, out_dir=whole, steps=6, batch=2)

    fit = events.fit

    def fit_stopped_after_step_4(*args, **kwargs):
        save = kwargs["after_step"]

        def after_step(step, opt, sched):
            save(step, opt, sched)
            if step == 4:
                raise _Stop

        return fit(*args, **{**kwargs, "after_step": after_step})

    monkeypatch.setattr(events, "fit", fit_stopped_after_step_4)
    with pytest.raises(_Stop):
        events.train_and_export(seed=3, out_dir=cut, steps=6, batch=2)
    assert sorted(p.name for p in cut.glob("events-step*.pt")) == ["events-step2.pt", "events-step4.pt"]
    assert torch.load(cut / "events-checkpoint.pt", weights_only=False)["step"] == 4

    monkeypatch.setattr(events, "fit", fit)
    events.train_and_export(out_dir=cut, resume=True)  # seed, steps, batch from the checkpoint
    assert finals.keys() == {str(whole), str(cut)}
    for name, weights in finals[str(whole)].items():
        assert torch.equal(weights, finals[str(cut)][name]), name
