"""Event detection: scoring with exact outcomes, and the shipped model on live-mode episodes."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
from conftest import first_event_window_frame

from smartscope.bench.events import edge_field_scores
from smartscope.cli import main
from smartscope.inference.events import (
    EventWindow,
    card_run,
    detect_events,
    event_map,
    event_window_for,
    link_tracks,
    mirror_views,
    normalise_window,
    outside_training,
    pad_window,
    persistent,
    persistent_score,
    score_events,
)
from smartscope.inference.session import load_model
from smartscope.simulation.heldout import edge_touching_field
from smartscope.training.episodes import (
    edge_touching_episode,
    evaluate,
    held_out_episodes,
    random_microscope,
    simulate_episode,
)


def test_score_events_exact_outcomes():
    # one episode, 3 frames; event 7 active in frames 1-2 at (10, 10); event 8 never found
    truth = [[np.zeros((0, 3)), np.array([[7, 10.0, 10.0], [8, 40.0, 40.0]]), np.array([[7, 11.0, 10.0]])]]
    detections = [[np.array([[30.0, 30.0, 0.9]]), np.zeros((0, 3)), np.array([[12.0, 10.0, 0.8]])]]
    s = score_events(detections, truth, tol_px=5.0)
    # two objects: a false one at (30, 30) and a true one on event 7 (found one frame late)
    assert (s["events"], s["found"], s["objects"]) == (2, 1, 2)
    assert s["recall"] == 0.5 and s["precision"] == 0.5 and s["median_delay_frames"] == 1.0


def test_score_events_censors_events_that_begin_at_the_end():
    # event 7 in frames 0-2, found at frame 1; event 9 begins in the last frame, unfound;
    # event 8 begins in the last frame and an object lies on it
    truth = [[np.array([[7, 10.0, 10.0]]), np.array([[7, 10.0, 10.0]]),
              np.array([[7, 10.0, 10.0], [8, 40.0, 40.0], [9, 50.0, 10.0]])]]
    detections = [[np.zeros((0, 3)), np.array([[10.0, 11.0, 0.9]]), np.array([[41.0, 40.0, 0.9]])]]
    plain = score_events(detections, truth, tol_px=5.0)
    assert (plain["events"], plain["found"], plain["objects"], plain["false_objects"]) == (3, 2, 2, 0)
    censored = score_events(detections, truth, tol_px=5.0, censor_last_frames=1)
    assert (censored["events"], censored["found"], censored["objects"], censored["false_objects"]) == (1, 1, 2, 0)
    assert censored["recall"] == 1.0 and censored["precision"] == 1.0 and censored["median_delay_frames"] == 1.0


def test_detections_over_frames_are_one_object():
    det = [np.array([[10.0, 10.0, 0.9]]), np.array([[11.0, 10.5, 0.9]]), np.zeros((0, 3)),
           np.array([[12.0, 11.0, 0.8]]), np.array([[40.0, 40.0, 0.8]])]
    tracks = link_tracks(det, tol_px=5.0, max_gap=2)
    assert sorted(len(t) for t in tracks) == [1, 3]
    kept = persistent(det, min_frames=2)
    assert [len(d) for d in kept] == [1, 1, 0, 1, 0]


def test_detect_events_peaks_and_score():
    m = np.zeros((32, 32), np.float32)
    m[5, 6], m[20, 25], m[21, 25] = 0.9, 0.6, 0.55
    score, peaks = detect_events(m, threshold=0.5)
    assert score == pytest.approx(0.9)
    assert sorted(map(tuple, peaks[:, :2])) == [(6.5, 5.5), (25.5, 20.5)]


def test_normalise_window_fills_saturated_pixels_without_warning():
    w = np.random.default_rng(0).uniform(10, 20, (5, 16, 16)).astype(np.float32)
    w[:, 4, 4], w[0, 0, 0] = np.nan, np.inf
    out = normalise_window(w)
    assert np.isfinite(out).all() and 0.2 < out[2, 4, 4] < 0.8  # the median, not an extreme
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an all-NaN window used to warn ("All-NaN slice") and give NaN
        assert np.array_equal(normalise_window(np.full((5, 8, 8), np.nan, np.float32)), np.zeros((5, 8, 8)))


def test_normalise_window_is_scale_free():
    rng = np.random.default_rng(0)
    w = rng.gamma(2.0, 10.0, (3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(normalise_window(w), normalise_window(7.5 * w + 0.0), atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return load_model("events.onnx", "cpu")


def test_model_finds_fission_events(model):
    result = evaluate(card_run(model), held_out_episodes(seed=3, episodes=4, frames=30),
                      thresholds=(model.card["threshold"],), min_frames_options=(model.card["min_frames"],))
    best = result["best"]
    assert best["events"] >= 5
    assert best["recall"] >= 0.6 and best["precision"] >= 0.5


def test_event_map_checks_its_window(model):
    with pytest.raises(ValueError, match="needs 5 frames"):
        event_map(model, np.zeros((3, 32, 32), np.float32))
    assert event_map(model, np.full((5, 30, 22), 50.0, np.float32)).shape == (30, 22)


def test_events_cli_writes_one_score_per_frame(tmp_path):
    assert main(["simulate", "--frames", "12", "--out", str(tmp_path), "--config", str(_live_config(tmp_path))]) == 0
    assert main(["events", str(tmp_path / "stack.ome.tif"), "--out", str(tmp_path / "ev.csv")]) == 0
    rows = (tmp_path / "ev.csv").read_text().splitlines()
    assert rows[0] == "frame,x [nm],y [nm],score"
    frames = {int(r.split(",")[0]) for r in rows[1:]}
    assert frames == set(range(12))


def test_events_cli_with_the_frame_interval_uses_spaced_windows(tmp_path, model):
    """100 ms frames, 500 ms spacing: keyframes 0, 5, 10 and 15. Frames are scored once the window holds the
    card's min_window_frames (v2: from frame 16; score 0 before), and from the second keyframe on their windows
    differ from those of 1 s frames (every frame a keyframe): the scores differ."""
    assert main(["simulate", "--frames", "20", "--out", str(tmp_path), "--config", str(_live_config(tmp_path))]) == 0
    stack = str(tmp_path / "stack.ome.tif")
    first = {}
    for interval_ms in (100, 1000):
        out = tmp_path / f"ev-{interval_ms}.csv"
        assert main(["events", stack, "--out", str(out), "--interval-ms", str(interval_ms)]) == 0
        rows = [r.split(",") for r in out.read_text().splitlines()[1:]]
        first[interval_ms] = {int(r[0]): float(r[3]) for r in reversed(rows)}  # a frame's first row
    scored_from = first_event_window_frame(model.card, 100)
    assert all(first[100][k] == 0.0 for k in range(scored_from))
    assert all(first[100][k] > 0.0 for k in range(scored_from, 20))
    assert all(first[100][k] != first[1000][k] for k in range(max(scored_from, 5), 20))
    with pytest.raises(SystemExit, match="interval_ms must be > 0"):
        main(["events", stack, "--out", str(tmp_path / "bad.csv"), "--interval-ms", "0"])


def test_a_stack_outside_the_event_model_s_training_draw_is_warned_about(tmp_path, model, capsys, caplog):
    """Issue 28's real stacks (56 nm pixels, 5 s frames) lie outside v12's training draw (VARIETY: 80-130 nm,
    100-1000 ms): `smartscope events` says so on stderr and in its summary, and the daemon's model check logs
    the pixel size; a card fine-tuned on part of the randomised draw is checked against the wider ranges."""
    lo, hi = model.card["training"]["variety"]["pixel_size_nm"]
    name = f"the event model ({model.card['name']} v{model.card['version']}) was trained on"
    assert outside_training(model.card, 56.0, 5000.0) == [f"pixel size 56 nm is outside the {lo:g}-{hi:g} nm {name}",
                                                           f"interval 5000 ms is outside the 100-1000 ms {name}"]
    assert outside_training(model.card, 100.0, 500.0) == outside_training(model.card, 100.0) == []
    randomised = {**model.card, "training": {**model.card["training"], "randomised_episodes": 0.1}}
    assert outside_training(randomised, 56.0, 5000.0) == []
    assert len(outside_training(randomised, 30.0, 20_000.0)) == 2

    assert main(["simulate", "--frames", "3", "--out", str(tmp_path), "--config", str(_live_config(tmp_path))]) == 0
    capsys.readouterr()
    assert main(["events", str(tmp_path / "stack.ome.tif"), "--out", str(tmp_path / "ev.csv"), "--pixel-size-nm", "56",
                 "--interval-ms", "5000"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["outside_training"] == outside_training(model.card, 56.0, 5000.0)
    assert err.count("warning: ") == 2 and "pixel size 56 nm is outside" in err

    from smartscope.config import InferenceConfig
    from smartscope.inference.pool import worker_models

    with caplog.at_level(logging.WARNING, logger="smartscope"):
        worker_models(InferenceConfig(model=None, event_model="events.onnx"), (64, 64), 56.0)
    assert [r.getMessage() for r in caplog.records] == [
        f"pixel size 56 nm is outside the {lo:g}-{hi:g} nm {name}: its scores there are not measured"]


def _live_config(tmp_path):
    path = tmp_path / "live.yaml"
    path.write_text("simulation: {mode: live, camera: {width_px: 64, height_px: 64}}\n"
                    "acquisition: {exposure_ms: 50, interval_ms: 200, excitation_mw: 20, activation_mw: 0}\n")
    return path


def test_persistent_score_needs_the_previous_frames_nearby():
    cur = np.zeros((32, 32), np.float32)
    cur[10, 10] = 0.9
    prev_near, prev_far = np.zeros_like(cur), np.zeros_like(cur)
    prev_near[12, 11] = 0.8
    prev_far[25, 25] = 0.8
    assert persistent_score(cur, [prev_near]) == pytest.approx(0.8)
    assert persistent_score(cur, [prev_far]) == 0.0
    assert persistent_score(cur, [prev_near, prev_far]) == 0.0  # seen in 3 frames: all must agree
    assert persistent_score(cur, []) == pytest.approx(0.9)


def test_event_window_takes_keyframes_spacing_apart():
    """Frames every 100 ms, spacing 300 ms: the window is the newest frame and keyframes ≥ 300 ms apart."""
    window = EventWindow(3, 0.3)
    frame = {}
    out = {}
    for k in range(12):
        frame[k] = np.full((4, 4), float(k), np.float32)
        out[k] = window.push("run-a", round(0.1 * k, 3), frame[k])
    assert all(out[k] is None for k in range(4))  # keyframes at 0 and 0.3 s; the first window at 0.4 s
    assert [w[0, 0] for w in out[4]] == [0.0, 3.0, 4.0]
    assert [w[0, 0] for w in out[11]] == [6.0, 9.0, 11.0]  # keyframes 0, 3, 6, 9
    # slower frames than the spacing: consecutive; a new acquisition or shape starts over
    slow = EventWindow(3, 0.3)
    windows = [slow.push("run-a", 0.5 * k, frame[k]) for k in range(4)]
    assert windows[:2] == [None, None] and [w[0, 0] for w in windows[3]] == [1.0, 2.0, 3.0]
    assert slow.push("run-b", 2.0, frame[5]) is None
    assert slow.push("run-b", 2.5, np.zeros((8, 8), np.float32)) is None


def test_mirror_views_average_the_four_mirror_images_and_keep_the_shape():
    # a "model" that weights each pixel by its column: its mirror images see the columns reversed
    def ramp(x):
        return x[:, :1] * np.arange(x.shape[-1], dtype=np.float32)

    x = np.ones((2, 3, 5, 7), np.float32)
    out = mirror_views(ramp)(x)
    assert out.shape == (2, 1, 5, 7)
    np.testing.assert_allclose(out, 3.0)  # (c + (6 - c)) / 2 for every column c
    x[1] *= 2
    np.testing.assert_allclose(mirror_views(ramp)(x)[1], 6.0)  # each window is averaged on its own views


def test_the_shipped_model_runs_as_its_card_was_measured(model):
    assert model.card["mirror_views"] is True
    rng = np.random.default_rng(0)
    window = rng.normal(100, 10, (model.card["frames"], 24, 32)).astype(np.float32)
    x = normalise_window(window)[None]
    np.testing.assert_allclose(event_map(model, window), mirror_views(model.run)(x)[0, 0], atol=1e-6)


def test_one_view_runs_the_window_alone(model):
    window = np.random.default_rng(1).normal(100, 10, (model.card["frames"], 24, 32)).astype(np.float32)
    one = event_map(model, window, one_view=True)
    np.testing.assert_allclose(one, model.run(normalise_window(window)[None])[0, 0], atol=1e-6)
    assert np.abs(one - event_map(model, window)).max() > 1e-3  # the mirror views do change the map


def test_short_windows_repeat_the_oldest_frame_from_min_window_frames_on():
    """Frames every 100 ms, spacing 300 ms, 3-frame windows given from the first frame."""
    window = EventWindow(3, 0.3, min_window_frames=1)
    frame = {k: np.full((4, 4), float(k), np.float32) for k in range(6)}
    out = {k: window.push("run-a", round(0.1 * k, 3), frame[k]) for k in range(6)}
    assert [w[:, 0, 0].tolist() for w in out.values()] == [
        [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 3, 4], [0, 3, 5]]
    assert window.push("run-b", 1.0, frame[1])[:, 0, 0].tolist() == [1, 1, 1]  # a new stream starts over
    two = EventWindow(3, 0.0, min_window_frames=2)
    assert two.push("a", 0.0, frame[0]) is None and two.push("a", 1.0, frame[1])[:, 0, 0].tolist() == [0, 0, 1]
    assert pad_window(np.stack([frame[2]]), 3).shape == (3, 4, 4)


# Borders: the shipped model (v12) puts detections above threshold on these held-out fields (18 on the
# bench's 6 edge fields, 5 within 1 um of the border; v2, full windows, 5 and 2). They are the held-out
# world's false detections, spread over the field by area, not a border artefact: the top score lies within
# 0.5 um of the border no more often than that band's share of the field, on these fields and on our own
# simulator's (test_no_border_bias_on_event_free_fields_that_cross_every_edge). Candidates fine-tuned on
# part of the randomised draw (v3, v11, the from-scratch run) pass this test by going quiet on the held-out
# world as a whole (models/README.md, events). strict: the test fails as soon as a shipped model passes it,
# and the mark must go.
BORDER_NOT_FIXED = pytest.mark.xfail(
    strict=True, reason="the shipped events model (v12) has false detections on the held-out world, the border "
                        "band included: on 6 edge-touching held-out fields, 18 above threshold, 5 within 1 um of "
                        "the border")


@pytest.mark.parametrize("n_frames", [1, 2, 5])
def test_the_first_frame_of_a_stack_has_a_score(model, n_frames):
    """The worker's window as the card sets it: every frame of a 1-, 2- or 5-frame stack
    gets an event map, its score a probability."""
    scope, interval_ms = random_microscope(np.random.default_rng(n_frames))
    frames, _ = simulate_episode(scope, n_frames, interval_ms)
    window = event_window_for(model.card)
    scores = []
    for t, frame in enumerate(frames):
        w = window.push("stack", t * interval_ms / 1000, frame)
        assert w is not None and w.shape == (model.card["frames"], *frame.shape)
        scores.append(detect_events(event_map(model, w), model.card["threshold"])[0])
    assert len(scores) == n_frames and all(0.0 <= s <= 1.0 for s in scores)


@BORDER_NOT_FIXED
def test_no_detection_near_the_border_of_an_edge_touching_field_without_events(model):
    """Held-out fields (another simulator) whose tubules cross every edge, no event:
    no detection above the card's threshold within 1 µm of the border."""
    for seed in range(3):
        stack, pixel_nm, interval_ms = edge_touching_field(seed, n_frames=6)
        band_px = 1000 / pixel_nm
        h, w = stack.shape[1:]
        window = event_window_for(model.card)
        for t, frame in enumerate(stack):
            x = window.push(seed, t * interval_ms / 1000, frame)
            if x is None:
                continue
            peaks = detect_events(event_map(model, x), model.card["threshold"])[1]
            near = [p for p in peaks if min(p[0], p[1], w - p[0], h - p[1]) < band_px]
            assert not near, f"field {seed}, frame {t}: {near}"


