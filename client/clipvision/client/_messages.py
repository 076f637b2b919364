"""Requests out, numpy vectors and result types back: the conversions both clients share."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np
import numpy.typing as npt

from clipvision.client._errors import ClipVisionError, error_from_item, error_from_status
from clipvision.v1 import embedding_service_pb2 as pb

FloatArray = npt.NDArray[np.float32]
"""A 1-D float32 embedding vector."""

Result = FloatArray | ClipVisionError
"""One image's outcome in a stream: its embedding or why it has none."""


@dataclass(frozen=True, eq=False)
class TextEmbedding:
    """The embedding of one text, and whether the text had to be cut to fit the model."""

    vector: FloatArray
    """The float32 vector, in the same space as the same model's image embeddings."""
    truncated: bool
    """True when the text was longer than the model's context (ModelInfo.text_context_length
    tokens) and only its first tokens were embedded."""
    model: str
    """The model that computed it."""


TextResult = TextEmbedding | ClipVisionError
"""One text's outcome in a batch or stream: its embedding or why it has none."""


@dataclass(frozen=True)
class LabelScore:
    """How well one candidate label describes the image, as ``classify`` returns it."""

    label: str
    """The label as it was given (without the prompt template)."""
    probability: float
    """Of the kind ``score_type`` says: the softmax over all labels of logit_scale times the
    cosine (the scores of one call sum to 1), or for SigLIP models the sigmoid of
    logit_scale times the cosine plus logit_bias, for this label on its own."""
    cosine: float
    """The cosine similarity of the image's and the prompt's embeddings."""
    truncated: bool
    """True when the prompt was longer than the model's context and was truncated."""
    score_type: str = "softmax"
    """"softmax" (over the labels) or "sigmoid" (per label), as the model's family scores."""


def to_vector(embedding: pb.Embedding) -> FloatArray:
    """The embedding's values as a float32 vector."""
    return np.asarray(embedding.values, dtype=np.float32)


def to_text_embedding(embedding: pb.Embedding) -> TextEmbedding:
    """The TextEmbedding of an Embedding message."""
    return TextEmbedding(to_vector(embedding), embedding.truncated, embedding.model)


def to_label_scores(response: pb.ClassifyResponse) -> list[LabelScore]:
    """The scores of a Classify response, in the order of the labels."""
    # A server from before score types were reported scores with a softmax.
    kind = "sigmoid" if response.score_type == pb.SCORE_TYPE_SIGMOID else "softmax"
    return [
        LabelScore(score.label, score.probability, score.cosine, score.truncated, kind)
        for score in response.scores
    ]


def embed_image_request(
    image: pb.Image, model: str | None, normalize: bool | None
) -> pb.EmbedImageRequest:
    """The EmbedImage request for one image; None leaves the server's default."""
    request = pb.EmbedImageRequest(image=image, model=model or "")
    if normalize is not None:
        request.normalize = normalize
    return request


def image_stream_request(
    image: pb.Image, model: str | None, normalize: bool | None
) -> pb.EmbedImageStreamRequest:
    """An EmbedImageStream request without its id (the stream window numbers it)."""
    request = pb.EmbedImageStreamRequest(image=image, model=model or "")
    if normalize is not None:
        request.normalize = normalize
    return request


def embed_text_request(
    text: str, model: str | None, normalize: bool | None, truncate: bool | None
) -> pb.EmbedTextRequest:
    """The EmbedText request for one text; None leaves the server's default."""
    request = pb.EmbedTextRequest(text=text, model=model or "")
    if normalize is not None:
        request.normalize = normalize
    if truncate is not None:
        request.truncate = truncate
    return request


def embed_texts_request(
    texts: list[str], model: str | None, normalize: bool | None, truncate: bool | None
) -> pb.EmbedTextsRequest:
    """The EmbedTexts request for several texts; None leaves the server's default."""
    request = pb.EmbedTextsRequest(texts=texts, model=model or "")
    if normalize is not None:
        request.normalize = normalize
    if truncate is not None:
        request.truncate = truncate
    return request


def text_stream_request(
    text: str, model: str | None, normalize: bool | None, truncate: bool | None
) -> pb.EmbedTextStreamRequest:
    """An EmbedTextStream request without its id (the stream window numbers it)."""
    request = pb.EmbedTextStreamRequest(text=text, model=model or "")
    if normalize is not None:
        request.normalize = normalize
    if truncate is not None:
        request.truncate = truncate
    return request


def classify_request(
    image: pb.Image,
    labels: list[str],
    prompt_template: str | None,
    model: str | None,
    truncate: bool | None,
) -> pb.ClassifyRequest:
    """The Classify request; None leaves the server's default."""
    request = pb.ClassifyRequest(
        image=image, labels=labels, prompt_template=prompt_template or "", model=model or ""
    )
    if truncate is not None:
        request.truncate = truncate
    return request


def texts_results(
    texts: list[str | ClipVisionError], response: pb.EmbedTextsResponse
) -> list[TextResult]:
    """One result per input text, in order: the server's for the texts sent, the client's
    own error in place of each text it refused before sending."""
    answers = iter(response.results)
    results: list[TextResult] = []
    for text in texts:
        if isinstance(text, ClipVisionError):
            results.append(text)
            continue
        answer = next(answers, None)
        if answer is None:
            break
        if answer.HasField("error"):
            results.append(error_from_item(answer.error))
        else:
            results.append(to_text_embedding(answer.embedding))
    sent = sum(not isinstance(text, ClipVisionError) for text in texts)
    if len(response.results) != sent:
        raise error_from_status(
            grpc.StatusCode.INTERNAL,
            "RESULTS_MISMATCH",
            f"The server answered {len(response.results)} results for {sent} texts; it breaks "
            "the EmbedTexts contract.",
        )
    return results
