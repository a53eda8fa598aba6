"""`smartscope` command line: demo, serve, worker, simulate, train, offline analysis (localize, count, events), bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

from smartscope.config import ConfigError, SmartscopeConfig, load_config

log = logging.getLogger("smartscope")


def _load(path: str | None) -> SmartscopeConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


# -- demo ----------------------------------------------------------------------


def _serve_in_thread(app, host: str) -> tuple[object, int]:
    """uvicorn on a free loopback port, in a background thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("API server did not start")
        time.sleep(0.05)
    return server, port


def _http(method: str, url: str, token: str | None = None, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def cmd_demo(args: argparse.Namespace) -> int:
    from smartscope.api import create_app
    from smartscope.service import Daemon

    config = _load(args.config)
    # private, collision-free ports: the demo is one process tree on loopback
    config.transport.frames_address = "tcp://127.0.0.1:0"
    config.transport.results_address = "tcp://127.0.0.1:0"
    config.inference.workers = max(1, config.inference.workers)
    out = Path(args.out)
    token = secrets.token_urlsafe(24)
    try:
        daemon = Daemon(config)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    server = None
    try:
        print(f"starting {config.inference.workers} inference worker(s)…", flush=True)
        daemon.spawn_workers()
        daemon.wait_for_workers(config.inference.workers)
        print(f"workers ready on {daemon.status()['provider']}", flush=True)
        server, port = _serve_in_thread(create_app(daemon, token=token), "127.0.0.1")
        base = f"http://127.0.0.1:{port}"
        print(f"API on {base} (docs: {base}/docs)", flush=True)
        daemon.storage_root.mkdir(parents=True, exist_ok=True)
        try:
            run = daemon.start_acquisition(out, args.frames)
        except (ValueError, RuntimeError) as e:  # a plan the disk cannot hold, no live worker, ...
            print(f"error: {e}", file=sys.stderr)
            return 1
        signalled: list[int] = []
        with _on_signals(lambda sig, _frame: signalled.append(sig)):
            while not run.done.wait(1.0) and not signalled:
                st = _http("GET", f"{base}/status")
                latest = st.get("latest") or {}
                print(f"  frame {st.get('frames_acquired', 0):>6}/{run.n_frames}  inferred "
                      f"{st.get('frames_inferred', 0):>6}  emitters {latest.get('n_emitters', '-'):>3}  activation "
                      f"{st['actuators'].get('activation_mw') or 0:6.1f} mW  z {st['actuators'].get('z_um') or 0:+.3f} µm"
                      + (f"  HOLD: {st['hold']}" if st.get("hold") else ""), flush=True)
            if signalled:
                print(f"{signal.Signals(signalled[0]).name}: stopping the acquisition (files closed, lasers safe)…",
                      flush=True)
                daemon.stop_acquisition(wait_s=60)
        summary = run.summary
        print(json.dumps({k: summary[k] for k in ("state", "frames_acquired", "frames_saved", "frames_inferred",
                                                  "frames_dropped_inference", "latency_ms", "provider",
                                                  "actions", "localizations")}, indent=2))
        print(f"results in {out}/")
        if summary["state"] != "finished":
            print(f"error: the acquisition ended {summary['state']}: {summary['error'] or 'stopped by a signal'}",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        if server is not None:
            server.should_exit = True
        daemon.close()


# -- serve ---------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from smartscope.api import create_app
    from smartscope.service import Daemon

    config = _load(args.config)
    host = args.host or config.api.host
    port = args.port if args.port is not None else config.api.port
    token = config.api.resolved_token()
    if token is None:
        log.warning("no API token (SMARTSCOPE_TOKEN or api.token): all writes are refused")
    try:
        daemon = Daemon(config)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    try:
        daemon.spawn_workers()
        app = create_app(daemon, token=token, protect_reads=config.api.protect_reads)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
        server.capture_signals = lambda: _on_signals(server.handle_exit)
        server.run()
        log.info("shutting down: acquisition stopped, files closed, lasers safe, workers told to exit")
    finally:
        daemon.close()
    return 0


@contextlib.contextmanager
def _on_signals(handler):
    """SIGTERM/SIGINT call `handler` (in `serve`: uvicorn's loop ends, a second SIGINT forces it; in `demo`: the
    run stops), then the daemon closes: the run's files complete, lasers safe, workers told to exit.

    uvicorn's own handling re-raises the signal after its shutdown, which
    would kill the process before the daemon stops the run and closes its files.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- report --------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from smartscope.report import NotARunError, write_report

    try:
        paths = write_report(Path(args.dir))
    except NotARunError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


# -- worker --------------------------------------------------------------------


def _with_host(address: str, host: str) -> str:
    host = host.removeprefix("tcp://")
    port = address.rsplit(":", 1)[1]
    return f"tcp://{host}:{port}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _training_steps(text: str) -> int:
    """At least 20: the learning rate warms up over the first 10 % of the steps (OneCycleLR)."""
    value = _positive_int(text)
    if value < 20:
        raise argparse.ArgumentTypeError(f"must be at least 20 (the learning rate warms up over the first 10 %), "
                                         f"got {value}")
    return value


def _shape_px(text: str) -> tuple[int, int]:
    """'256x256' → (256, 256)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW in pixels, e.g. 256x256, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"frame size must be positive, got {text!r}")
    return h, w


def cmd_worker(args: argparse.Namespace) -> int:
    from smartscope.inference.session import ModelError
    from smartscope.inference.worker import run_worker
    from smartscope.transport.keys import client_keys, local_worker_key_files

    config = _load(args.config)
    frames, results = config.transport.frames_address, config.transport.results_address
    if args.connect:
        frames, results = _with_host(frames, args.connect), _with_host(results, args.connect)
    inf = config.inference
    try:
        if args.server_key or args.client_key:
            if not (args.server_key and args.client_key):
                raise ValueError("give both --server-key and --client-key (or neither)")
            keys = client_keys(Path(args.server_key), Path(args.client_key))
        elif config.transport.auth == "curve" and not args.no_auth:  # on the daemon's host, with its config
            keys = client_keys(*local_worker_key_files(config.transport.resolved_keys_dir()))
        else:
            keys = None
        counts = run_worker(args.frames_address or frames, args.results_address or results,
                            model=None if args.no_localization else args.model or inf.model,
                            provider=args.provider or inf.provider,
                            threshold=args.threshold or inf.detection_threshold,
                            counting_model=args.counting_model or inf.counting_model,
                            event_model=args.event_model or inf.event_model,
                            event_one_view=args.event_one_view or inf.event_views == "one",
                            threads=args.threads or inf.threads_per_worker,
                            max_batch=args.max_batch or inf.max_batch, warmup_shape=args.warmup, keys=keys,
                            parent_pid=args.parent_pid, psf_calibration=args.psf_calibration or inf.psf_calibration)
    except (ModelError, ValueError, OSError) as e:  # OSError: e.g. the keys folder cannot be read
        raise SystemExit(f"error: {e}") from None
    log.info("worker done: %s", counts)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """The CURVE keys of the daemon's sockets: list them, or make and authorize one for a worker elsewhere."""
    from smartscope.transport.keys import add_worker_key, ensure_keys

    keys_dir = _load(args.config).transport.resolved_keys_dir()
    try:
        if args.action == "add":
            secret = add_worker_key(keys_dir, args.name)
            print(f"worker key {args.name!r} made and authorized. On the worker's host, with these two files:\n"
                  f"  smartscope worker --connect DAEMON_HOST --server-key {keys_dir / 'server.key'} "
                  f"--client-key {secret}\n(copy {secret.name} privately; delete "
                  f"{keys_dir / 'authorized' / (args.name + '.key')} to lock it out)")
        else:
            keys_dir = ensure_keys(keys_dir)
            print(f"keys in {keys_dir}; authorized workers: "
                  + ", ".join(sorted(p.stem for p in (keys_dir / "authorized").glob("*.key"))))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


# -- simulate ------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from smartscope.simulation.export import simulate_to_dir

    config = _load(args.config)
    paths = simulate_to_dir(config, n_frames=args.frames, out_dir=Path(args.out), seed=args.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


# -- train ---------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    import importlib

    if args.model == "variants":
        return _train_variants(args)
    if args.model not in ("localization", "counting", "events"):
        raise SystemExit(f"error: unknown model {args.model!r}; available: localization, counting, events, variants")
    if args.measured:
        raise SystemExit("error: --measured applies to variants only")
    try:
        train_and_export = importlib.import_module(f"smartscope.training.{args.model}").train_and_export
    except ImportError as e:
        raise SystemExit(f"error: training needs the train extra (pip install 'smartscope[train]'): {e}") from None
    from smartscope.resources import bundled_path

    out_dir = Path(args.out) if args.out else bundled_path("models")
    options = {"width": args.width} if args.width else {}
    if options and args.model != "localization":
        raise SystemExit("error: --width applies to the localization model only")
    if args.init:
        if args.model != "events":
            raise SystemExit("error: --init applies to the events model only")
        options["init"] = Path(args.init)
    if args.resume:
        if args.model != "events":
            raise SystemExit("error: --resume applies to the events model only")
        options["resume"] = True
    card = train_and_export(seed=args.seed, out_dir=out_dir, steps=args.steps, **options)
    print(json.dumps(card["metrics"], indent=2))
    return 0


def _train_variants(args: argparse.Namespace) -> int:
    """int8 and fp16 variants of the shipped fp32 localization models (no training: converted weights)."""
    if args.width or args.steps or args.init or args.resume:
        raise SystemExit("error: variants takes --seed (calibration draw), --out and --measured only")
    try:
        from smartscope.training.variants import build_variants, record_measurement
    except ImportError as e:
        raise SystemExit(f"error: variants need the train extra (pip install 'smartscope[train]'): {e}") from None
    from smartscope.resources import bundled_path

    out = Path(args.out) if args.out else None
    paths = build_variants(bundled_path("models"), out, seed=args.seed)
    print(json.dumps({p.name: p.stat().st_size for p in paths}, indent=2))
    if args.measured:
        print(json.dumps(record_measurement(json.loads(Path(args.measured).read_text()), out or bundled_path("models")),
                         indent=2))
    return 0


# -- localize ------------------------------------------------------------------


def cmd_localize(args: argparse.Namespace) -> int:
    from smartscope.inference.offline import StackError, localize_stack
    from smartscope.inference.session import ModelError

    try:
        stats = localize_stack(Path(args.stack), Path(args.out), pixel_size_nm=args.pixel_size_nm,
                               adu_per_electron=args.adu_per_electron, offset_adu=args.offset_adu, qe=args.qe,
                               em_gain=args.em_gain, model=args.model, threshold=args.threshold,
                               provider=args.provider, workers=args.workers, psf_calibration=args.psf,
                               read_noise_e=args.read_noise_e)
    except (StackError, ModelError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(stats))
    return 0


def cmd_count(args: argparse.Namespace) -> int:
    from smartscope.inference.offline import StackError, count_stack
    from smartscope.inference.session import ModelError

    try:
        stats = count_stack(Path(args.stack), Path(args.out), pixel_size_nm=args.pixel_size_nm,
                            adu_per_electron=args.adu_per_electron, offset_adu=args.offset_adu, qe=args.qe,
                            em_gain=args.em_gain, model=args.model, provider=args.provider)
    except (StackError, ModelError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(stats))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from smartscope.inference.offline import StackError, events_in_stack
    from smartscope.inference.session import ModelError

    try:
        stats = events_in_stack(Path(args.stack), Path(args.out), pixel_size_nm=args.pixel_size_nm,
                                model=args.model, threshold=args.threshold, provider=args.provider,
                                interval_ms=args.interval_ms)
    except (StackError, ModelError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(stats))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from smartscope.inference.offline import StackError
    from smartscope.inference.psf import calibrate_stack

    try:
        stats = calibrate_stack(Path(args.stack), Path(args.out), z_step_nm=args.z_step_nm, z_first_nm=args.z_first_nm,
                                pixel_size_nm=args.pixel_size_nm, adu_per_electron=args.adu_per_electron,
                                offset_adu=args.offset_adu, qe=args.qe, em_gain=args.em_gain)
    except StackError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(stats))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from smartscope.render import render_table

    try:
        stats = render_table(Path(args.locs), Path(args.out), pixel_nm=args.pixel_nm, blur_nm=args.blur_nm,
                             colour_by_z=args.colour_by_z)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(stats))
    return 0


