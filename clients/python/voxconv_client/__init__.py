"""Python client for voxconv's streaming API (grpcio), NumPy in and out.

    from voxconv_client import Client
    with Client("127.0.0.1:50051") as c:
        y = c.infer("sobel3d", x)          # x: numpy [N, C, D, H, W], [C, D, H, W] or [D, H, W]

The volume travels as ordered chunks (InferStream) in its own dtype; chunking is hidden.
On the server's host, `infer(..., shared_memory=True)` passes input and output through shared
memory instead (the server must run with --shared-memory-dir /dev/shm): memory the server
creates and maps (the output is computed straight into it), or a POSIX shared-memory object
this client creates where the server cannot create one.
`infer(..., sliding_window={...})` runs an ONNX model over a whole scan in windows on the
server (MONAI sliding_window_inference semantics), optionally returning labels (argmax).
Stubs are generated from proto/ by ./generate_stubs.sh and committed.
"""
import mmap
import os
from multiprocessing import shared_memory as _shared_memory

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._gen.voxconv.v1 import voxconv_pb2 as pb
from ._gen.voxconv.v1 import voxconv_pb2_grpc as pb_grpc

__all__ = ["Client", "pb", "sliding_window_message"]
__version__ = "0.1.0"

_DTYPES = {
    np.dtype("float32"): pb.FP32,
    np.dtype("float16"): pb.FP16,
    np.dtype("int16"): pb.INT16,
    np.dtype("uint16"): pb.UINT16,
    np.dtype("uint8"): pb.UINT8,
}
# How an output of each wire dtype is read (little-endian); BF16 is widened to float32.
_WIRE = {pb.FP32: "<f4", pb.FP16: "<f2", pb.BF16: "<u2", pb.INT16: "<i2",
         pb.UINT16: "<u2", pb.UINT8: "u1"}

_BLENDS = {"gaussian": pb.BLEND_GAUSSIAN, "constant": pb.BLEND_CONSTANT}
_WINDOW_OUTPUTS = {"logits": pb.WINDOW_OUTPUT_LOGITS,
                   "probabilities": pb.WINDOW_OUTPUT_PROBABILITIES,
                   "labels": pb.WINDOW_OUTPUT_LABELS}
_SLIDING_KEYS = ("roi", "overlap", "blend", "sigma_scale", "batch", "mirror", "output")


def _floats(key, v):
    """One number or three (D, H, W) as a list of floats."""
    vals = [v] if np.ndim(v) == 0 else list(v)
    if len(vals) not in (1, 3):
        raise ValueError(f"sliding_window[{key!r}]: expected one number or three, got {v!r}")
    try:
        return [float(x) for x in vals]
    except (TypeError, ValueError):
        raise ValueError(f"sliding_window[{key!r}]: expected numbers, got {v!r}") from None


def _ints(key, v, n=None):
    vals = [v] if np.ndim(v) == 0 else list(v)
    if n is not None and len(vals) != n:
        raise ValueError(f"sliding_window[{key!r}]: expected {n} integers, got {v!r}")
    out = []
    for x in vals:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < 0:
            raise ValueError(f"sliding_window[{key!r}]: expected non-negative integers, "
                             f"got {v!r}")
        out.append(int(x))
    return out


