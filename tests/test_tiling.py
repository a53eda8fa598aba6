"""Large frames cut into overlapping tiles give exactly the whole frame's localizations (inference/tiling.py)."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import tifffile
from scipy.spatial import cKDTree

from smartscope.inference import tiling
from smartscope.inference.localization import frame_to_photons, localize_photons
from smartscope.inference.session import load_model
from smartscope.simulation import CameraConfig, OpticsConfig
from smartscope.simulation.tiles import dense_emitters, simulate_windows
from smartscope.transport import CameraParams

CAM = CameraConfig()
PARAMS = CameraParams(pixel_size_nm=CAM.pixel_size_nm, offset_adu=CAM.offset_adu, e_per_adu=CAM.e_per_adu,
                      qe=CAM.qe)
FRAME_PX = 1024
CORE_PX = 256


@pytest.fixture(scope="module")
def model():
    return load_model("localization.onnx", "cpu")


@pytest.fixture(scope="module")
def window() -> np.ndarray:
    """A (3, 1024, 1024) photon window: emitters everywhere at 1 /µm², more of them straddling every core edge
    of 256 px tiles, a background that rises 4x across the frame (so no tile's median is the frame's), and a
    saturated patch (NaN photons, filled with the whole frame's median)."""
    rng = np.random.default_rng(32)
    px = CAM.pixel_size_nm
    em = dense_emitters(rng, 1, FRAME_PX, px, 1.0, 500.0)[0]
    edges_px = np.arange(CORE_PX, FRAME_PX, CORE_PX)
    along = rng.uniform(0, FRAME_PX, (2, 120)) * px
    across = (rng.choice(edges_px, (2, 120)) + rng.uniform(-1.5, 1.5, (2, 120))) * px
    straddling = np.column_stack([np.concatenate([across[0], along[0]]), np.concatenate([along[1], across[1]]),
                                  rng.uniform(-400, 400, 240), np.full(240, 3000.0)])
    frames, _, _ = simulate_windows(rng, 1, 3, FRAME_PX, OpticsConfig(), CAM, emitters=[np.vstack([em, straddling])],
                                    background=np.array([10.0]), as_adu=True)
    adu = frames[0]
    adu[:, 700:703, 300:304] = np.iinfo(np.uint16).max
    photons = frame_to_photons(adu, PARAMS)
    return photons + np.linspace(0.0, 30.0, FRAME_PX, dtype=np.float32)[None, None, :]


def test_receptive_field_from_the_graph_is_what_the_network_does(model):
    """Impulse responses through ONNX Runtime reach exactly as far as the graph says (3x3 convs, two 2x2 pools,
    two 2x nearest upsamplings: 23 px either side); the margin adds the decoding context on the stride grid."""
    measured = tiling.measure_receptive_field(model)
    assert measured == tiling.ReceptiveField(23, 23, 4)
    pytest.importorskip("onnx")
    assert tiling.graph_receptive_field(model.path) == measured
    assert tiling.tile_margin_px(model) == 36  # 23 + 1 (peak) + 7 (refinement window) + 1 + 2 → 4 px grid


@pytest.mark.parametrize(("shape", "core_px"), [((1024, 1024), 256), ((1030, 777), 300), ((61, 47), 512),
                                                 ((500, 130), 64)])
def test_tile_cores_partition_the_frame_and_margins_are_clipped(shape, core_px):
    margin, multiple = 36, 4
    tiles = tiling.plan_tiles(shape, core_px, margin, multiple)
    owners = np.zeros(shape, int)
    for t in tiles:
        owners[t.core_y0:t.core_y1, t.core_x0:t.core_x1] += 1
        assert t.y0 == max(0, t.core_y0 - margin) and t.y1 == min(shape[0], t.core_y1 + margin)
        assert t.x0 == max(0, t.core_x0 - margin) and t.x1 == min(shape[1], t.core_x1 + margin)
        assert t.y0 % multiple == 0 and t.x0 % multiple == 0  # on the frame's pooling grid
        assert t.core_y1 - t.core_y0 <= core_px + multiple and t.core_x1 - t.core_x0 <= core_px + multiple
    assert (owners == 1).all()
    # every position, on or off the frame, belongs to exactly one core
    xy_nm = np.random.default_rng(0).uniform(-200, np.array(shape[::-1]) * 100 + 200, (2000, 2))
    owned = sum(t.owns(xy_nm[:, 0], xy_nm[:, 1], 100.0).astype(int) for t in tiles)
    assert (owned == 1).all()


@pytest.fixture(scope="module")
def whole(model, window) -> tuple[np.ndarray, float]:
    """The whole frame's localizations and background, by the untiled pipeline."""
    return localize_photons(model, window, PARAMS, threshold=0.5)


def _matched(tiled: np.ndarray, whole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each tiled localization's distance (nm) to the nearest whole-frame one, and that one's index."""
    return cKDTree(whole[:, :2]).query(tiled[:, :2])


def test_tiles_give_the_whole_frame_result(model, window, whole):
    whole, background = whole
    tiled, tiled_background = tiling.localize_tiled(model, window, PARAMS, threshold=0.5, core_px=CORE_PX)
    assert len(tiling.plan_tiles((FRAME_PX, FRAME_PX), CORE_PX, 36, 4)) == 16
    edges_nm = np.arange(CORE_PX, FRAME_PX, CORE_PX) * CAM.pixel_size_nm
    near_edge = np.abs(whole[:, :2, None] - edges_nm).min(axis=(1, 2)) < 3 * CAM.pixel_size_nm
    assert len(whole) > 8000 and near_edge.sum() > 300  # the test covers the tile borders
    assert len(tiled) == len(whole) and tiled_background == background
    # row by row (merge lists them in the whole frame's order): x, y within 1 nm; z, photons, σ, p, bg
    assert np.abs(tiled[:, :2] - whole[:, :2]).max() < 1.0
    np.testing.assert_allclose(tiled[:, 2:], whole[:, 2:], rtol=1e-4, atol=1e-6)


def test_a_short_margin_or_the_tiles_own_statistics_change_the_result(model, window, whole):
    """The controls: tiles read with a 4 px margin (zero padding where the whole frame has pixels), or
    normalised by their own median and background instead of the whole frame's, do not give its result."""
    whole, _ = whole
    short, _ = tiling.localize_tiled(model, window, PARAMS, threshold=0.5, core_px=512, margin_px=4)
    tiles = tiling.plan_tiles((FRAME_PX, FRAME_PX), 512, tiling.tile_margin_px(model), 4)
    crops = [window[(slice(None), *t.slices)] for t in tiles]
    jobs = [tiling.TileJob(t, c, tuple(tiling.frame_statistics(f, model.card) for f in c))
            for t, c in zip(tiles, crops, strict=True)]
    own = tiling.merge(tiles, [tiling.localize_tile(model, j, PARAMS, threshold=0.5) for j in jobs],
                       CAM.pixel_size_nm)
    for tiled in (short, own):
        distance_nm, _ = _matched(tiled, whole)
        assert (distance_nm > 1.0).sum() > 50


def test_a_frame_off_the_stride_with_saturated_pixels_tiles_exactly(model, window):
    """250 x 203 px (padded to the 4 px stride at the bottom and right edges, in the whole frame and in its edge
    tiles alike) with the saturated patch inside a tile: the NaN pixels are filled with the whole frame's median."""
    crop = window[:, 500:750, 290:493]
    assert np.isnan(crop[-1]).any()
    whole, whole_background = localize_photons(model, crop, PARAMS, threshold=0.5)
    tiled, background = tiling.localize_tiled(model, crop, PARAMS, threshold=0.5, core_px=128)
    assert background == whole_background
    assert len(tiled) == len(whole) > 40 and np.abs(tiled - whole).max() < 1e-3


def test_a_pool_of_worker_processes_gives_the_whole_frame_result(model, window):
    """Tiles of a 256² crop over 2 spawned processes (one ONNX Runtime session each), merged."""
    crop = window[:, :256, :256]
    whole, whole_background = localize_photons(model, crop, PARAMS, threshold=0.5)
    with tiling.TilePool("localization.onnx", workers=2, core_px=128, threads=1) as pool:
        assert len(pool.plan(crop.shape[-2:])) == 4
        tiled, background = pool.localize(crop, PARAMS, threshold=0.5)
    assert np.isfinite(crop).all() and background == whole_background  # one median for both statistics
    assert len(tiled) == len(whole) > 40 and np.abs(tiled - whole).max() < 1e-3


def test_offline_localization_of_large_frames_in_tiles_writes_the_same_table(tmp_path):
    """`localize_stack` tiles frames above its size threshold (here: all) and writes the untiled table, byte for
    byte (the same rows in the same order)."""
    from smartscope.inference.offline import localize_stack

    rng = np.random.default_rng(5)
    em = dense_emitters(rng, 1, 256, CAM.pixel_size_nm, 1.0, 500.0)
    frames, _, _ = simulate_windows(rng, 1, 4, 256, OpticsConfig(), CAM, emitters=em, background=np.array([20.0]),
                                    as_adu=True)
    tifffile.imwrite(tmp_path / "stack.tif", frames[0], photometric="minisblack")
    flags = {"pixel_size_nm": CAM.pixel_size_nm, "adu_per_electron": 1 / CAM.e_per_adu, "offset_adu": CAM.offset_adu,
             "qe": CAM.qe, "provider": "cpu", "progress": False}
    whole = localize_stack(tmp_path / "stack.tif", tmp_path / "whole.csv", **flags)
    tiled = localize_stack(tmp_path / "stack.tif", tmp_path / "tiled.csv", tile_above_px=0, tile_core_px=96, **flags)
    assert not whole["tiled"] and tiled["tiled"] and tiled["localizations"] == whole["localizations"] > 100
    assert (tmp_path / "tiled.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_live_tiles_through_the_worker_pool_give_the_whole_frame_result(model):
    """The live path on real sockets: the frame sender cuts each raw 300 x 392 frame into 3 x 4 tiles (FrameTiler),
    a real worker localizes them one credit at a time, and the gathered, merged result of each frame of a
    3-frame stack equals the whole frame's localization of the same window (frames 0 and 1: shorter windows)."""
    from smartscope.inference.worker import run_worker
    from smartscope.transport.protocol import FrameHeader
    from smartscope.transport.sockets import FramePublisher, ResultReceiver

    rng = np.random.default_rng(11)
    em = dense_emitters(rng, 1, 392, CAM.pixel_size_nm, 1.0, 500.0)
    frames, _, _ = simulate_windows(rng, 1, 3, 392, OpticsConfig(), CAM, emitters=em, background=np.array([20.0]),
                                    as_adu=True)
    stack = np.ascontiguousarray(frames[0][:, :300])
    tiler = tiling.FrameTiler(model, core_px=100)
    assert len(tiler.tiles_for(stack.shape[1:])) == 12
    pub = FramePublisher("tcp://127.0.0.1:*", hwm=4, tiler=tiler)
    rec = ResultReceiver("tcp://127.0.0.1:*")
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(pub.endpoint, rec.endpoint),
                              kwargs={"model": "localization.onnx", "stop": stop, "threads": 1})
    worker.start()
    gather, merged = tiling.TileGather(), {}
    try:
        for t, frame in enumerate(stack):
            header = FrameHeader(seq=t, t_capture_s=time.time(), shape=frame.shape, dtype="uint16", exposure_ms=20.0,
                                 camera=PARAMS, acquisition="live", t=t)
            assert pub.offer(header, frame, timeout_s=60)
        deadline = time.time() + 120
        while len(merged) < 3 and time.time() < deadline:
            for r in rec.receive(100):
                if r.kind == "result" and (whole := gather.add(r)) is not None:
                    merged[whole.seq] = whole
    finally:
        stop.set()
        worker.join(10)
        pub.close()
        rec.close()
    assert sorted(merged) == [0, 1, 2] and pub.tiled == 3 and pub.sent == 36 and gather.incomplete == 0
    photons = frame_to_photons(stack, PARAMS)
    for t, r in merged.items():
        expected, background = localize_photons(model, photons[:t + 1], PARAMS, threshold=0.5)
        got = np.asarray(r.localizations)
        assert r.header.shape == (300, 392) and r.header.tile is None and r.background_photons == background
        assert len(got) == len(expected) > 40 and np.abs(got - expected).max() < 1e-3


def test_the_gather_merges_a_frame_once_all_its_tiles_are_in_and_forgets_incomplete_ones(model):
    """Tiles answer out of order and interleaved between frames; a frame merges at its last tile (the slowest
    tile's timing, frame coordinates, core-owned localizations only); a frame with a lost tile is forgotten beyond
    MAX_FRAMES and counted; a skipped frame is discarded; peaks that disagree with the rows are malformed."""
    from smartscope.transport.protocol import FrameHeader, MalformedMessage, Result

    frame = np.zeros((200, 200), np.uint16) + 120
    tiler = tiling.FrameTiler(model, core_px=100)
    whole = FrameHeader(seq=0, t_capture_s=1.0, shape=frame.shape, dtype="uint16", exposure_ms=20.0, camera=PARAMS,
                        acquisition="g")

    def answers(seq: int) -> list[Result]:
        out = []
        for header, _crop in tiler.cut(dataclasses.replace(whole, seq=seq), frame):
            part = header.tile
            # one localization at the centre of the tile's core, one in its margin (another tile's core)
            centre = ((part.core_x0 + part.core_x1) / 2 * 100, (part.core_y0 + part.core_y1) / 2 * 100)
            margin = ((part.core_x1 + 2) * 100 if part.core_x1 < 200 else (part.core_x0 - 2) * 100, centre[1])
            rows = [(*centre, 0, 500, 10, 0.9, 20), (*margin, 0, 500, 10, 0.9, 20)]
            out.append(Result(worker_id="w", provider="cpu", model="m", seq=seq, header=header, localizations=rows,
                              peak_px=[part.index, 99], n_emitters=2, infer_ms=10.0 + part.index,
                              t_done_s=2.0 + part.index))
        return out

    gather = tiling.TileGather()
    first, second = answers(0), answers(1)
    assert [gather.add(r) for r in (first[3], second[0], first[1], first[0])] == [None] * 4
    merged = gather.add(first[2])
    assert merged.seq == 0 and merged.header.shape == (200, 200) and merged.header.tile is None
    assert merged.n_emitters == 4 and merged.infer_ms == 13.0 and merged.t_done_s == 5.0 and merged.peak_px == []
    assert sorted(merged.localizations) == sorted(r.localizations[0] for r in first)  # each core's own, once
    gather.discard("g", 1)
    assert gather.add(second[1]) is None and gather.incomplete == 0
    gather.MAX_FRAMES = 2
    for seq in (2, 3):
        gather.add(answers(seq)[0])
    assert gather.incomplete == 1  # frame 1, still missing three tiles, is forgotten
    with pytest.raises(MalformedMessage):
        gather.add(first[0].model_copy(update={"peak_px": [1]}))
