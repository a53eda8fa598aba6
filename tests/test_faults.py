"""Faults on the real parts: a SIGKILLed worker, a SIGKILLed daemon, forged results, full disks, bad configs.

Each test answers one question a lab asks before leaving smartscope alone for a night: what happens to the
lasers, to the data on disk and to the next run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq
import zmq.auth

from smartscope.config import ConfigError, SmartscopeConfig, load_config
from smartscope.report import read_decisions
from smartscope.service import Daemon, NoWorkers
from smartscope.storage.frames import read_frames
from smartscope.transport.keys import ClientKeys, client_keys, connect_curve, local_worker_key_files
from smartscope.transport.protocol import Result, decode_frame, encode_ready, encode_result


def _until(condition, timeout_s: float, what: str, poll_s: float = 0.05):
    """Wait until condition() is truthy (returns it); fail naming `what` after timeout_s."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(poll_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def _children_of(pid: int) -> list[int]:
    """Processes started with --parent-pid pid (the daemon's workers), alive or zombie, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"--parent-pid" in cmd and cmd[cmd.index(b"--parent-pid") + 1] == str(pid).encode() and state != "Z":
                found.append(int(entry.name))
    return found


# -- a worker dies --------------------------------------------------------------


def test_a_killed_worker_is_reaped_and_replaced_with_the_lasers_safe_meanwhile(config, tmp_path):
    """SIGKILL of the only worker mid-run: logged and counted, reaped, marked gone, started again; while no
    result comes the policies hold and the lasers are at their safe values; they come back when results do."""
    config.inference.require_workers = True
    config.safety.stale_after_s = 0.5
    daemon = Daemon(config)
    try:
        daemon.spawn_workers(1)
        daemon.wait_for_workers(1)
        run = daemon.start_acquisition(tmp_path / "run", 100_000)
        _until(lambda: run.inferred >= 20, 30, "results flow")
        victim = daemon.pool.procs[0]
        lasers_before = {n: daemon.actuator.snapshot()[n] for n in ("activation_mw", "excitation_mw")}
        assert lasers_before["activation_mw"] > 0
        os.kill(victim.pid, signal.SIGKILL)

        _until(lambda: daemon.engine.hold_reason, 10, "the policy engine holds")
        _until(lambda: daemon.actuator.snapshot()["activation_mw"] == 0, 5, "the lasers go safe")
        assert daemon.actuator.snapshot()["excitation_mw"] == 0
        status = daemon.status()
        gone = status["workers"][f"{os.uname().nodename}:{victim.pid}"]
        assert gone["state"] == "gone" and gone["exit"] == "killed by SIGKILL"
        assert status["transport"]["worker_exits"][-1]["reason"] == "killed by SIGKILL"
        assert victim.poll() is not None  # reaped: no zombie left

        _until(lambda: daemon.pool.respawns == 1 and not daemon.engine.hold_reason, 60,
               "a new worker answers and the hold ends")
        _until(lambda: daemon.actuator.snapshot()["activation_mw"] > 0, 5, "the lasers come back")
        decisions = read_decisions(tmp_path / "run")
        outcomes = [d["outcome"] for d in decisions]
        assert outcomes.index("hold") < outcomes.index("lasers_safe") < outcomes.index("lasers_restored")
        # the powers saved when the lasers went safe (results still in flight from the victim may have moved
        # them after lasers_before was read) are the ones restored
        safe = next(d for d in decisions if d["outcome"] == "lasers_safe")
        restored = next(d for d in decisions if d["outcome"] == "lasers_restored")
        assert restored["values"] == safe["values"] and safe["values"]["activation_mw"] > 0
        active = [w for w in daemon.status()["workers"].values() if w["state"] == "active"]
        assert len(active) == 1 and daemon.pool.procs[0].pid != victim.pid
        daemon.stop_acquisition()
        assert run.state == "cancelled" and run.lost >= 0
    finally:
        daemon.close()


def test_a_run_needs_a_live_worker_unless_asked(config, tmp_path):
    config.inference.require_workers = True
    daemon = Daemon(config)
    try:
        with pytest.raises(NoWorkers, match="no inference worker is live"):
            daemon.start_acquisition(tmp_path / "a", 10)
        assert daemon.run is None and daemon.actuator.snapshot()["activation_mw"] in (None, 0)
        run = daemon.start_acquisition(tmp_path / "b", 10, require_workers=False)
        assert run.done.wait(30) and run.state == "finished" and run.counts.acquired == 10
    finally:
        daemon.close()


def test_workers_exit_by_themselves_when_the_daemon_is_killed(tmp_path):
    """SIGKILL of `smartscope demo` mid-run: its workers exit within seconds; the frames file and the state
    table agree to within the frames in flight; the next daemon lists the run as interrupted, and
    `smartscope report` draws it."""
    keys_dir = tmp_path / "keys"
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(_demo_yaml(keys_dir, tmp_path / "data"))
    out = tmp_path / "data" / "run1"
    demo = subprocess.Popen([sys.executable, "-m", "smartscope", "demo", "--config", str(cfg), "--frames", "100000",
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _until(lambda: (out / "frames.csv").is_file() and len((out / "frames.csv").read_bytes().splitlines()) > 151,
               90, "the demo acquires")
        workers = _children_of(demo.pid)
        assert len(workers) == 1
        demo.send_signal(signal.SIGKILL)
        demo.wait(10)
    finally:
        if demo.poll() is None:
            demo.kill()
    _until(lambda: not _children_of(demo.pid), 10, "the orphaned worker exits")

    rows = len((out / "frames.csv").read_text().splitlines()) - 1
    frames = read_frames(out / "frames.ome.tif")  # the OME-TIFF was never closed: one page, the pixels behind it
    assert rows > 150 and abs(len(frames) - rows) <= 2, (len(frames), rows)
    assert frames.shape[1:] == (64, 64) and frames[-1].mean() > frames[-1].min()  # a real frame, not zeros

    config = load_config(cfg)
    daemon = Daemon(config)
    try:
        listed = daemon.runs["run1"]
        assert listed.state == "interrupted" and listed.frames_saved == rows and listed.done.is_set()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["state"] == "interrupted" and summary["frames_saved"] == rows
        assert summary["frames_on_disk"] == len(frames)
    finally:
        daemon.close()
    report = subprocess.run([sys.executable, "-m", "smartscope", "report", str(out)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert (out / "report.png").stat().st_size > 10_000


def test_demo_stops_cleanly_on_sigterm(tmp_path):
    """SIGTERM to `smartscope demo`: the run is stopped, its files completed (OME-XML, summary), the workers
    exit with it, and the exit status says it did not finish."""
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(_demo_yaml(tmp_path / "keys", tmp_path / "data"))
    out = tmp_path / "run"
    demo = subprocess.Popen([sys.executable, "-m", "smartscope", "demo", "--config", str(cfg), "--frames", "100000",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _until(lambda: (out / "frames.csv").is_file() and len((out / "frames.csv").read_bytes().splitlines()) > 50,
               90, "the demo acquires")
        demo.send_signal(signal.SIGTERM)
        stdout, stderr = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 1, stderr
    assert "SIGTERM: stopping the acquisition" in stdout
    assert "error: the acquisition ended cancelled" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "cancelled"
    with tifffile.TiffFile(out / "frames.ome.tif") as tif:
        assert tif.is_ome and len(tif.pages) == summary["frames_saved"]
    assert not _children_of(demo.pid)


def _demo_yaml(keys_dir: Path, root: Path) -> str:
    cfg = load_config().model_dump(mode="json")
    cfg["simulation"]["camera"]["width_px"] = cfg["simulation"]["camera"]["height_px"] = 64
    cfg["transport"]["keys_dir"] = str(keys_dir)
    cfg["storage"]["root"] = str(root)
    import yaml

    return yaml.safe_dump(cfg)


# -- forged results ---------------------------------------------------------------


def _peer(ctx: zmq.Context, address: str, keys: ClientKeys | None) -> zmq.Socket:
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDTIMEO, 100)
    if keys is not None:
        connect_curve(push, keys)
    push.connect(address)
    return push


def _forged(seq: int, **fields) -> bytes:
    return encode_result(Result(kind="result", seq=seq, worker_id="forger:1", provider="CUDAExecutionProvider",
                                model="localization", n_emitters=0, t_capture_s=time.time(), **fields))


def test_results_from_a_peer_without_an_authorized_key_are_never_taken(config, tmp_path):
    """A real ZeroMQ peer on the results port: with no CURVE key, or with a key of its own that the daemon did
    not authorize, nothing it sends is taken (no phantom worker, no result), and the refusals are counted."""
    daemon = Daemon(config)
    ctx = zmq.Context()
    try:
        run = daemon.start_acquisition(tmp_path / "run", 100_000, require_workers=False)
        server_key, _ = local_worker_key_files(config.transport.resolved_keys_dir())
        public, secret = zmq.auth.load_certificate(
            zmq.auth.create_certificates(tmp_path, "intruder")[1])
        stranger = ClientKeys(zmq.auth.load_certificate(server_key)[0], public, secret)
        peers = [_peer(ctx, daemon.results_address, None), _peer(ctx, daemon.results_address, stranger)]
        for i in range(200):
            for peer in peers:
                try:
                    peer.send(encode_result(Result(kind="hello", worker_id=f"ghost:{i}", provider="CUDA", model="x")),
                              flags=zmq.NOBLOCK)
                    peer.send(_forged(i), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass  # no connection was ever accepted: nothing to queue on
        _until(lambda: daemon.rejected_results().get("unauthorized_key", 0) >= 1, 10, "the stranger is refused")
        time.sleep(0.5)
        assert daemon.pool.workers == {} and run.inferred == 0 and daemon.results_seen == 0
        assert daemon.status()["transport"]["results_rejected"]["unauthorized_key"] >= 1
        assert daemon.receiver.connections["handshake_failed"] >= 1  # the peer with no key at all
        daemon.stop_acquisition()
        assert run.lost >= 0
    finally:
        ctx.destroy(0)
        daemon.close()


def test_results_for_frames_never_sent_or_sent_twice_are_rejected(config, tmp_path):
    """A peer with the workers' key (it can take frames) still cannot inject a result for a frame that was never
    sent, nor answer one frame twice: each is rejected and counted, and no count goes negative."""
    config.transport.shared_memory = "off"  # frames inline: the peer reads them off the socket alone
    daemon = Daemon(config)
    ctx = zmq.Context()
    keys = client_keys(*local_worker_key_files(config.transport.resolved_keys_dir()))
    pull = ctx.socket(zmq.DEALER)
    connect_curve(pull, keys)
    pull.connect(daemon.frames_address)
    pull.send(encode_ready(1))  # as a worker asks for a frame
    push = _peer(ctx, daemon.results_address, keys)
    try:
        push.send(encode_result(Result(kind="hello", worker_id="peer:1", provider="CPU", model="x")))
        _until(lambda: "peer:1" in daemon.pool.workers, 10, "the peer is heard")
        run = daemon.start_acquisition(tmp_path / "run", 100_000, require_workers=False)
        assert pull.poll(10_000)
        header, _pixels = decode_frame(pull.recv_multipart())
        answer = Result(kind="result", seq=header.seq, worker_id="peer:1", provider="CPU", model="x",
                        t_capture_s=header.t_capture_s, header=header)
        for _ in range(3):
            push.send(encode_result(answer))
        never_sent = answer.model_copy(update={"seq": 10**9})
        push.send(encode_result(never_sent))
        push.send(encode_result(Result(kind="release", worker_id="peer:1", provider="CPU", model="x",
                                       skipped=[(run.id, 10**9 + 1), (run.id, header.seq)])))
        # the release comes after the rejected results: wait for both (the results thread takes them in order)
        _until(lambda: daemon.rejected_results().get("unknown_or_duplicate_frame", 0) == 3
               and daemon.rejected_results().get("skip_of_unknown_frame", 0) == 2, 10, "rejections")
        assert run.inferred == 1
        assert daemon.rejected_results()["unknown_or_duplicate_frame"] == 3
        assert daemon.rejected_results()["skip_of_unknown_frame"] == 2
        daemon.stop_acquisition()
        assert run.skipped == 0 and run.lost == run.counts.published - 1 >= 0
    finally:
        ctx.destroy(0)
        daemon.close()


# -- storage ------------------------------------------------------------------------


def test_a_plan_larger_than_the_free_space_is_refused(config, tmp_path):
    daemon = Daemon(config)
    try:
        free_bytes = __import__("shutil").disk_usage(tmp_path).free
        frames = int(free_bytes / (64 * 64 * 2)) + 1000
        with pytest.raises(ValueError, match="free on"):
            daemon.start_acquisition(tmp_path / "big", frames, require_workers=False)
        assert daemon.run is None and not (tmp_path / "big").exists()
    finally:
        daemon.close()


# -- config ------------------------------------------------------------------------


def test_every_unsafe_value_in_a_config_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("safety:\n"
                    "  activation_mw: {range: {min: -5, max: 100}, safe_value: 250}\n"
                    "  excitation_mw: {range: {min: 0, max: 50}, safe_value: 60}\n"
                    "  z_um: {range: {min: -10, max: 10}, safe_value: 11}\n"
                    "transport: {auth: none, results_address: 'tcp://*:5556'}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = str(e.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["safety.activation_mw", "safety.excitation_mw",
                                                              "safety.z_um", "transport"]
    assert "range.min -5.0 is a negative power" in lines[0] and "safe_value 250.0 is outside" in lines[0]
    assert "tcp://*:5556" in lines[3]


def test_a_port_in_use_is_a_sentence_naming_the_setting(config):
    blocker = zmq.Context.instance().socket(zmq.PULL)
    port = blocker.bind_to_random_port("tcp://127.0.0.1")
    try:
        config.transport.results_address = f"tcp://127.0.0.1:{port}"
        with pytest.raises(ConfigError, match=r"change transport\.results_address"):
            Daemon(config)
    finally:
        blocker.close(0)


def test_serve_with_a_port_in_use_exits_with_one_sentence(tmp_path):
    blocker = zmq.Context.instance().socket(zmq.PULL)
    port = blocker.bind_to_random_port("tcp://127.0.0.1")
    try:
        cfg = SmartscopeConfig.model_validate(load_config().model_dump())
        cfg.transport.frames_address = f"tcp://127.0.0.1:{port}"
        cfg.transport.keys_dir = str(tmp_path / "keys")
        path = tmp_path / "c.yaml"
        import yaml

        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        done = subprocess.run([sys.executable, "-m", "smartscope", "serve", "--config", str(path), "--port", "0"],
                              capture_output=True, text=True, timeout=60)
    finally:
        blocker.close(0)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert f"cannot listen on tcp://127.0.0.1:{port}" in done.stderr and "transport.frames_address" in done.stderr


def test_keys_are_owner_only(config):
    keys_dir = config.transport.resolved_keys_dir()
    Daemon(config).close()
    assert (keys_dir.stat().st_mode & 0o077) == 0
    for secret in keys_dir.glob("*.key_secret"):
        assert (secret.stat().st_mode & 0o077) == 0
    assert np.array_equal(sorted(p.name for p in (keys_dir / "authorized").iterdir()), ["worker.key"])


def test_a_worker_on_another_host_joins_with_its_own_key_and_is_locked_out_without_it(config, tmp_path):
    """`smartscope keys add NAME` makes a keypair the daemon admits; deleting its public key locks it out."""
    import threading

    from smartscope.inference.worker import run_worker
    from smartscope.transport.keys import add_worker_key

    daemon = Daemon(config)
    keys_dir = config.transport.resolved_keys_dir()
    secret = add_worker_key(keys_dir, f"remote-{tmp_path.name[-8:]}")
    keys = client_keys(keys_dir / "server.key", secret)
    try:
        for admitted in (True, False):
            stop = threading.Event()
            worker = threading.Thread(target=run_worker, args=(daemon.frames_address, daemon.results_address),
                                      kwargs={"model": "localization.onnx", "stop": stop, "keys": keys}, daemon=True)
            refused_before = daemon.rejected_results().get("unauthorized_key", 0)
            worker.start()
            if admitted:
                _until(lambda: any(w["state"] == "active" for w in daemon.worker_status().values()), 30,
                       "the remote worker is heard")
            else:
                _until(lambda before=refused_before: daemon.rejected_results().get("unauthorized_key", 0) > before, 30,
                       "the locked-out worker is refused")
                assert len(daemon.worker_status()) == 1  # only the earlier, admitted one
            stop.set()
            worker.join(10)
            (keys_dir / "authorized" / secret.name.replace(".key_secret", ".key")).unlink(missing_ok=True)
    finally:
        daemon.close()


def test_a_plan_over_the_event_limit_is_refused_before_it_is_walked(config):
    """10⁶ events asked for in a few bytes: refused from the plan's axes alone, naming the limit, without
    walking (or holding) a single event."""
    import useq

    from smartscope.acquisition.plan import MAX_PLAN_EVENTS, PlanError

    daemon = Daemon(config)
    try:
        plan = useq.MDASequence(time_plan={"interval": 1, "loops": 10_000}, z_plan={"range": 4, "step": 0.04},
                                channels=["SMLM"])
        with pytest.raises(PlanError, match=f"1010000 events, more than {MAX_PLAN_EVENTS} "
                                            r"\(10000 t x 101 z\)"):
            daemon.check_plan(plan)
        # a grid useq would build whole to size it (3 TiB of indices; found by fuzzing), in a sub-sequence too
        grid = {"rows": 206880, "columns": 2028885}
        with pytest.raises(PlanError, match=r"419735728800 events, more than .*\(419735728800 g\)"):
            daemon.check_plan(useq.MDASequence(grid_plan=grid))
        with pytest.raises(PlanError, match=r"sequence\.stage_positions\[1\]\.sequence: 419735728800 events"):
            daemon.check_plan(useq.MDASequence(stage_positions=[(1, 1), {"x": 2, "y": 2, "sequence": {
                "grid_plan": grid}}]))
        with pytest.raises(PlanError, match="more than"):
            daemon.start_acquisition(None, sequence=plan, require_workers=False)
        assert daemon.run is None
    finally:
        daemon.close()


def test_a_stage_that_refuses_a_move_ends_the_run_errored_with_the_lasers_safe(config, tmp_path):
    """The configured travel is wider than the stage really goes: the move is refused by the device mid-run;
    the run ends errored with the device's words, the lasers go safe, and the next run starts."""
    from smartscope.config import Range

    config.safety.stage_x_um = Range(min=0, max=100_000)
    daemon = Daemon(config)
    try:
        run = daemon.start_acquisition(tmp_path / "a", sequence=__import__("useq").MDASequence(
            stage_positions=[(5, 5), (50_000, 5)], time_plan={"interval": 0, "loops": 3}), require_workers=False)
        assert run.done.wait(60)
        assert run.state == "errored" and "slide" in run.error.lower(), run.error
        assert run.counts.acquired == 1  # (t0, p0), then the move to p1 is refused
        assert daemon.actuator.snapshot()["activation_mw"] == 0 and daemon.actuator.snapshot()["excitation_mw"] == 0
        again = daemon.start_acquisition(tmp_path / "b", 5, require_workers=False)
        assert again.done.wait(30) and again.state == "finished"
    finally:
        daemon.close()