def sliding_window_message(sliding_window):
    """The pb.SlidingWindow for `infer`'s sliding_window argument (None: no sliding window).

    True or {}: the model's defaults. A dict may set roi (3 ints, D, H, W), overlap (a float
    or 3), blend ("gaussian" or "constant"), sigma_scale (a float or 3), batch (windows per
    network call), mirror (spatial axes 0 = D, 1 = H, 2 = W to mirror over; [] = none) and
    output ("logits", "probabilities" or "labels"); unset keys take the model's defaults.
    A pb.SlidingWindow is passed through.
    """
    if sliding_window is None or sliding_window is False:
        return None
    if isinstance(sliding_window, pb.SlidingWindow):
        return sliding_window
    if sliding_window is True:
        sliding_window = {}
    if not isinstance(sliding_window, dict):
        raise ValueError(f"sliding_window: expected None, True, a dict or a pb.SlidingWindow, "
                         f"got {type(sliding_window).__name__}")
    for key in sliding_window:
        if key not in _SLIDING_KEYS:
            raise ValueError(f"sliding_window: unknown key {key!r} (expected one of "
                             f"{', '.join(_SLIDING_KEYS)})")
    sw = pb.SlidingWindow()
    g = sliding_window.get
    if g("roi") is not None:
        sw.roi.extend(_ints("roi", g("roi"), 3))
    if g("overlap") is not None:
        sw.overlap.extend(_floats("overlap", g("overlap")))
    if g("sigma_scale") is not None:
        sw.sigma_scale.extend(_floats("sigma_scale", g("sigma_scale")))
    if g("blend") is not None:
        if g("blend") not in _BLENDS:
            raise ValueError(f"sliding_window['blend']: expected 'gaussian' or 'constant', "
                             f"got {g('blend')!r}")
        sw.blend = _BLENDS[g("blend")]
    if g("batch") is not None:
        (sw.batch,) = _ints("batch", g("batch"), 1)
    if g("mirror") is not None:
        sw.mirror.SetInParent()  # present even with no axes: "no mirroring"
        sw.mirror.axes.extend(_ints("mirror", g("mirror")))
    if g("output") is not None:
        if g("output") not in _WINDOW_OUTPUTS:
            raise ValueError(f"sliding_window['output']: expected 'logits', 'probabilities' "
                             f"or 'labels', got {g('output')!r}")
        sw.output = _WINDOW_OUTPUTS[g("output")]
    return sw


