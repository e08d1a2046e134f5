"""A small Python client for voxconv's streaming API (grpcio).

    from voxconv_client import Client
    with Client("127.0.0.1:50051") as c:
        y = c.infer("sobel3d", x)          # x: numpy array [N, C, D, H, W]

The volume travels as ordered chunks (InferStream); chunking is hidden. Stubs are generated
from proto/ by ./generate_stubs.sh.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_gen"))

import grpc  # noqa: E402
from voxconv.v1 import voxconv_pb2 as pb  # noqa: E402
from voxconv.v1 import voxconv_pb2_grpc as pb_grpc  # noqa: E402

_DTYPES = {
    np.dtype("float32"): pb.FP32,
    np.dtype("float16"): pb.FP16,
    np.dtype("int16"): pb.INT16,
    np.dtype("uint16"): pb.UINT16,
    np.dtype("uint8"): pb.UINT8,
}


class Client:
    def __init__(self, target, chunk_bytes=1 << 20):
        self.channel = grpc.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", 64 << 20),
                     ("grpc.max_send_message_length", 64 << 20)],
        )
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.chunk_bytes = chunk_bytes

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def list_models(self):
        return list(self.stub.ListModels(pb.ListModelsRequest()).models)

    def infer(self, model, volume, output_dtype="float32", timeout=None):
        """Sends `volume` ([N, C, D, H, W], in its own dtype) through `model`; returns the
        output as a NumPy array in `output_dtype` (float32 or float16)."""
        volume = np.ascontiguousarray(volume)
        if volume.dtype.newbyteorder("<") != volume.dtype and volume.dtype.byteorder == ">":
            volume = volume.astype(volume.dtype.newbyteorder("<"))
        in_dtype = _DTYPES[np.dtype(volume.dtype.name)]
        out_np = np.dtype(output_dtype)
        out_pb = pb.FP16 if out_np == np.float16 else pb.FP32
        raw = memoryview(volume.reshape(-1).view(np.uint8))

        def requests():
            yield pb.InferStreamRequest(header=pb.StreamHeader(
                model=model, input_dtype=in_dtype, input_shape=list(volume.shape),
                output_dtype=out_pb))
            for off in range(0, len(raw), self.chunk_bytes):
                yield pb.InferStreamRequest(chunk=pb.Chunk(
                    offset=off, data=bytes(raw[off:off + self.chunk_bytes])))

        out = None
        summary = None
        for msg in self.stub.InferStream(requests(), timeout=timeout):
            kind = msg.WhichOneof("msg")
            if kind == "header":
                out = np.empty(int(msg.header.total_bytes), dtype=np.uint8)
                shape = tuple(msg.header.shape)
            elif kind == "chunk":
                data = np.frombuffer(msg.chunk.data, dtype=np.uint8)
                out[msg.chunk.offset:msg.chunk.offset + len(data)] = data
            elif kind == "summary":
                summary = msg.summary
        if summary is None:
            raise RuntimeError("stream ended without a summary")
        self.last_summary = summary
        return out.view("<f2" if out_pb == pb.FP16 else "<f4").reshape(shape)