# -- analyze -------------------------------------------------------------------


def cmd_analyze(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from smartscope.analysis import AnalysisError, analyze
    from smartscope.analysis.commands import settings_from_args

    try:
        summary = analyze(args.inputs, Path(args.out), settings_from_args(args), scheduler=args.scheduler,
                          workers=args.workers)
    except (AnalysisError, ValidationError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}))
    return 0


def cmd_analysis_step(args: argparse.Namespace) -> int:
    from smartscope.analysis.commands import run_step

    try:
        print(json.dumps(run_step(args.command, args)))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


# -- bench ---------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from smartscope.bench import run_benchmark

    try:
        options = {key: value for key in ("world", "frames", "baseline", "provider", "seeds", "model")
                   if (value := getattr(args, key)) is not None}  # each benchmark says which it takes
        run_benchmark(args.name, Path(args.json) if args.json else None, quick=args.quick, **options)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return 0


def _add_stack_arguments(p: argparse.ArgumentParser, out_help: str, model: str) -> None:
    """The arguments of the offline commands that read raw camera frames: the stack, the CSV, the calibration."""
    p.add_argument("stack", help="TIFF / OME-TIFF stack (frames, y, x)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--pixel-size-nm", type=float, default=None, help="default: from the file's metadata")
    p.add_argument("--adu-per-electron", type=float, default=2.0, help="camera gain (ADU per photoelectron)")
    p.add_argument("--offset-adu", type=float, default=100.0, help="camera baseline (ADU)")
    p.add_argument("--qe", type=float, default=0.8, help="quantum efficiency")
    p.add_argument("--em-gain", type=float, default=1.0, help="EM gain (EMCCD), 1 for sCMOS")
    p.add_argument("--model", default=model)
    p.add_argument("--provider", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartscope", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole closed loop on the simulated microscope")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--out", default="demo-out")
    p.add_argument("--config", default=None, help="YAML config (default: the shipped demo.yaml)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="run the daemon with its REST API")
    p.add_argument("--config", default=None)
    p.add_argument("--host", default=None, help="bind address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="redraw report.png and report.csv of a finished run")
    p.add_argument("dir", help="the run folder (holds frames.csv, summary.json, ...)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("worker", help="one inference worker")
    p.add_argument("--connect", default=None, help="daemon host (ports from the config)")
    p.add_argument("--config", default=None)
    p.add_argument("--frames-address", default=None)
    p.add_argument("--results-address", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--provider", choices=("auto", "cpu", "cuda", "tensorrt"), default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--counting-model", default=None, help="also count emitters with this model")
    p.add_argument("--event-model", default=None, help="also score events with this model")
    p.add_argument("--event-one-view", action="store_true",
                   help="run the event model on the window alone, not with its mirror images (a quarter of the compute)")
    p.add_argument("--no-localization", action="store_true", help="run no localization model (live imaging)")
    p.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime threads (default: one per core)")
    p.add_argument("--max-batch", type=_positive_int, default=None,
                   help="frames run at once when behind (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--warmup", type=_shape_px, default=None, metavar="HxW",
                   help="run the models once on a frame of this size at start")
    p.add_argument("--server-key", default=None, help="the daemon's public key file (server.key; transport.auth curve)")
    p.add_argument("--client-key", default=None,
                   help="this worker's secret key file (from `smartscope keys add NAME`); default: the local worker key")
    p.add_argument("--no-auth", action="store_true", help="connect without CURVE (the daemon's transport.auth: none)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the daemon) is gone")
    p.add_argument("--psf-calibration", default=None, metavar="PSF.npz",
                   help="refine with this bead-calibrated PSF (default: inference.psf_calibration)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("keys", help="the CURVE keys that admit workers (transport.auth: curve)")
    p.add_argument("action", choices=("list", "add"), help="list the authorized workers, or add a key for one")
    p.add_argument("name", nargs="?", default=None, help="add: a name for the worker (letters, digits, - _)")
    p.add_argument("--config", default=None)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("simulate", help="write a simulated stack and its ground truth")
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("train", help="train a model on the simulation and export it to ONNX")
    p.add_argument("model", help="localization | counting | events | variants (int8 and fp16 of the localization "
                   "models, calibrated on the simulation: `smartscope bench variants` measures them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_training_steps, default=None, help="training steps (default: the model's)")
    p.add_argument("--width", type=int, default=None,
                   help="localization only: U-Net width (default 16; 8 gives the faster localization-w8)")
    p.add_argument("--out", default=None, help="output folder (default: models/)")
    p.add_argument("--init", default=None, help="events only: fine-tune from this events ONNX (same architecture)")
    p.add_argument("--resume", action="store_true",
                   help="events only: go on from --out's events-checkpoint.pt (its seed, steps and init)")
    p.add_argument("--measured", default=None,
                   help="variants only: a `smartscope bench variants --json` file whose figures go into the cards")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("localize", help="localize every frame of a recorded stack (ThunderSTORM CSV)")
    _add_stack_arguments(p, "CSV to write", "localization.onnx")
    p.add_argument("--threshold", type=float, default=0.5, help="detection probability threshold")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="processes for the tiles of frames above 1024x1024 px (tiled: the same localizations)")
    p.add_argument("--psf", default=None, metavar="PSF.npz",
                   help="refine with this bead-calibrated PSF (`smartscope calibrate psf`) instead of the card's")
    p.add_argument("--read-noise-e", type=float, default=0.0,
                   help="rms read noise per pixel (electrons; a sCMOS): its variance enters the fit's likelihood")
    p.set_defaults(func=cmd_localize)

    p = sub.add_parser("count", help="count the emitters of every frame of a dense SMLM stack (CSV)")
    _add_stack_arguments(p, "CSV to write: frame, emitters, density [/um2]", "counting.onnx")
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("events", help="score a live-imaging stack for fission events (CSV)")
    p.add_argument("stack", help="TIFF / OME-TIFF stack (frames, y, x)")
    p.add_argument("--out", required=True, help="CSV to write: frame, x [nm], y [nm], score")
    p.add_argument("--pixel-size-nm", type=float, default=None, help="default: from the file's metadata")
    p.add_argument("--model", default="events.onnx")
    p.add_argument("--threshold", type=float, default=None, help="default: the model card's")
    p.add_argument("--interval-ms", type=float, default=None,
                   help="time between frames: the model then sees frames 500 ms apart, as in a live run "
                        "(needed for stacks taken faster than that); default: consecutive frames")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("calibrate", help="calibrate the PSF from a bead z-stack (for the ML refinement)")
    p.add_argument("what", choices=("psf",))
    p.add_argument("stack", help="TIFF z-stack of sparse beads (steps, y, x), one frame per focus step")
    p.add_argument("--out", required=True, help="the model to write (.npz): a model card's psf_calibration")
    p.add_argument("--z-step-nm", type=float, required=True,
                   help="the beads' z relative to the focal plane, frame to frame (the model's z axis)")
    p.add_argument("--z-first-nm", type=float, default=None, help="z of the first frame (default: centred on 0)")
    p.add_argument("--pixel-size-nm", type=float, default=None, help="default: from the file's metadata")
    p.add_argument("--adu-per-electron", type=float, default=2.0, help="camera gain (ADU per photoelectron)")
    p.add_argument("--offset-adu", type=float, default=100.0, help="camera baseline (ADU)")
    p.add_argument("--qe", type=float, default=0.8, help="quantum efficiency")
    p.add_argument("--em-gain", type=float, default=1.0, help="EM gain (EMCCD), 1 for sCMOS")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("render", help="an SMLM image from a localization table (PNG to look at, TIFF to measure)")
    p.add_argument("locs", help="ThunderSTORM-style CSV (x [nm], y [nm][, z [nm]])")
    p.add_argument("--out", required=True, help="sr.png (8-bit view) or sr.tif (float32, pixel size in its metadata)")
    p.add_argument("--pixel-nm", type=float, default=10.0, help="render pixel size")
    p.add_argument("--blur-nm", type=float, default=None, help="Gaussian blur σ (default: the render pixel, ≥ 10 nm)")
    p.add_argument("--colour-by-z", action="store_true", help="colour by the z [nm] column (RGB)")
    p.set_defaults(func=cmd_render)

    from smartscope.analysis.commands import add_analyze_arguments, add_step_arguments

    p = sub.add_parser("analyze", help="the offline SMLM pipeline: localize, drift, merge, filter, FRC (local or Dask)")
    add_analyze_arguments(p)
    p.set_defaults(func=cmd_analyze)
    for step, text in (("drift", "RCC drift correction of a localization CSV"),
                       ("merge", "merge each blink's localizations over consecutive frames"),
                       ("filter", "keep localizations by photons and uncertainty"),
                       ("frc", "Fourier ring correlation resolution of a localization CSV")):
        p = sub.add_parser(step, help=text)
        add_step_arguments(step, p)
        p.set_defaults(func=cmd_analysis_step)

    from smartscope.bench import BENCHMARKS

    p = sub.add_parser("bench", help="a benchmark that prints numbers and writes JSON")
    p.add_argument("name", choices=BENCHMARKS, help="`gpu`: every GPU benchmark within 10 minutes")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    p.add_argument("--world", choices=("simulator", "independent"), default=None,
                   help="events, localization, variants: independent adds the held-out world "
                        "(smartscope.simulation.heldout) beside the simulator's figures, in one run")
    p.add_argument("--frames", type=_positive_int, default=None, help="soak: frames of the long run (default 100000)")
    p.add_argument("--baseline", default=None, metavar="JSON",
                   help="latency: this bench's JSON from another version, printed beside each case")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda", "tensorrt"), default=None,
                   help="latency, tiling, gpu: the ONNX Runtime execution provider (default: the benchmark's)")
    p.add_argument("--seeds", type=_positive_int, default=None, help="frame_rate: seeds 0..N-1 (default 18)")
    p.add_argument("--model", default=None, metavar="ONNX",
                   help="frame_rate: a candidate event model (its card beside it; default: the shipped events.onnx)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # pymmcore-plus, once imported, sets the root logger to DEBUG and logs WARNING+ to stderr itself: our handler
    # keeps our level, and its records are not printed twice
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    logging.getLogger("pymmcore-plus").propagate = False
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
