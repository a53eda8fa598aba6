"""The shipped ONNX model through ONNX Runtime, on frames from our own simulation."""

from __future__ import annotations

import numpy as np
import pytest

from smartscope.evaluation import score
from smartscope.inference.localization import localize_frame
from smartscope.inference.session import choose_providers, load_model
from smartscope.simulation import CameraConfig, OpticsConfig
from smartscope.simulation.tiles import simulate_tiles
from smartscope.transport import CameraParams
from smartscope.transport.protocol import LOCALIZATION_COLUMNS

CAM = CameraConfig()
PARAMS = CameraParams(pixel_size_nm=CAM.pixel_size_nm, offset_adu=CAM.offset_adu, e_per_adu=CAM.e_per_adu,
                      qe=CAM.qe)


@pytest.fixture(scope="module")
def model(request):
    """The shipped localization model (or, parametrized indirectly, another one)."""
    return load_model(getattr(request, "param", "localization.onnx"), "cpu")


def test_cpu_provider_without_gpu():
    assert choose_providers("auto")[-1] == "CPUExecutionProvider"


def sparse_frames(seed: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """n 64x64 frames (ADU) with 6 emitters of 2000 photons each, and their truth."""
    rng = np.random.default_rng(seed)
    emitters = [np.column_stack([rng.uniform(800, 5600, (6, 2)), rng.uniform(-300, 300, 6), np.full(6, 2000.0)])
                for _ in range(n)]
    return simulate_tiles(rng, n, 64, OpticsConfig(), CAM, emitters=emitters, background=np.full(n, 20.0),
                          as_adu=True)


@pytest.mark.parametrize("model", ["localization.onnx", "localization-w8.onnx"], indirect=True)
def test_localizes_sparse_emitters_accurately(model):
    frames_adu, truth = sparse_frames(3, 20)
    pred = [localize_frame(model, f, PARAMS, threshold=0.5)[0] for f in frames_adu]
    s = score([t[:, :3] for t in truth], [p[:, :3] for p in pred])
    assert s["recall"] >= 0.9 and s["precision"] >= 0.9
    assert s["rmse_lateral_nm"] < 30 and s["rmse_axial_nm"] < 80
    photons = np.concatenate([p[:, 3] for p in pred])
    assert abs(np.median(photons) / 2000 - 1) < 0.15


@pytest.mark.parametrize("shape", [(61, 47), (8, 8), (130, 97)])
def test_sizes_off_the_stride_and_empty_frames(model, shape):
    frame = np.full(shape, 100, np.uint16)  # offset only: no light at all
    locs, bg = localize_frame(model, frame, PARAMS, threshold=0.5)
    assert locs.shape == (0, len(LOCALIZATION_COLUMNS)) and bg == 0.0


@pytest.mark.parametrize("adu", [0, 100, 300, 1000, 5000, 65534])
def test_constant_frames_of_any_level_invent_nothing(model, adu):
    locs, _ = localize_frame(model, np.full((64, 64), adu, np.uint16), PARAMS, threshold=0.5)
    assert len(locs) == 0


def test_nan_and_saturated_pixels_invent_nothing(model):
    frame = np.full((32, 32), 120.0, np.float32)
    frame[5:9, 5:9] = np.nan
    locs, _ = localize_frame(model, frame, PARAMS, threshold=0.5)
    assert len(locs) == 0
    sat = np.full((32, 32), 65535, np.uint16)  # a fully saturated frame is flat: nothing to find
    assert len(localize_frame(model, sat, PARAMS, threshold=0.5)[0]) == 0


def test_a_batch_of_frames_gives_each_frame_its_own_result(model):
    """The worker's batched path (several frames, one ONNX call) equals one frame at a time
    (each with the frames before it as its window)."""
    from smartscope.inference.localization import frame_to_photons
    from smartscope.inference.worker import Streams, _Frame, _infer
    from smartscope.transport import FrameHeader

    frames_adu, _ = sparse_frames(5, 3)
    batch = [_Frame(FrameHeader(seq=i, t=i, t_capture_s=0.0, shape=f.shape, dtype="uint16", exposure_ms=10,
                                camera=PARAMS), frame_to_photons(f, PARAMS), 0.0, 0.1)
             for i, f in enumerate(frames_adu)]

    def streams():
        return Streams(window_frames=3)

    together = _infer(batch, model, None, None, 0.5, streams())
    one_by_one = streams()
    alone = [_infer([f], model, None, None, 0.5, one_by_one)[0] for f in batch]
    assert model.batches and [r["stages"].batch for r in together] == [3, 3, 3]
    assert [r["seq"] for r in together] == [0, 1, 2]
    for a, b in zip(together, alone, strict=True):
        assert a["n_emitters"] == b["n_emitters"] >= 4
        np.testing.assert_allclose(np.array(a["localizations"]), np.array(b["localizations"]), atol=1e-3)


def test_warm_up_runs_at_the_frame_size_given(model):
    model.warm_up((61, 47))  # padded to the stride inside; must not raise
    counting = load_model("counting.onnx", "cpu")
    counting.warm_up((61, 47))
    assert not counting.batches and model.batches


def test_a_window_missing_its_first_frames_repeats_the_oldest_there_is():
    from smartscope.inference.localization import causal_window

    a, b, c, d = (np.full((2, 2), v, np.float32) for v in (1, 2, 3, 4))
    assert causal_window(a, 3)[:, 0, 0].tolist() == [1, 1, 1]
    assert causal_window(np.stack([b, c]), 3)[:, 0, 0].tolist() == [2, 2, 3]
    assert causal_window(np.stack([a, b, c, d]), 3)[:, 0, 0].tolist() == [2, 3, 4]


def test_the_worker_window_stops_at_a_frame_it_did_not_see_and_never_mixes_positions():
    from smartscope.inference.worker import Streams, _consecutive_window

    streams = Streams(window_frames=3)
    p0, p1 = ("run", 0, 0, 0, 0), ("run", 1, 0, 0, 0)  # FrameHeader.stream of positions 0 and 1

    def see(key, t, shape=(2, 2)):
        streams.get(key).history.append(((t, shape), (key[1], t)))
        return _consecutive_window(streams.get(key).history)

    see(p0, 5)
    see(p1, 0)
    assert see(p0, 6) == [(0, 5), (0, 6)]  # position 1's frame in between is not part of position 0's window
    assert see(p1, 2) == [(1, 2)]  # p1 t=1 went to another worker
    assert see(p1, 3) == [(1, 2), (1, 3)]
    assert see(p1, 4) == [(1, 2), (1, 3), (1, 4)]
    assert see(p1, 5, (3, 3)) == [(1, 5)]  # a frame of another shape starts its own window
    assert see(("run-2", 0, 0, 0, 0), 0) == [(0, 0)]  # and so does a new acquisition


def _glow_frame(rng, emitter_xy_nm=None) -> np.ndarray:
    """A 64x64 frame (ADU) on a flat 20 photons/px with an out-of-focus glow up to 4x that
    (centre 32, 32; 8 px wide), and optionally one 2000-photon emitter in focus."""
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    background = 20.0 * (1 + 3.0 * np.exp(-((xx - 32) ** 2 + (yy - 32) ** 2) / (2 * 8.0**2)))
    em = np.zeros((0, 4)) if emitter_xy_nm is None else np.array([[*emitter_xy_nm, 0.0, 2000.0]])
    from smartscope.simulation.camera import photons_to_adu
    from smartscope.simulation.optics import astigmatic_sigmas_nm, render_gaussian_psfs

    sx, sy = astigmatic_sigmas_nm(em[:, 2], OpticsConfig())
    img = render_gaussian_psfs((64, 64), em[:, 0] / 100, em[:, 1] / 100, em[:, 3], sx / 100, sy / 100,
                               out=background.copy())
    return photons_to_adu(img, CAM, rng)


def test_an_out_of_focus_glow_is_background_not_emitters(model):
    rng = np.random.default_rng(11)
    invented = [len(localize_frame(model, _glow_frame(rng), PARAMS, threshold=0.5)[0]) for _ in range(20)]
    assert sum(invented) <= 1
    # an emitter on the glow's flank reports the glow under it as its background (80 photons/px at the
    # centre, 20 far off; 58 at 4 px out), not the frame's median of about 22
    locs = np.concatenate([localize_frame(model, _glow_frame(rng, (3250.0, 2850.0)), PARAMS, threshold=0.5)[0]
                           for _ in range(10)])
    assert len(locs) == 10
    assert np.all(np.abs(locs[:, LOCALIZATION_COLUMNS.index("background_photons")] / 58.0 - 1) < 0.25)


def test_reported_uncertainty_follows_the_real_error(model):
    """The uncertainty column (the network's for crowded detections, the ML fit's precision for
    isolated ones) is the size of the real error: a median |error| / uncertainty near the
    Gaussian 0.67, and the localizations it calls least certain are the worst ones."""
    from smartscope.evaluation import match_frame

    frames_adu, truth = sparse_frames(4, 60)
    errors, uncertainties = [], []
    for f, t in zip(frames_adu, truth, strict=True):
        p = localize_frame(model, f, PARAMS, threshold=0.5)[0]
        ti, pi = match_frame(t[:, :2], p[:, :2])
        errors.append(np.abs(p[pi, 0] - t[ti, 0]))
        uncertainties.append(p[pi, 4])
    err, unc = np.concatenate(errors), np.concatenate(uncertainties)
    assert 0.45 < np.median(err / unc) < 0.95
    least_certain = unc > np.median(unc)
    assert np.median(err[least_certain]) > 1.2 * np.median(err[~least_certain])


def test_emitters_of_the_earlier_frames_are_not_reported_in_a_dark_frame(model):
    """The window is context, not content: molecules that were on in t-2 and t-1 but are
    off in t give no localizations in t."""
    frames_adu, _ = sparse_frames(6, 20)
    dark = simulate_tiles(np.random.default_rng(7), 1, 64, OpticsConfig(), CAM, emitters=[np.zeros((0, 4))],
                          background=np.full(1, 20.0), as_adu=True)[0][0]  # the same background, no emitter
    reported = [len(localize_frame(model, np.stack([frames_adu[i], frames_adu[i + 1], dark]), PARAMS,
                                   threshold=0.5)[0]) for i in range(0, 20, 2)]
    assert sum(reported) == 0


def test_each_stream_keeps_the_event_window_its_card_asks_for():
    """The worker scores events from the card's min_window_frames on (older cards: full windows only),
    each stream with its own window."""
    from smartscope.inference.worker import Streams

    card = {"frames": 5, "window_spacing_ms": 500.0, "min_frames": 2}
    frame = np.ones((4, 4), np.float32)
    full_only, from_first = Streams(window_frames=1, event_card=card), Streams(
        window_frames=1, event_card={**card, "min_window_frames": 1})
    assert full_only.get(("a",)).event_window.push("a", 0.0, frame) is None
    assert from_first.get(("a",)).event_window.push("a", 0.0, frame).shape == (5, 4, 4)
    assert from_first.get(("b",)).event_window.push("b", 0.0, frame).shape == (5, 4, 4)
    assert from_first.get(("a",)).recent_maps.maxlen == 1 and Streams(window_frames=1).get(("a",)).event_window is None
