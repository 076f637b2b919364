"""The Open Inference Protocol (v2) over REST, as KServe and Triton serve it, for tritonclient.http.

``GET /v2``, ``/v2/health/live|ready``, ``/v2/models/{m}[/versions/{v}]`` with
``/ready``, ``/config`` and ``POST .../infer``: JSON tensors, and the binary tensor
data extension (``Inference-Header-Content-Length``: a JSON header, then each binary
input's bytes; ``binary_data_size``; outputs as binary with ``binary_data`` or
``binary_data_output``). A request becomes the protocol's own ModelInferRequest
and goes to pipelines.inference_plane, as gRPC's does: the same model and tensor
names, the same answers. Model names may hold slashes (``ViT-B/32``), so the path
after ``/v2/models/`` is split here rather than by the router.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from starlette.responses import JSONResponse, Response

from clipvision.inference_v2 import grpc_service_pb2 as oip
from clipvision.server.errors import InvalidRequestError, MethodNotFoundError, Reason
from clipvision.server.http.exchange import HttpCall
from clipvision.server.http.json_body import field, json_object, parse_json
from clipvision.server.http.statuses import Fault
from clipvision.server.ops.health import HealthReporter
from clipvision.server.pipelines.inference_plane import InferencePlane

HEADER_LENGTH = "inference-header-content-length"
BINARY_SIZE = "binary_data_size"


def render(fault: Fault) -> Response:
    """The protocol's REST error: ``{"error": "..."}``."""
    return JSONResponse({"error": f"{fault.reason}: {fault.message}"}, status_code=fault.status)


class OipRoutes:
    """The REST handlers over the protocol's data plane."""

    def __init__(self, plane: InferencePlane, health: HealthReporter, max_values: int) -> None:
        self._plane = plane
        self._health = health
        self._max_values = max_values

    async def server_metadata(self, call: HttpCall) -> Response:
        """The server's name, version and extensions (binary tensor data)."""
        metadata = self._plane.server_metadata()
        return JSONResponse(
            {
                "name": metadata.name,
                "version": metadata.version,
                "extensions": ["binary_tensor_data"],
            }
        )

    async def live(self, call: HttpCall) -> Response:
        """200 whenever the process answers."""
        return JSONResponse({"live": True})

    async def ready(self, call: HttpCall) -> Response:
        """200 exactly when grpc.health.v1 reports SERVING, else 503."""
        serving = self._health.serving
        return JSONResponse({"ready": serving}, status_code=200 if serving else 503)

    async def model(self, call: HttpCall) -> Response:
        """GET /v2/models/{m}[/versions/{v}][/ready|/config]: metadata, readiness or config."""
        name, version, action = _model_path(call.request.path_params["rest"], ("ready", "config"))
        if action == "ready":
            ready = self._plane.model_ready(name, version, self._health.serving)
            return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)
        if action == "config":
            config = await self._plane.model_config(name, version)
            return JSONResponse(_config(config))
        metadata = await self._plane.model_metadata(name, version)
        return JSONResponse(
            {
                "name": metadata.name,
                "versions": list(metadata.versions),
                "platform": metadata.platform,
                "inputs": [_tensor(t) for t in metadata.inputs],
                "outputs": [_tensor(t) for t in metadata.outputs],
            }
        )

    async def infer(self, call: HttpCall) -> Response:
        """POST .../infer: JSON or binary tensors in, JSON or binary EMBEDDING out."""
        name, version, _ = _model_path(call.request.path_params["rest"], ("infer",), "infer")
        body = call.take_body()
        header_length = call.request.headers.get(HEADER_LENGTH)
        binary = b""
        if header_length is not None:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise InvalidRequestError(
                    Reason.REQUEST_MALFORMED,
                    f"{HEADER_LENGTH} must be the length of the body's JSON header, at most "
                    f"the body's {len(body)} bytes.",
                )
            binary = body[int(header_length) :]
            body = body[: int(header_length)]
        document = json_object(parse_json(body, self._max_values))
        del body
        request, binary_out = _infer_request(document, binary, name, version)
        del binary
        response = await self._plane.infer(request, call.scope)
        return _infer_response(response, binary_out)