class Client:
    """A connection to one voxconv server.

    target: "host:port". credentials: grpc.ChannelCredentials for TLS (default plaintext).
    chunk_bytes: input chunk size. timeout: default deadline per call in seconds.
    """

    def __init__(self, target="127.0.0.1:50051", *, credentials=None, chunk_bytes=1 << 20,
                 timeout=None):
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20),
                   # Lets the server send each output chunk as one HTTP/2 frame (16 KiB
                   # by default): ~9% faster on a 128 MiB output over loopback.
                   ("grpc.http2.max_frame_size", 4 << 20)]
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.chunk_bytes = int(chunk_bytes)
        self.timeout = timeout
        self.last_summary = None
        self._region = None  # (SharedMemory, registered name), created on first use
        self._models = {}

    def close(self):
        self._drop_region()
        self.channel.close()

    def _drop_region(self):
        if self._region is None:
            return
        region, self._region = self._region, None
        try:
            self.stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name=region.name),
                                             timeout=self.timeout)
        except grpc.RpcError:
            pass  # the server is gone or restarted: nothing registered to undo
        region.close()

    def _shared_region(self, size, where):
        """This client's region, (re)created when smaller than `size` or of another kind.

        where: "server" (memory the server creates), "client" (a POSIX object this client
        creates and registers), or "auto" (the server's where it can, else the client's).
        """
        r = self._region
        if r is not None and r.size >= size and where in ("auto", r.kind):
            return r
        self._drop_region()
        if where in ("auto", "server"):
            try:
                self._region = _ServerRegion.create(self, size)
                return self._region
            except (grpc.RpcError, OSError, RuntimeError):
                if where == "server":
                    raise
        self._region = _ClientRegion.create(self, size)
        return self._region

    def output_shape(self, model, input_shape):
        """The output shape `model` gives for a 5-D input shape (from GetModel's layers, or an
        ONNX model's output dims)."""
        info = self._models.get(model)
        if info is None:
            info = self._models[model] = self.get_model(model)
        n, _, *spatial = input_shape
        if info.format == "onnx" and info.outputs and len(info.outputs[0].shape) == 5:
            # A graph's output dims; a dynamic one (-1) follows the input's (segmentation
            # networks keep N, D, H, W). The server checks the size against its plan.
            return tuple(int(d) if d >= 0 else int(input_shape[i])
                         for i, d in enumerate(info.outputs[0].shape))
        for layer in info.layers:
            for i in range(3):
                def at(v, default):
                    return v[i] if len(v) > i else default
                k, s = at(layer.kernel, 1), max(at(layer.stride, 1), 1)
                p, d = at(layer.padding, 0), at(layer.dilation, 1)
                span = d * (max(k, 1) - 1) + 1
                if spatial[i] + 2 * p < span:
                    raise ValueError(f"volume: shape {tuple(input_shape)} is too small for "
                                     f"model {model}")
                spatial[i] = (spatial[i] + 2 * p - span) // s + 1
        return (n, info.output_channels, *spatial)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def list_models(self):
        """ModelInfo of every model the server knows (including ones that failed to load)."""
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def get_model(self, name, scan_shape=None):
        """ModelInfo of `name`; with scan_shape ([N, C, D, H, W] of a whole scan) its
        scan_working_bytes is the working memory of a sliding-window call over that scan."""
        req = pb.GetModelRequest(name=name, scan_shape=[int(d) for d in scan_shape or ()])
        return self.stub.GetModel(req, timeout=self.timeout)

    def health(self, service=""):
        """The serving status name of the server ("") or of a service / "model/<name>"."""
        r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                   timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def infer(self, model, volume, output_dtype=None, timeout=None, metadata=None,
              shared_memory=False, sliding_window=None, progress=None):
        """Runs `volume` through `model` and returns the output as a NumPy array.

        volume: [N, C, D, H, W], [C, D, H, W] or [D, H, W], float32 / float16 / int16 /
        uint16 / uint8, sent in its own dtype. The result keeps the leading layout:
        [N, C_out, ...] for 5-D input, [C_out, ...] for 4-D and 3-D input.
        output_dtype: "float32" (default) or "float16" (what the server sends back); with
        sliding_window labels also "uint8" or "uint16". Left unset on a sliding-window call,
        the server picks: float32 for logits / probabilities, uint8 (uint16 beyond 256
        classes) for labels. The result's dtype is the one the server reports.
        metadata: extra gRPC metadata, e.g. [("traceparent", "00-<trace>-<span>-01")] to
        make the server's spans part of the caller's trace.
        shared_memory: pass input and output through this client's shared-memory region
        (created on first use, reused, freed by close()) instead of the socket, for a server
        on this host started with --shared-memory-dir /dev/shm. True: memory the server
        creates (same PID namespace and user; float32 outputs are computed in place), else a
        POSIX object this client creates; "server" or "client" to insist on one.
        sliding_window: run an ONNX model over the whole volume in windows on the server
        (MONAI sliding_window_inference semantics): True for the model's defaults, or a dict
        with any of roi (3 ints), overlap (float or 3), blend ("gaussian" / "constant"),
        sigma_scale (float or 3), batch (int), mirror (list of spatial axes, [] = none),
        output ("logits" / "probabilities" / "labels"; labels come back [N, 1, D, H, W]).
        Not combinable with shared_memory.
        progress: callable(windows_done, windows_total), called on each Progress message of
        a sliding-window call.
        """
        volume = np.asarray(volume)
        if volume.ndim not in (3, 4, 5):
            raise ValueError(
                f"volume: expected [N, C, D, H, W], [C, D, H, W] or [D, H, W], got shape "
                f"{volume.shape}")
        ndim = volume.ndim
        volume = volume.reshape((1,) * (5 - ndim) + volume.shape)
        dtype = np.dtype(volume.dtype.name)  # native byte order, same kind
        if dtype not in _DTYPES:
            raise TypeError(f"volume: dtype {volume.dtype} is not one of "
                            f"{sorted(str(d) for d in _DTYPES)}")
        volume = np.ascontiguousarray(volume, dtype=dtype.newbyteorder("<"))
        sw = sliding_window_message(sliding_window)
        labels = sw is not None and sw.output == pb.WINDOW_OUTPUT_LABELS
        allowed = ("float32", "float16") + (("uint8", "uint16") if labels else ())
        if output_dtype is None:
            # Unspecified on a sliding-window call: the server's choice (FP32, or UINT8 /
            # UINT16 for labels, also where labels are the model's default output).
            out_np = np.dtype("float32")
            out_pb = pb.DTYPE_UNSPECIFIED if sw is not None else pb.FP32
        else:
            out_np = np.dtype(output_dtype)
            if out_np.name not in allowed:
                raise ValueError(f"output_dtype: expected {' or '.join(allowed)}"
                                 f"{' (labels)' if labels else ''}, got {output_dtype}")
            out_pb = _DTYPES[out_np]
            if labels and out_pb == pb.FP32:
                out_pb = pb.DTYPE_UNSPECIFIED  # labels are integers; FP32 is not asked for
        raw = memoryview(volume.reshape(-1).view(np.uint8))
        step = self.chunk_bytes
        header = pb.StreamHeader(model=model, input_dtype=_DTYPES[dtype],
                                 input_shape=list(volume.shape), output_dtype=out_pb)
        if sw is not None:
            header.sliding_window.CopyFrom(sw)
        region = None
        if shared_memory and sw is not None:
            raise ValueError("shared_memory: not supported with sliding_window")
        if shared_memory:
            where = "auto" if shared_memory is True else shared_memory
            if where not in ("auto", "server", "client"):
                raise ValueError(f"shared_memory: expected True, False, 'server' or 'client', "
                                 f"got {shared_memory!r}")
            out_shape = self.output_shape(model, volume.shape)
            out_at = -(-len(raw) // 64) * 64
            region = self._shared_region(
                out_at + int(np.prod(out_shape)) * out_np.itemsize, where)
            region.buf[:len(raw)] = raw
            header.input_shared_memory.CopyFrom(
                pb.SharedMemoryRef(region=region.name, offset=0))
            header.output_shared_memory.CopyFrom(
                pb.SharedMemoryRef(region=region.name, offset=out_at))
            raw = raw[:0]  # no chunks

        def requests():
            yield pb.InferStreamRequest(header=header)
            for off in range(0, len(raw), step):
                yield pb.InferStreamRequest(chunk=pb.Chunk(
                    offset=off, data=bytes(raw[off:off + step])))

        out = shape = summary = None
        wire = out_pb
        for msg in self.stub.InferStream(requests(), timeout=timeout or self.timeout,
                                         metadata=metadata):
            kind = msg.WhichOneof("msg")
            if kind == "header":
                out = np.empty(int(msg.header.total_bytes), dtype=np.uint8)
                shape = tuple(msg.header.shape)
                wire = msg.header.dtype or out_pb or pb.FP32
            elif kind == "chunk":
                data = np.frombuffer(msg.chunk.data, dtype=np.uint8)
                out[msg.chunk.offset:msg.chunk.offset + len(data)] = data
            elif kind == "summary":
                summary = msg.summary
            elif kind == "progress" and progress is not None:
                progress(int(msg.progress.windows_done), int(msg.progress.windows_total))
        if summary is None or out is None:
            raise RuntimeError("stream ended without a header and summary")
        if region is not None:
            out[:] = np.frombuffer(region.buf, np.uint8, len(out), out_at)
        self.last_summary = summary
        if wire not in _WIRE:
            raise RuntimeError(f"output: unsupported dtype {pb.DType.Name(wire)}")
        y = out.view(_WIRE[wire]).reshape(shape)
        if wire == pb.BF16:
            y = (y.astype(np.uint32) << 16).view(np.float32)
        return y if ndim == 5 else y[0]


def _region_name():
    return f"voxconv-py-{os.getpid()}-{os.urandom(6).hex()}"


class _ClientRegion:
    """A POSIX shared-memory object this client creates and registers."""
    kind = "client"

    def __init__(self, shm, name):
        self.shm, self.name, self.size, self.buf = shm, name, shm.size, shm.buf

    @classmethod
    def create(cls, client, size):
        shm = _shared_memory.SharedMemory(create=True, size=size)
        name = _region_name()
        try:
            client.stub.RegisterSharedMemory(pb.RegisterSharedMemoryRequest(
                name=name, key="/" + shm.name, offset=0, byte_size=size),
                timeout=client.timeout)
        except grpc.RpcError:
            shm.close()
            shm.unlink()
            raise
        return cls(shm, name)

    def close(self):
        self.buf = None
        self.shm.close()
        self.shm.unlink()


class _ServerRegion:
    """Sealed memory the server creates and maps (CreateSharedMemory), opened by its key."""
    kind = "server"

    def __init__(self, name, size, f, mm):
        self.name, self.size, self._file, self._mmap = name, size, f, mm
        self.buf = memoryview(mm)

    @classmethod
    def create(cls, client, size):
        name = _region_name()
        made = client.stub.CreateSharedMemory(
            pb.CreateSharedMemoryRequest(name=name, byte_size=size), timeout=client.timeout)
        try:
            f = open(made.key, "r+b", buffering=0)
            try:
                # The same path on another host or PID namespace is some other file.
                link = os.readlink(f"/proc/self/fd/{f.fileno()}")
                if link != f"/memfd:{made.memfd_name} (deleted)":
                    raise RuntimeError(f"{made.key} is not the server's shared memory here")
                mm = mmap.mmap(f.fileno(), size)
            except BaseException:
                f.close()
                raise
        except BaseException:
            try:
                client.stub.UnregisterSharedMemory(
                    pb.UnregisterSharedMemoryRequest(name=name), timeout=client.timeout)
            except grpc.RpcError:
                pass
            raise
        return cls(name, size, f, mm)

    def close(self):
        self.buf.release()
        self.buf = None
        self._mmap.close()
        self._file.close()
