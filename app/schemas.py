"""marshmallow schemas: request validation and response shapes, separate from the models."""
from __future__ import annotations

import json
import re
from datetime import datetime

from marshmallow import Schema, ValidationError, fields, validate, validates, validates_schema

from app.agents import KINDS as AGENT_KINDS
from app.agents.secrets import SECRET_FIELDS
from app.errors import ApiError
from app.pagination import PaginationArgs
from app.text import TEXT_ERROR, is_text, strings_in
from app.timefmt import iso_z

USER_ID_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")
USER_ID_ERROR = "Must be 1-128 characters of A-Z a-z 0-9 _ . @ : -"
#: How routes document a ``<user_id>`` path parameter (they check it with require_valid_user_id).
USER_ID_PATH_PARAMETER = {"in": "path", "name": "user_id",
                          "schema": {"type": "string", "pattern": USER_ID_RE.pattern}}
CALLABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
METADATA_MAX_BYTES = 16 * 1024
MAX_ID = 2**63 - 1  # ids and offsets are 64-bit integers in the database


def is_valid_user_id(value: object) -> bool:
    """Whether ``value`` is a well-formed tenant-scoped user id."""
    # fullmatch: with re.match, "$" also matches before a trailing newline ("ann\n").
    return isinstance(value, str) and USER_ID_RE.fullmatch(value) is not None


def require_valid_user_id(value: object) -> None:
    """Raise ``validation_error`` with ``{"user_id": [USER_ID_ERROR]}`` unless ``value`` is a
    well-formed user id (one from a URL, a query or a connection's parameters)."""
    if not is_valid_user_id(value):
        raise ApiError("validation_error", "The user id is not valid.",
                       {"user_id": [USER_ID_ERROR]})


class FullMatch(validate.Regexp):
    """validate.Regexp over the whole string (its re.match lets "$" pass a trailing newline)."""

    def __call__(self, value):
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


def always_present(schema: type[Schema]) -> type[Schema]:
    """Class decorator for a response schema: the OpenAPI document lists every field required."""
    for field in schema._declared_fields.values():
        field.required = True
    return schema


def page_schema(name: str, items: str, item_schema: type[Schema]) -> type[Schema]:
    """The contract's page: ``{<items>: [...], total, offset, limit, has_more}``."""
    return always_present(Schema.from_dict({
        items: fields.List(fields.Nested(item_schema)),
        "total": fields.Integer(),
        "offset": fields.Integer(),
        "limit": fields.Integer(),
        "has_more": fields.Boolean(),
    }, name=name))


class UtcDateTime(fields.DateTime):
    """ISO 8601 UTC with a trailing Z (times are stored as naive UTC)."""

    def _serialize(self, value: datetime | None, attr, obj, **kwargs):
        if value is None:
            return None
        return iso_z(value)


class UserId(fields.String):
    def __init__(self, **kwargs):
        super().__init__(validate=FullMatch(USER_ID_RE, error=USER_ID_ERROR), **kwargs)