def _model_path(
    rest: str, actions: tuple[str, ...], required: str | None = None
) -> tuple[str, str, str]:
    """(model, version, action) from the path after /v2/models/."""
    action = ""
    for candidate in actions:
        if rest.endswith("/" + candidate):
            rest, action = rest.removesuffix("/" + candidate), candidate
            break
    if required is not None and action != required:
        raise MethodNotFoundError(
            Reason.METHOD_NOT_FOUND, f"POST goes to /v2/models/<model>[/versions/<v>]/{required}."
        )
    name, marker, version = rest.rpartition("/versions/")
    if not marker:
        name, version = rest, ""
    return name, version, action


def _tensor(tensor: oip.ModelMetadataResponse.TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def _config(config: oip.ModelConfig) -> dict[str, Any]:
    """Triton's model configuration as its REST API writes it (numbers as numbers)."""
    return {
        "name": config.name,
        "platform": config.platform,
        "backend": config.backend,
        "max_batch_size": config.max_batch_size,
        "input": [
            {"name": t.name, "data_type": oip.DataType.Name(t.data_type), "dims": list(t.dims)}
            for t in config.input
        ],
        "output": [
            {"name": t.name, "data_type": oip.DataType.Name(t.data_type), "dims": list(t.dims)}
            for t in config.output
        ],
    }


def _infer_request(
    document: dict[str, Any], binary: bytes, name: str, version: str
) -> tuple[oip.ModelInferRequest, bool]:
    """The protocol's ModelInferRequest for a REST body, and whether outputs go binary."""
    request = oip.ModelInferRequest(
        model_name=name, model_version=version, id=field(document, "id", str, "")
    )
    parameters = field(document, "parameters", dict, {})
    _parameters(request.parameters, parameters)
    offset = 0
    for index, tensor in enumerate(field(document, "inputs", list, [])):
        tensor = json_object(tensor)
        entry = request.inputs.add(
            name=field(tensor, "name", str, ""), datatype=field(tensor, "datatype", str, "")
        )
        shape = field(tensor, "shape", list, [])
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
            raise _malformed(f"inputs[{index}].shape must be an array of integers.")
        entry.shape.extend(shape)
        own = field(tensor, "parameters", dict, {})
        size = own.get(BINARY_SIZE)
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise _malformed(
                    f"inputs[{index}].parameters.{BINARY_SIZE} runs past the body's binary part "
                    f"({len(binary)} bytes after the header)."
                )
            request.raw_input_contents.append(binary[offset : offset + size])
            offset += size
            continue
        data = field(tensor, "data", list, [])
        if not all(isinstance(item, str) for item in data):
            raise _malformed(
                f"inputs[{index}].data must be strings (BYTES as UTF-8); send images with the "
                "binary tensor extension (tritonclient: binary_data=True)."
            )
        entry.contents.bytes_contents.extend(item.encode("utf-8") for item in data)
    if offset != len(binary):
        raise _malformed("The body has binary data that no input's binary_data_size accounts for.")
    binary_out = bool(parameters.get("binary_data_output", False))
    for output in field(document, "outputs", list, []):
        output = json_object(output)
        request.outputs.add(name=field(output, "name", str, ""))
        binary_out = bool(field(output, "parameters", dict, {}).get("binary_data", binary_out))
    return request, binary_out


def _parameters(into: Any, parameters: dict[str, Any]) -> None:
    for key, value in parameters.items():
        if isinstance(value, bool):
            into[key].bool_param = value
        elif isinstance(value, int):
            into[key].int64_param = value
        elif isinstance(value, float):
            into[key].double_param = value
        elif isinstance(value, str):
            into[key].string_param = value
        else:
            raise _malformed(f"Parameter {key[:64]!r} must be a boolean, number or string.")


def _infer_response(response: oip.ModelInferResponse, binary: bool) -> Response:
    (output,) = response.outputs
    raw = response.raw_output_contents[0]
    tensor: dict[str, Any] = {
        "name": output.name,
        "datatype": output.datatype,
        "shape": list(output.shape),
    }
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": [tensor],
    }
    if response.id:
        document["id"] = response.id
    if not binary:
        tensor["data"] = np.frombuffer(raw, "<f4").tolist()
        return JSONResponse(document)
    tensor["parameters"] = {BINARY_SIZE: len(raw)}
    header = json.dumps(document).encode()
    return Response(
        header + raw,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def _malformed(message: str) -> InvalidRequestError:
    return InvalidRequestError(Reason.REQUEST_MALFORMED, message)
