"""ZeroMQ transport: the versioned frame/result protocol and the daemon's sockets."""

from smartscope.transport.protocol import (
    CameraParams,
    FrameHeader,
    MalformedMessage,
    Result,
    decode_frame,
    decode_result,
    encode_frame,
    encode_result,
)

__all__ = ["CameraParams", "FrameHeader", "MalformedMessage", "Result", "decode_frame",
           "decode_result", "encode_frame", "encode_result"]
