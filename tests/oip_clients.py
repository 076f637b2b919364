"""Drive a clipvision server with the Open Inference Protocol's own clients, unmodified.

Run as a separate process by tests/test_oip.py (and usable by hand): tritonclient
and kserve bring their own generated ``inference`` package, which cannot share a
process's protobuf descriptor pool with the server's. It reads a plan (JSON) on
stdin, runs each step against ADDRESS and prints one JSON result per step:

    python tests/oip_clients.py 127.0.0.1:50051 < plan.json
    python tests/oip_clients.py 127.0.0.1:50051 kserve < plan.json     # kserve's client
    python tests/oip_clients.py 127.0.0.1:8000 triton-http < plan.json  # tritonclient.http
    python tests/oip_clients.py deploy/kserve/inferenceservice.yaml kserve-manifest

A step is ``{"kind": ..., ...}``; element lists name files whose bytes are sent.
Results hold vectors as lists of floats, or ``{"error": {"status", "message"}}``.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Result = dict[str, Any]


def _elements(step: dict[str, Any]) -> Any:
    return np.array([Path(p).read_bytes() for p in step["files"]], dtype=np.object_)


def _failure(exc: Exception) -> Result:
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None)
    return {
        "error": {
            "status": status() if callable(status) else None,
            "message": message() if callable(message) else str(exc),
        }
    }


def _vectors(result: Any) -> Result:
    array = result.as_numpy("EMBEDDING")
    return {"shape": list(array.shape), "dtype": str(array.dtype), "vectors": array.tolist()}


def triton(address: str, steps: list[dict[str, Any]]) -> list[Result]:
    """Run each step with tritonclient.grpc (and its aio client for kind "aio")."""
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    def inputs(step: dict[str, Any]) -> list[Any]:
        data = _elements(step)
        tensor = triton_grpc.InferInput(step.get("input", "IMAGE"), [len(data)], "BYTES")
        tensor.set_data_from_numpy(data)
        return [tensor]

    results: list[Result] = []
    with triton_grpc.InferenceServerClient(address) as client:
        for step in steps:
            kind = step["kind"]
            try:
                if kind == "health":
                    names = step["models"]
                    results.append(
                        {
                            "live": client.is_server_live(),
                            "ready": client.is_server_ready(),
                            "models": {name: client.is_model_ready(name) for name in names},
                        }
                    )
                elif kind == "describe":
                    name = step["model"]
                    results.append(
                        {
                            "server": client.get_server_metadata(as_json=True),
                            "metadata": client.get_model_metadata(name, as_json=True),
                            "config": client.get_model_config(name, as_json=True),
                        }
                    )
                elif kind == "infer":
                    result = client.infer(
                        step["model"],
                        inputs(step),
                        parameters=step.get("parameters"),
                        client_timeout=step.get("client_timeout"),
                    )
                    results.append(_vectors(result))
                elif kind == "async_infer":
                    results.append(_async_infer(client, step["model"], inputs(step)))
                elif kind == "cancel":
                    results.append(_cancelled(client, step["model"], inputs(step)))
                elif kind == "stream":
                    results.append({"responses": _stream(client, step, inputs)})
                elif kind == "aio":
                    results.append(asyncio.run(_aio(address, step["model"], inputs(step))))
                elif kind == "unimplemented":
                    client.get_model_repository_index()
                    results.append({})
                else:
                    raise SystemExit(f"unknown step kind {kind!r}")
            except InferenceServerException as exc:
                results.append(_failure(exc))
    return results


def _async_infer(client: Any, model: str, inputs: list[Any]) -> Result:
    done: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.async_infer(model, inputs, lambda result, error: done.put((result, error)))
    result, error = done.get(timeout=30)
    return _failure(error) if error is not None else _vectors(result)


def _cancelled(client: Any, model: str, inputs: list[Any]) -> Result:
    done: queue.Queue[tuple[Any, Any]] = queue.Queue()
    call = client.async_infer(model, inputs, lambda result, error: done.put((result, error)))
    call.cancel()
    result, error = done.get(timeout=30)
    return _failure(error) if error is not None else _vectors(result)


def _stream(
    client: Any, step: dict[str, Any], inputs: Callable[[dict[str, Any]], list[Any]]
) -> list[Result]:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for index, request in enumerate(step["requests"]):
            client.async_stream_infer(step["model"], inputs(request), request_id=str(index))
        responses = []
        for _ in step["requests"]:
            result, error = answers.get(timeout=30)
            if error is not None:
                responses.append(_failure(error))
            else:
                responses.append({"id": result.get_response().id, **_vectors(result)})
        return responses
    finally:
        client.stop_stream()


async def _aio(address: str, model: str, inputs: list[Any]) -> Result:
    import tritonclient.grpc.aio as triton_aio

    async with triton_aio.InferenceServerClient(address) as client:
        ready = await client.is_model_ready(model)
        return {"ready": ready, **_vectors(await client.infer(model, inputs))}


def triton_http(address: str, steps: list[dict[str, Any]]) -> list[Result]:
    """Run each step with tritonclient.http against the server's HTTP address: "health",
    "describe", and "infer" of files (IMAGE) or texts (TEXT), with binary data on or off."""
    import tritonclient.http as triton_rest
    from tritonclient.utils import InferenceServerException

    results: list[Result] = []
    client = triton_rest.InferenceServerClient(address)
    try:
        for step in steps:
            kind = step["kind"]
            try:
                if kind == "health":
                    results.append(
                        {
                            "live": client.is_server_live(),
                            "ready": client.is_server_ready(),
                            "models": {
                                name: client.is_model_ready(name) for name in step["models"]
                            },
                        }
                    )
                elif kind == "describe":
                    name = step["model"]
                    results.append(
                        {
                            "server": client.get_server_metadata(),
                            "metadata": client.get_model_metadata(name),
                            "config": client.get_model_config(name),
                        }
                    )
                elif kind == "infer":
                    if "texts" in step:
                        data = np.array([t.encode() for t in step["texts"]], dtype=np.object_)
                    else:
                        data = _elements(step)
                    tensor = triton_rest.InferInput(
                        step.get("input", "IMAGE"), [len(data)], "BYTES"
                    )
                    tensor.set_data_from_numpy(data, binary_data=step["binary_in"])
                    output = triton_rest.InferRequestedOutput(
                        "EMBEDDING", binary_data=step["binary_out"]
                    )
                    result = client.infer(step["model"], [tensor], outputs=[output])
                    results.append(_vectors(result))
                else:
                    raise SystemExit(f"unknown step kind {kind!r}")
            except InferenceServerException as exc:
                results.append(_failure(exc))
    finally:
        client.close()
    return results


def kserve(address: str, steps: list[dict[str, Any]]) -> list[Result]:
    """Run "infer" steps with kserve's InferenceGRPCClient (needs the kserve package)."""
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def run() -> list[Result]:
        client = InferenceGRPCClient(address, timeout=30)
        results: list[Result] = []
        try:
            for step in steps:
                data = _elements(step)
                tensor = InferInput(step.get("input", "IMAGE"), [len(data)], "BYTES")
                tensor.set_data_from_numpy(data, binary_data=True)
                request = InferRequest(model_name=step["model"], infer_inputs=[tensor])
                response = await client.infer(request)
                array = response.outputs[0].as_numpy()
                results.append({"shape": list(array.shape), "vectors": array.tolist()})
        finally:
            await client.close()
        return results

    return asyncio.run(run())


