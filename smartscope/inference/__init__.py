"""Inference: ONNX Runtime sessions, pre/post-processing, the worker process."""
