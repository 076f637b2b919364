"""The HTTP application: every route, behind the exchange, in one Starlette app.

- ``POST /v1/embeddings``, ``GET /v1/models``: OpenAI (http.openai);
- ``/v2...``: the Open Inference Protocol's REST form (http.oip);
- ``/.well-known/live|ready``, ``/meta``, ``POST /vectorize``: Weaviate (http.weaviate);
- ``POST /clipvision.v1.EmbeddingService/<Method>``: JSON or protobuf (http.connect).

Any other path answers 404 in a JSON body; CORS is off unless origins are given.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clipvision.server.errors import Code, MethodNotFoundError, Reason
from clipvision.server.http import connect, oip, openai, weaviate
from clipvision.server.http.exchange import TIMEOUT_HEADER, HttpCall, HttpExchange
from clipvision.server.http.statuses import Fault
from clipvision.server.ops.calls import REQUEST_ID_KEY
from clipvision.server.ops.health import HealthReporter
from clipvision.server.pipelines.embedding_plane import EmbeddingPlane
from clipvision.server.pipelines.inference_plane import InferencePlane

UNKNOWN = "unknown"


def max_json_values(limits: object) -> int:
    """How many JSON values a body may hold: room for the largest batch the limits allow,
    each item an object with a few fields, and the request's own fields."""
    largest = max(
        getattr(limits, "max_batch_images", 0),
        getattr(limits, "max_batch_texts", 0),
        getattr(limits, "max_classify_labels", 0),
    )
    return 4 * largest + 256


def build_app(
    exchange: HttpExchange,
    embedding: EmbeddingPlane,
    inference: InferencePlane,
    health: HealthReporter,
    cors_origins: Sequence[str] = (),
) -> Starlette:
    """The Starlette app serving every route over the two data planes."""
    values = max_json_values(embedding.limits)
    ai = openai.OpenAIRoutes(embedding, values)
    v2 = oip.OipRoutes(inference, health, values)
    module = weaviate.WeaviateRoutes(embedding, health, values)
    rpc = connect.ConnectRoutes(embedding, values)
    route = exchange.route
    routes = [
        Route(
            "/v1/embeddings",
            route("POST /v1/embeddings", ai.embeddings, openai.render),
            methods=["POST"],
        ),
        Route(
            "/v1/models",
            route("GET /v1/models", ai.models, openai.render, body=False),
            methods=["GET"],
        ),
        Route("/v2", route("GET /v2", v2.server_metadata, oip.render, body=False), methods=["GET"]),
        Route(
            "/v2/health/live",
            route("GET /v2/health/live", v2.live, oip.render, body=False, probe=True),
            methods=["GET"],
        ),
        Route(
            "/v2/health/ready",
            route("GET /v2/health/ready", v2.ready, oip.render, body=False, probe=True),
            methods=["GET"],
        ),
        Route(
            "/v2/models/{rest:path}",
            route("GET /v2/models", v2.model, oip.render, body=False),
            methods=["GET"],
        ),
        Route(
            "/v2/models/{rest:path}",
            route("POST /v2/models/infer", v2.infer, oip.render),
            methods=["POST"],
        ),
        Route(
            "/.well-known/live",
            route("GET /.well-known/live", module.live, weaviate.render, body=False, probe=True),
            methods=["GET"],
        ),
        Route(
            "/.well-known/ready",
            route("GET /.well-known/ready", module.ready, weaviate.render, body=False, probe=True),
            methods=["GET"],
        ),
        Route(
            "/meta", route("GET /meta", module.meta, weaviate.render, body=False), methods=["GET"]
        ),
        Route(
            "/vectorize",
            route("POST /vectorize", module.vectorize, weaviate.render),
            methods=["POST"],
        ),
    ]
    for name in rpc.methods:
        endpoint = route(name, rpc.handler(name), connect.render)
        routes.append(Route(f"/{connect.SERVICE}/{name}", endpoint, methods=["POST"]))

    async def unknown(call: HttpCall) -> Response:
        raise _not_found()

    # Any other path, any method: 404 from the exchange (counted under "unknown").
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
    routes.append(
        Route("/{path:path}", route(UNKNOWN, unknown, _render_plain, body=False), methods=methods)
    )
    middleware = []
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=[
                    "authorization",
                    "content-type",
                    "connect-protocol-version",
                    TIMEOUT_HEADER,
                    REQUEST_ID_KEY,
                    oip.HEADER_LENGTH,
                ],
                expose_headers=[REQUEST_ID_KEY, oip.HEADER_LENGTH],
            )
        )
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_exception},
    )


def _not_found() -> MethodNotFoundError:
    return MethodNotFoundError(
        Reason.METHOD_NOT_FOUND,
        "This server has no such HTTP route; see /v1/models, /v2 or the docs' CLIENTS.md.",
    )


def _render_plain(fault: Fault) -> Response:
    return JSONResponse(
        {"error": {"code": fault.reason, "message": fault.message}}, status_code=fault.status
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (a method the path does not take) in a JSON body."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    fault = Fault(Code.UNIMPLEMENTED, Reason.METHOD_NOT_FOUND.value, f"HTTP {status}: not served.")
    return JSONResponse(
        {"error": {"code": fault.reason, "message": fault.message}}, status_code=status
    )