def kserve_manifest(path: Path) -> list[str]:
    """What kserve's (and kubernetes') Python models do not know in an InferenceService file."""
    import kserve as kserve_models
    import yaml
    from kserve.constants import constants
    from kubernetes.client import ApiClient

    doc = yaml.safe_load(path.read_text())
    problems = []
    if doc["apiVersion"] != f"{constants.KSERVE_GROUP}/{constants.KSERVE_V1BETA1_VERSION}":
        problems.append(f"apiVersion {doc['apiVersion']!r}")
    if doc["kind"] != constants.KSERVE_KIND_INFERENCESERVICE:
        problems.append(f"kind {doc['kind']!r}")
    for model, data, where in (
        (kserve_models.V1beta1InferenceService, doc, ""),
        (kserve_models.V1beta1InferenceServiceSpec, doc["spec"], ".spec"),
        (kserve_models.V1beta1PredictorSpec, doc["spec"]["predictor"], ".spec.predictor"),
    ):
        names = set(model.attribute_map.values())
        problems += [f"unknown field {where}.{key}" for key in data if key not in names]
    client = ApiClient()

    def unknown(given: Any, kept: Any, where: str) -> None:
        if isinstance(given, dict):
            for key in given:
                if not isinstance(kept, dict) or key not in kept:
                    problems.append(f"unknown field {where}.{key}")
                else:
                    unknown(given[key], kept[key], f"{where}.{key}")
        elif isinstance(given, list):
            for index, (a, b) in enumerate(zip(given, kept, strict=False)):
                unknown(a, b, f"{where}[{index}]")

    predictor = doc["spec"]["predictor"]
    parts = [(doc["metadata"], "V1ObjectMeta", ".metadata")]
    parts += [(c, "V1Container", ".spec.predictor.containers[]") for c in predictor["containers"]]
    parts += [(v, "V1Volume", ".spec.predictor.volumes[]") for v in predictor.get("volumes", [])]
    for data, klass, where in parts:
        parsed = client.deserialize(json.dumps(data), klass, "application/json")
        unknown(data, client.sanitize_for_serialization(parsed), where)
    return problems


def main() -> None:
    client = sys.argv[2] if len(sys.argv) > 2 else "triton"
    if client == "kserve-manifest":
        json.dump(kserve_manifest(Path(sys.argv[1])), sys.stdout)
        return
    address, steps = sys.argv[1], json.load(sys.stdin)
    drivers = {"kserve": kserve, "triton-http": triton_http}
    results = drivers.get(client, triton)(address, steps)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
