"""Anthropic models on Amazon Bedrock through the official SDK's ``AsyncAnthropicBedrock``.

The request and the answer are the Messages API's (the SDK moves the model into the path,
``POST /model/{modelId}/invoke`` or ``.../invoke-with-response-stream``, and adds
``anthropic_version``); requests are signed with AWS SigV4 and streams come framed as
AWS event-stream messages, both through botocore (``pip install 'overstory[bedrock]'``).
So this is :class:`~overstory.providers.anthropic.AnthropicModel` with another client:
the same arguments, answer reading, stream assembly and error translation.

Imported where vendor calls are made (hosts, the door's replicas, provider actors); a
dedicated conversation actor never loads it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import anthropic

from ..exceptions import ConfigError
from ._wire import aiohttp_client
from .anthropic import AnthropicModel
from .base import ModelRequest
from .endpoint import Endpoint, aws_credentials

__all__ = ["BEDROCK_VERSION", "BedrockModel"]

#: The ``anthropic_version`` Bedrock documents for the Messages API. The SDK would
#: otherwise send its own Messages API version (``2026-10-21`` in anthropic 2.14).
BEDROCK_VERSION = "bedrock-2023-05-31"


class BedrockModel(AnthropicModel):
    """One Bedrock endpoint: a model id (``anthropic.claude-sonnet-4-5-v1:0``, or an
    inference profile's id or ARN) in one AWS region, with one set of credentials."""

    answer_shape = "a Bedrock Messages API message"

    def _make_client(self, endpoint: Endpoint, key: str) -> Any:
        try:
            # What the SDK imports lazily, imported here, when the provider actor starts:
            # not on the first request, nor mid-stream (where the import's pause and its
            # garbage collection land inside the HTTP stream being read).
            importlib.import_module("boto3")
            for module in ("botocore.auth", "botocore.eventstream", "botocore.parsers"):
                importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(
                f"model {endpoint.name!r} needs boto3 and botocore to sign requests and "
                "read streams: pip install 'overstory[bedrock]'"
            ) from exc
        assert endpoint.key is not None  # resolved() filled them in
        assert endpoint.region is not None
        access_key_id, secret_access_key, session_token = aws_credentials(endpoint.key)
        try:
            return anthropic.AsyncAnthropicBedrock(
                aws_access_key=access_key_id,
                aws_secret_key=secret_access_key,
                aws_session_token=session_token,
                aws_region=endpoint.region,
                base_url=endpoint.base_url,
                max_retries=0,
                timeout=endpoint.timeout_s,
                http_client=aiohttp_client(anthropic),
            )
        except ValueError as exc:  # AWS_BEARER_TOKEN_BEDROCK set as well as the keys
            raise ConfigError(f"model {endpoint.name!r}: {exc}") from exc

    def _arguments(self, req: ModelRequest) -> dict[str, Any]:
        arguments = super()._arguments(req)
        extra = {**arguments.get("extra_body", {}), "anthropic_version": BEDROCK_VERSION}
        return {**arguments, "extra_body": extra}