def test_an_oversized_result_costs_its_sender_the_connection_and_nothing_else(config, tmp_path):
    """A peer with the workers' key sends a 17 MiB message: ZeroMQ cuts it off (MAX_RESULT_BYTES), nothing of
    it is taken, the cut is counted, and results keep flowing from the others."""
    from smartscope.transport.sockets import MAX_RESULT_BYTES

    daemon = Daemon(config)
    ctx = zmq.Context()
    keys = client_keys(*local_worker_key_files(config.transport.resolved_keys_dir()))
    try:
        big, small = _peer(ctx, daemon.results_address, keys), _peer(ctx, daemon.results_address, keys)
        small.send(encode_result(Result(kind="hello", worker_id="small:1", provider="CPU", model="x")))
        _until(lambda: "small:1" in daemon.pool.workers, 10, "the well-behaved peer is heard")
        before = daemon.receiver.connections["disconnected"]
        big.send(b"{" + b" " * (MAX_RESULT_BYTES + (1 << 20)) + b"}")
        _until(lambda: daemon.receiver.connections["disconnected"] > before, 10, "the oversized sender is cut off")
        small.send(encode_result(Result(kind="heartbeat", worker_id="small:1", provider="CPU", model="x")))
        _until(lambda: daemon.pool.workers["small:1"]["last_seen_s"] > time.time() - 1, 10, "the other goes on")
        assert set(daemon.pool.workers) == {"small:1"} and sum(daemon.receiver.malformed.values()) == 0
    finally:
        ctx.destroy(0)
        daemon.close()



def test_no_camera_sequence_outlives_a_stopped_run(config, tmp_path):
    """A stop that lands as a burst starts: the camera's sequence is stopped with the run (fuzzing found one
    left running, filling 1.4 GB of buffer with frames no one read)."""
    import useq

    config.storage.root = str(tmp_path)
    daemon = Daemon(config)
    try:
        for i in range(30):
            daemon.start_acquisition(None, sequence=useq.MDASequence(time_plan={"interval": 0, "loops": 300}),
                                     require_workers=False)
            time.sleep(0.005 * (i % 8))  # before, at and after the burst's start
            run = daemon.stop_acquisition()
            assert run.done.is_set() and not daemon.core.isSequenceRunning(), i
    finally:
        daemon.close()