class StrictString(fields.String):
    """A string that must be text (app.text): no NUL, which PostgreSQL cannot store."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not any(isinstance(v, validate.Regexp) for v in self.validators):
            self.metadata = {"pattern": "^[^\\u0000]*$", **self.metadata}  # the document says so

    def _deserialize(self, value, attr, data, **kwargs):
        result = super()._deserialize(value, attr, data, **kwargs)
        if not is_text(result):
            raise ValidationError(TEXT_ERROR)
        return result


# --- agents -------------------------------------------------------------------------------

class AgentSchema(Schema):
    """A workspace's agent configuration; the fields allowed depend on ``kind``."""

    kind = fields.String(required=True, validate=validate.OneOf(tuple(AGENT_KINDS)))
    delay_ms = fields.Integer(strict=True, validate=validate.Range(min=0, max=1000))
    base_url = fields.Url(schemes={"http", "https"}, require_tld=False)
    model = StrictString(validate=validate.Length(min=1, max=200))
    api_key = StrictString(validate=validate.Length(min=1, max=1000), allow_none=True,
                           load_only=True)
    system_prompt = StrictString(validate=validate.Length(max=20000), allow_none=True)
    history = fields.Integer(validate=validate.Range(min=0, max=200))
    url = fields.Url(schemes={"http", "https"}, require_tld=False)
    secret = StrictString(validate=validate.Length(min=1, max=1000), allow_none=True,
                          load_only=True)
    callable = StrictString(validate=FullMatch(
        CALLABLE_RE, error="Must be 'package.module:function'."))

    @validates("callable")
    def _allowed_callable(self, value, **kwargs):
        # Only what the operator lists in PYTHON_AGENTS; nothing else is imported, ever. A
        # listed one is loaded (once) now, so a bad path is a validation error rather than a
        # failure at the first message.
        from app.agents.python import load_callable

        try:
            load_callable(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None

    @validates("url", "base_url")
    def _public_destination(self, value, **kwargs):
        # A literal address (any notation) or localhost that agents may not reach is refused
        # now; host names are checked after resolving, on every request (app.agents.net).
        from flask import current_app

        from app.agents.net import check_url

        try:
            check_url(value, bool(current_app.config.get("AGENT_ALLOW_PRIVATE_NETWORKS")))
        except ValueError as exc:
            raise ValidationError(str(exc)) from None

    @validates_schema
    def _fields_for_kind(self, data, **kwargs):
        kind = data.get("kind")
        if kind not in AGENT_KINDS:
            return
        errors = {}
        for name in data.keys() - {"kind"} - AGENT_KINDS[kind].fields:
            errors[name] = [f"Not allowed for agent kind '{kind}'."]
        for name in AGENT_KINDS[kind].required - data.keys():
            errors[name] = [f"Required for agent kind '{kind}'."]
        if errors:
            raise ValidationError(errors)


def public_agent(agent: dict | None) -> dict:
    """The agent configuration as the API shows it: secrets replaced by ``<name>_set`` flags."""
    agent = dict(agent or {"kind": "none"})
    for name in SECRET_FIELDS:
        if name in agent:
            agent[f"{name}_set"] = bool(agent.pop(name))
    return agent


# --- workspaces ---------------------------------------------------------------------------

def _agent_kinds_document() -> dict:
    """AgentSchema._fields_for_kind as the OpenAPI document states it: one variant per kind."""
    return {"oneOf": [
        {"type": "object",
         "properties": {"kind": {"type": "string", "enum": [name]},
                        **{field: {} for field in sorted(kind.fields)}},
         "required": ["kind", *sorted(kind.required)],
         "additionalProperties": False}
        for name, kind in AGENT_KINDS.items()]}


class WorkspaceCreateSchema(Schema):
    owner_id = UserId(required=True)
    name = StrictString(required=True, validate=validate.Length(min=1, max=100))
    agent = fields.Nested(AgentSchema, metadata=_agent_kinds_document())


class WorkspaceUpdateSchema(Schema):
    name = StrictString(validate=validate.Length(min=1, max=100))
    agent = fields.Nested(AgentSchema, metadata=_agent_kinds_document())


@always_present
class WorkspaceSchema(Schema):
    id = fields.String()
    name = fields.String()
    owner_id = fields.Function(lambda w: w.owner.external_id, metadata={"type": "string"})
    members = fields.Function(lambda w: [m.user.external_id for m in w.members],
                              metadata={"type": "array", "items": {"type": "string"}})
    agent = fields.Function(lambda w: public_agent(w.agent), metadata={
        "type": "object", "required": ["kind"],
        "properties": {"kind": {"type": "string", "enum": list(AGENT_KINDS)}},
        "not": {"anyOf": [{"required": [name]} for name in SECRET_FIELDS]}})  # never returned
    created_at = UtcDateTime()


WorkspacePageSchema = page_schema("WorkspacePageSchema", "workspaces", WorkspaceSchema)


# --- chats --------------------------------------------------------------------------------

class ChatCreateSchema(Schema):
    user_id = UserId(required=True)
    workspace_id = fields.String(validate=validate.Length(min=1, max=64), allow_none=True)
    title = StrictString(validate=validate.Length(max=200), allow_none=True)
    metadata = fields.Dict(keys=fields.String(), allow_none=True)

    @validates("metadata")
    def _metadata_size(self, value, **kwargs):
        if value is None:
            return
        try:
            size = len(json.dumps(value, separators=(",", ":")).encode("utf-8"))
        except (TypeError, ValueError, UnicodeEncodeError) as exc:
            raise ValidationError("Must be a JSON object.") from exc
        if size > METADATA_MAX_BYTES:
            raise ValidationError(f"Must be at most {METADATA_MAX_BYTES} bytes as JSON.")
        if not all(is_text(string) for string in strings_in(value)):
            raise ValidationError(TEXT_ERROR)


@always_present
class ChatSchema(Schema):
    id = fields.String()
    workspace_id = fields.String()
    user_id = fields.Function(lambda c: c.user.external_id, metadata={"type": "string"})
    title = fields.String(allow_none=True)
    metadata = fields.Dict(attribute="meta")
    created_at = UtcDateTime()
    updated_at = UtcDateTime()


ChatPageSchema = page_schema("ChatPageSchema", "chats", ChatSchema)


class ConnectionStringRequestSchema(Schema):
    user_id = UserId(required=True)


@always_present
class ConnectionStringSchema(Schema):
    connection_string = fields.String()
    chat_id = fields.String()
    expires_at = fields.String(metadata={"format": "date-time"})


# --- messages -----------------------------------------------------------------------------

@always_present
class MessageSchema(Schema):
    """The contract's message object. It is built once, by app.chat.serialize.message_object
    (for live events, replay, acks and REST alike); this schema documents it."""

    id = fields.String()
    chat_id = fields.String()
    role = fields.String(metadata={"enum": ["user", "agent", "system"]})
    user_id = fields.String(allow_none=True)
    content = fields.String()
    client_message_id = fields.String(allow_none=True)
    reply_to = fields.String(allow_none=True)
    created_at = fields.String(metadata={"format": "date-time"})


def _at_most(bound: str) -> str:
    """A regex for the decimal strings of ``len(bound)`` ASCII digits not above ``bound``."""
    alternatives = []
    for i, digit in enumerate(bound):
        if digit != "0":
            rest = len(bound) - i - 1
            lower = "0" if digit == "1" else f"[0-{int(digit) - 1}]"
            alternatives.append(bound[:i] + lower + (f"[0-9]{{{rest}}}" if rest else ""))
    return "|".join(alternatives + [bound])


#: A message id in a query string: ASCII digits (str.isdigit also takes "²" and "٣"), 0..MAX_ID,
#: written as a regex so that the OpenAPI document states exactly what is accepted.
MESSAGE_ID_PATTERN = (f"^(?:[0-9]{{1,{len(str(MAX_ID)) - 1}}}|"
                      f"{_at_most(str(MAX_ID))})$")
MESSAGE_ID_RE = re.compile(MESSAGE_ID_PATTERN)


class MessageIdArg(fields.String):
    """A message id in a query string (ids are decimal strings)."""

    def __init__(self, **kwargs):
        super().__init__(metadata={"pattern": MESSAGE_ID_PATTERN}, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if MESSAGE_ID_RE.fullmatch(value) is None:
            raise ValidationError("Must be a message id.")
        return int(value)


class MessageListArgs(PaginationArgs):
    order = fields.String(load_default="asc", validate=validate.OneOf(("asc", "desc")))
    after_id = MessageIdArg()
    before_id = MessageIdArg()


MessagePageSchema = page_schema("MessagePageSchema", "messages", MessageSchema)


# --- errors and admin ---------------------------------------------------------------------

@always_present
class ErrorBodySchema(Schema):
    """The contract's error object: a code from its table, a message, and details."""

    code = fields.String()
    message = fields.String()
    details = fields.Dict()


@always_present
class ErrorSchema(Schema):
    error = fields.Nested(ErrorBodySchema)


class TenantCreateSchema(Schema):
    name = StrictString(required=True, validate=validate.Length(min=1, max=100))


@always_present
class TenantCreatedSchema(Schema):
    id = fields.String()
    name = fields.String()
    api_key = fields.String(metadata={"description": "Shown only in this response."})
    api_key_id = fields.String(metadata={"description": "The first key's id, to revoke it."})


@always_present
class ApiKeyCreatedSchema(Schema):
    id = fields.String()
    api_key = fields.String()
