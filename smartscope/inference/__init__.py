"""Inference: ONNX Runtime sessions, pre/post-processing, the worker process; `pool`: the daemon's side of it."""
