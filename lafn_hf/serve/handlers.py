"""transformers' handlers of ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/responses`` with every field
checked first (``requests.check_request``: a 400 naming the field) and the field that set the request's length
passed on to the engine view, which bounds it (``requests.bound_length``).

transformers reads a body as it goes (``int(body["max_tokens"])``, ``message["role"]``, a chat template over the
messages): what the checks do not foresee and fails there with a ``KeyError``, ``TypeError``, ``AttributeError``,
``IndexError`` or a template error is the request's fault too, answered as a 400 that names the error (and logged
with its traceback), never a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.response import ResponseHandler

from .requests import CHAT, COMPLETIONS, LENGTH_FIELD, RESPONSES, RequestLimits, check_request, requested_length_field

logger = logging.getLogger(__name__)

__all__ = ["CheckedChatHandler", "CheckedCompletionHandler", "CheckedResponseHandler"]


def _unreadable() -> tuple[type[BaseException], ...]:
    from jinja2 import TemplateError

    return KeyError, TypeError, AttributeError, IndexError, TemplateError


class _Checked:
    """Mixed in before a transformers handler: ``route`` names the fields it reads (see ``requests.FIELDS``)."""

    route: str
    limits: RequestLimits = RequestLimits()

    async def handle_request(self, body: dict[str, Any], request_id: str) -> Any:
        check_request(self.route, body, self.limits)  # ValueError: transformers answers 400
        try:
            return await super().handle_request(body, request_id)  # type: ignore[misc]
        except _unreadable() as error:
            logger.warning("request %s could not be read", request_id, exc_info=True)
            raise ValueError(f"the request could not be read: {type(error).__name__}: {error}") from None

    def _build_generation_kwargs(self, body: dict[str, Any], model_generation_config: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = super()._build_generation_kwargs(body, model_generation_config)  # type: ignore[misc]
        requested = requested_length_field(self.route, body)
        if requested is not None:
            kwargs[LENGTH_FIELD] = requested
        return kwargs


class CheckedCompletionHandler(_Checked, CompletionHandler):
    route = COMPLETIONS


class CheckedChatHandler(_Checked, ChatCompletionHandler):
    route = CHAT


class CheckedResponseHandler(_Checked, ResponseHandler):
    route = RESPONSES
