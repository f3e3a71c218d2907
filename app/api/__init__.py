"""What every REST blueprint shares: the argument parser, authentication and the rate limit."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

from flask import Blueprint as FlaskBlueprint, current_app, g, send_from_directory
from flask.json.provider import DefaultJSONProvider

from flask_smorest import Blueprint as SmorestBlueprint
from webargs import core
from webargs.flaskparser import FlaskParser

from app.auth import rate_limit_key, require_api_key, rest_rate_limit
from app.errors import ApiError
from app.extensions import limiter
from app.jsondepth import MAX_JSON_DEPTH, too_deep
from app.overload import refuse_when_overloaded
from app.pagination import PaginationArgs
from app.schemas import USER_ID_PATH_PARAMETER, require_valid_user_id
from app.text import has_lone_surrogate, strings_in


#: A \uD800-\uDFFF escape somewhere in a body: only then can a string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class JsonTooDeep(json.JSONDecodeError):
    """JSON nested deeper than MAX_JSON_DEPTH: refused as invalid JSON (a ValueError, so
    ``request.get_json(silent=True)`` treats it like any other bad body)."""

    def __init__(self, doc: str):
        super().__init__(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", doc, 0)


class DepthCheckedJSONProvider(DefaultJSONProvider):
    """Flask's JSON provider, refusing JSON nested deeper than MAX_JSON_DEPTH (contract §9).

    Python's json module recurses: a body nested ~1,000 deep raised RecursionError, a 500 with
    a traceback. Both that and anything deeper than 64 levels are invalid JSON here.
    """

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        text = s.decode("utf-8") if isinstance(s, (bytes, bytearray)) else s
        try:
            value = json.loads(text, **kwargs)
        except RecursionError:
            raise JsonTooDeep(text) from None
        if too_deep(value):
            raise JsonTooDeep(text)
        return value


class JsonBodyParser(FlaskParser):
    """Reads a JSON body whatever its Content-Type, and answers bad JSON with ``invalid_json``."""

    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req) -> Any:
        data = req.get_data(cache=True)
        if not data:
            return core.missing
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError("invalid_json", "The request body is not valid JSON: it is not "
                           "UTF-8.") from None
        try:
            # the app's JSON provider (DepthCheckedJSONProvider): depth-checked, no recursion
            parsed = current_app.json.loads(text)
        except JsonTooDeep:
            raise ApiError("invalid_json", f"The request body is not valid JSON: it nests "
                           f"deeper than {MAX_JSON_DEPTH} levels.",
                           {"max_depth": MAX_JSON_DEPTH}) from None
        # JSON's grammar lets "\ud800" stand alone, but it is no character: no database can
        # store it (I-JSON, RFC 7493, refuses it for that reason).
        if _SURROGATE_ESCAPE.search(data) and any(map(has_lone_surrogate, strings_in(parsed))):
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
    bp.before_request(refuse_when_overloaded)  # first: refusing must cost next to nothing
    bp.before_request(require_api_key)
    rest_limit(bp)
    return bp


# --- /docs without a CDN ---------------------------------------------------------------------

#: swagger-ui-dist, installed by ``make install`` (``npm ci --prefix app/api/swagger``).
SWAGGER_UI_DIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "swagger",
                               "node_modules", "swagger-ui-dist")
#: The files the /docs page loads (flask-smorest's template) and their source maps.
SWAGGER_UI_FILES = ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
                    "swagger-ui.css.map", "swagger-ui-bundle.js.map",
                    "swagger-ui-standalone-preset.js.map", "favicon-16x16.png",
                    "favicon-32x32.png")
#: Where they are served; OPENAPI_SWAGGER_UI_URL (app/config.py) points here.
SWAGGER_UI_URL = "/docs/static/"

swagger_ui_bp = FlaskBlueprint("swagger_ui", __name__)


def user_pages(bp: Blueprint, page_schema: type, list_page: Callable, summary: str) -> Callable:
    """Serve ``list_page(tenant, user_id, offset, limit)`` as ``GET <bp>/user/<user_id>``: one
    page of what belongs to a user, the user id checked (``validation_error``) and
    ``offset``/``limit`` read as everywhere; ``summary`` is what the API document says."""
    def view(args: dict, user_id: str) -> Any:
        require_valid_user_id(user_id)
        return list_page(g.tenant, user_id, args["offset"], args["limit"])

    # named and documented before flask-smorest reads them (the endpoint, the summary)
    view.__name__ = list_page.__name__
    view.__doc__ = summary
    view = bp.response(200, page_schema)(view)
    view = bp.arguments(PaginationArgs, location="query")(view)
    return bp.route("/user/<user_id>", methods=["GET"], parameters=[USER_ID_PATH_PARAMETER])(view)


@swagger_ui_bp.get(SWAGGER_UI_URL + "<any(" + ",".join(f'"{name}"' for name in SWAGGER_UI_FILES)
                   + "):filename>")
def swagger_ui_file(filename: str):
    """Swagger UI's browser build, from app/api/swagger/node_modules."""
    if not os.path.isfile(os.path.join(SWAGGER_UI_DIST, filename)):
        raise ApiError("not_found", "Swagger UI is not installed on this server: run `make "
                       "install` (or `npm ci --prefix app/api/swagger --ignore-scripts`).",
                       {"file": filename})
    return send_from_directory(SWAGGER_UI_DIST, filename, max_age=3600)
