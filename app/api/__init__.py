"""What every REST blueprint shares: the argument parser, authentication and the rate limit."""
from __future__ import annotations

import re
from typing import Any

from flask_smorest import Blueprint as SmorestBlueprint
from webargs import core
from webargs.flaskparser import FlaskParser

from app.auth import rate_limit_key, require_api_key, rest_rate_limit
from app.errors import ApiError
from app.extensions import limiter


#: A \uD800-\uDFFF escape somewhere in a body: only then can a string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _holds_lone_surrogate(node: Any) -> bool:
    """Whether parsed JSON holds a string that is not text (a lone surrogate: no UTF-8 for it)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class JsonBodyParser(FlaskParser):
    """Reads a JSON body whatever its Content-Type, and answers bad JSON with ``invalid_json``."""

    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req) -> Any:
        data = req.get_data(cache=True)
        if not data:
            return core.missing
        parsed = core.parse_json(data)
        # JSON's grammar lets "\ud800" stand alone, but it is no character: no database can
        # store it (I-JSON, RFC 7493, refuses it for that reason).
        if _SURROGATE_ESCAPE.search(data) and _holds_lone_surrogate(parsed):
            raise ApiError("invalid_json", "The request body is not valid JSON: a string holds "
                           "a lone surrogate (\\ud800-\\udfff), which is not text.")
        return parsed

    def _handle_invalid_json_error(self, error, req, *args, **kwargs):
        raise ApiError("invalid_json", "The request body is not valid JSON.")


class Blueprint(SmorestBlueprint):
    """A flask-smorest blueprint using the contract's parser and validation status."""

    ARGUMENTS_PARSER = JsonBodyParser()


#: One counter per tenant shared by every REST route (RATE_LIMIT_REST).
rest_limit = limiter.shared_limit(rest_rate_limit, scope="rest", key_func=rate_limit_key)


def tenant_blueprint(name: str, import_name: str, url_prefix: str, description: str) -> Blueprint:
    """A REST blueprint that requires an API key and counts against the tenant's rate limit."""
    bp = Blueprint(name, import_name, url_prefix=url_prefix, description=description)
    bp.before_request(require_api_key)
    rest_limit(bp)
    return bp