@pytest.mark.parametrize("world", ["simulator", "independent"])
def test_no_border_bias_on_event_free_fields_that_cross_every_edge(model, world):
    """Issue 28's real iSIM stacks put the top detection within 0.5 µm of the border in about half
    the frames, a band of 14 % of the field. On event-free fields whose tubules cross every edge,
    of our simulator and of the held-out one, the shipped model's top score (the top detection at
    any threshold) lies in that band at most 1.5 times as often as the band's share of the field
    (measured for v12: 0.19 of 32 frames against 0.16, and 0.22 against 0.19)."""
    make = ((lambda s: edge_touching_episode(2000 + s, 8)) if world == "simulator"
            else (lambda s: edge_touching_field(1000 + s, 8)))
    e = edge_field_scores(card_run(model), model.card, [make(s) for s in range(4)])
    assert e["frames_scored"] == 32  # windows from the first frame (min_window_frames 1)
    assert 0.13 < e["band_0.5um_share_of_field"] < 0.25
    assert e["top_within_0.5um_of_border"] <= 1.5 * e["band_0.5um_share_of_field"], e


def test_the_event_free_simulator_field_is_the_variety_draw_without_fission_and_crosses_every_edge():
    """`random_microscope(fission=False)` draws the same microscope but for the fission rate, and
    `edge_touching_episode` keeps a field only if its tubules reach all four edges."""
    with_fission = random_microscope(np.random.default_rng(5))[0].config
    without = random_microscope(np.random.default_rng(5), fission=False)[0].config
    assert with_fission.live.fission_rate_per_um_per_s > 0 and without.live.fission_rate_per_um_per_s == 0
    assert without.model_copy(update={"live": with_fission.live}) == with_fission
    frames, pixel_nm, interval_ms = edge_touching_episode(2003, n_frames=2)
    mean = frames.mean(axis=0)
    assert frames.shape == (2, 128, 128) and 80 <= pixel_nm <= 130 and 100 <= interval_ms <= 1000
    assert all(edge.max() > np.percentile(mean, 90) for edge in (mean[0], mean[-1], mean[:, 0], mean[:, -1]))


def test_the_border_bias_figure_counts_where_each_frame_peaks():
    """A map that peaks at the border puts every frame's top score in the 0.5 µm band, one that peaks
    at the centre none; the band of a 128 px field at 100 nm is 5 px wide each side."""
    stack = [(np.ones((3, 128, 128), np.float32), 100.0, 1000.0)]
    card = {"threshold": 0.5, "min_window_frames": 1}
    yy, xx = np.mgrid[:128, :128] + 0.5
    to_border = np.minimum(np.minimum(xx, 128 - xx), np.minimum(yy, 128 - yy))
    def constant(m):  # a model run giving map m for every window
        return lambda x: np.broadcast_to(m, (len(x), 1, *m.shape))

    at_border = edge_field_scores(constant(np.exp(-to_border / 3)), card, stack)
    at_centre = edge_field_scores(constant(to_border / 64), card, stack)
    assert at_border["frames_scored"] == at_centre["frames_scored"] == 3
    assert at_border["top_within_0.5um_of_border"] == 1.0 and at_centre["top_within_0.5um_of_border"] == 0.0
    assert at_border["band_0.5um_share_of_field"] == round(1 - 118**2 / 128**2, 4)
