"""Send one input to any Open Inference Protocol (KServe v2) gRPC server and print the outputs.

Examples:
    python -m ortserve_client.predict                            # the bundled digit 7 to `digits`
    python -m ortserve_client.predict --image digit_3.png --top-k 3
    python -m ortserve_client.predict --model my_model --npy input.npy
    python -m ortserve_client.predict --model my_model --json '{"x": [[1, 2, 3]]}'

Images need Pillow (pip install 'ortserve-client[images]'); .npy and JSON inputs do not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ortserve_client import codec
from ortserve_client.connection import add_connection_arguments, call_metadata, open_channel
from ortserve_client.pb import grpc_service_pb2 as pb
from ortserve_client.pb import grpc_service_pb2_grpc as pb_grpc

SAMPLE_IMAGE = Path(__file__).resolve().parent / "samples" / "digit_7.png"
# Big tensors both ways: gRPC's default 4 MB receive limit is smaller than many models' inputs.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]


def _open_gray(path: Path, height: int, width: int) -> Any:
    """The image at path as 8-bit grayscale of the given size (Pillow is imported only for images).

    BOX: each pixel becomes the mean of the pixels it covers. Bilinear's wider filter spreads neighbours
    into it, which at 64 -> 8 blurs the strokes of a digit enough to misread it (digit_8.png as 1).
    """
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("reading images needs Pillow: pip install 'ortserve-client[images]'") from None
    return Image.open(path).convert("L").resize((width, height), Image.Resampling.BOX)


def image_to_array(path: Path, height: int, width: int, pixel_max: float) -> np.ndarray:
    """A grayscale image as float32 [1, H, W] in [0, pixel_max], bright digit on dark.

    Scans are usually dark ink on white paper, while the digits data is the other way
    round, so a mostly-bright image is inverted.
    """
    pixels = np.asarray(_open_gray(path, height, width), dtype=np.float32) / 255.0
    if pixels.mean() > 0.5:
        pixels = 1.0 - pixels
    return (pixels * pixel_max)[None, :, :].astype(np.float32)


def _image_inputs(image: Path, spec: pb.ModelMetadataResponse.TensorMetadata, pixel_max: float) -> np.ndarray:
    height, width = int(spec.shape[-2]), int(spec.shape[-1])
    if spec.datatype == "UINT8":
        # A model that takes raw pixels does its own preprocessing (for example digits_pipeline).
        return np.asarray(_open_gray(image, height, width), dtype=np.uint8)
    array = image_to_array(image, height, width, pixel_max)
    # Match the model's rank: [1, H, W] is [C, H, W]; drop C for [H, W] models.
    rank = len(spec.shape) - (1 if spec.shape and spec.shape[0] == -1 else 0)
    while array.ndim > rank:
        array = array[0]
    return array


def inputs_from_args(args: argparse.Namespace, metadata: pb.ModelMetadataResponse) -> dict[str, np.ndarray]:
    """The request's inputs from --json, --npy or --image (the bundled sample when none is given)."""
    if args.json is not None:
        value = json.loads(args.json)
        if isinstance(value, dict):
            return {name: np.asarray(v) for name, v in value.items()}
        return {metadata.inputs[0].name: np.asarray(value)}
    if args.npy is not None:
        loaded = np.load(args.npy, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            return {name: loaded[name] for name in loaded.files}
        return {metadata.inputs[0].name: loaded}
    spec = metadata.inputs[0]
    return {spec.name: _image_inputs(args.image or SAMPLE_IMAGE, spec, args.pixel_max)}


def build_request(
    model: str, version: str, inputs: dict[str, np.ndarray], metadata: pb.ModelMetadataResponse,
    output: str | None, top_k: int,
) -> pb.ModelInferRequest:
    """A ModelInferRequest with raw contents; adds the batch dimension when the model batches."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    specs = {t.name: t for t in metadata.inputs}
    for name, value in inputs.items():
        array = np.asarray(value)
        spec = specs.get(name)
        if spec is not None:
            datatype = spec.datatype
            array = np.asarray(array, dtype=codec.NUMPY_DTYPES[datatype])
            if spec.shape and spec.shape[0] == -1 and array.ndim == len(spec.shape) - 1:
                array = array[None, ...]
        else:
            datatype = codec.datatype_of(array)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(codec.encode_raw(array, datatype))
    if output or top_k:
        requested = request.outputs.add(name=output or metadata.outputs[0].name)
        if top_k:
            requested.parameters["classification"].int64_param = top_k
    return request


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Response outputs as numpy arrays (raw or typed contents)."""
    out = {}
    for index, tensor in enumerate(response.outputs):
        if response.raw_output_contents:
            raw = response.raw_output_contents[index]
            out[tensor.name] = codec.decode_raw(raw, tensor.datatype, tensor.shape, tensor.name)
        else:
            out[tensor.name] = codec.decode_typed(tensor.contents, tensor.datatype, tensor.shape, tensor.name)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001", help="server address host:port")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--model-version", default="")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", type=Path, help="image file (for image models such as digits)")
    source.add_argument("--npy", type=Path, help=".npy file (first input) or .npz (inputs by name)")
    source.add_argument("--json", help="JSON values for the first input, or an object of input name -> values")
    parser.add_argument("--pixel-max", type=float, default=16.0, help="image pixel scale (digits: 16)")
    parser.add_argument("--output", help="output to return (default: all, or the first with --top-k)")
    parser.add_argument("--top-k", type=int, default=None, help="print the k best classes (default 3 for images)")
    parser.add_argument("--timeout-s", type=float, default=30.0)
    add_connection_arguments(parser)
    return parser


def _print_outputs(outputs: dict[str, np.ndarray], top_k: int) -> None:
    for name, value in outputs.items():
        if top_k:
            print(f"{name} (top {top_k}: score:index:label)")
            for row in np.atleast_2d(value):
                print("  " + "  ".join(v.decode() for v in row))
        else:
            print(f"{name} {value.dtype} {list(value.shape)}")
            print(np.array2string(value, threshold=200))


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (1 on an RPC error)."""
    args = _parser().parse_args(argv)
    top_k = args.top_k if args.top_k is not None else (3 if args.npy is None and args.json is None else 0)
    credential = call_metadata(args)
    with open_channel(args, CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            metadata = stub.ModelMetadata(
                pb.ModelMetadataRequest(name=args.model, version=args.model_version), timeout=args.timeout_s,
                metadata=credential,
            )
            inputs = inputs_from_args(args, metadata)
            request = build_request(args.model, args.model_version, inputs, metadata, args.output, top_k)
            response = stub.ModelInfer(request, timeout=args.timeout_s, metadata=credential)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    _print_outputs(decode_outputs(response), top_k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
