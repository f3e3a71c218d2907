"""The REST API fuzzed from its own OpenAPI document (schemathesis) against the real server.

What this module proves, on SQLite and on PostgreSQL, with one real server process per backend
(the Procfile's, rate limit raised so that it does not mask every answer):

- every operation ``GET /openapi.json`` lists (the REST API under ``/api/v1``, ``POST /chat`` and
  the admin API), sent generated valid and invalid input with a real tenant's key (the admin
  token on ``/admin``), never answers 5xx; every 4xx is the contract's envelope
  ``{"error": {"code", "message", "details"}}`` with a code that CONTRACT.md section 2 gives its
  status; every body is JSON (204 and HTTP's own OPTIONS answer have none) and holds no
  traceback, SQL or secret; and the answers conform to the document itself (schemathesis'
  built-in checks: status codes, content types, response schemas, auth enforced, input the
  document calls valid accepted and input it calls invalid refused);
- the same operations without a credential, or with the wrong one, are refused 401
  ``missing_api_key`` / ``invalid_api_key``, whatever else the request holds;
- generated ids are, some of the time, ids that exist: the fuzzing tenant's own workspaces,
  chats and users, and another tenant's; and, not left to chance, every operation taking a
  workspace or chat id is sent one of each tenant's (a parametrized test per operation and
  tenant). The other tenant's objects are never revealed (no response names their ids) nor
  changed (no request naming them succeeds), and after all the fuzzing they read back over REST
  exactly as they were stored;
- inputs next to the bugs this fuzzing turned up, which a bounded run draws too rarely to rely
  on (NUL in ids, lone surrogates in bodies, Unicode digits, a trailing newline), get their
  contract error;
- afterwards the server process is alive, ``/healthz`` answers 200 and its log has no traceback.

Bounded: a fixed number of generated examples per operation. Under CI=true the conftest's
hypothesis profile derandomizes; the settings below pass that to schemathesis explicitly (its own
configuration would otherwise pick a random seed per operation). The tests after the fuzzing
read what it recorded, so they run after it in file order (alone, they skip).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis.core.parameters import ParameterLocation
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi import checks as openapi_checks

from tests.kit.rest import Tenant, new_tenant
from tests.kit.servers import ADMIN_TOKEN, start_server, stop_server
from tests.kit.sio import connect

SERVER_ENV = {"RATE_LIMIT_REST": "1000000/minute", "RATE_LIMIT_AUTH_FAILURES": "1000000/minute",
              "AGENT_ALLOW_PRIVATE_NETWORKS": "1"}  # agents at 127.0.0.1:9 (never called)

#: Generated examples per operation (schemathesis' coverage and examples phases add their own
#: deterministic cases: boundaries, missing fields, wrong types, undocumented methods).
MAX_EXAMPLES = 20
UNAUTHENTICATED_MAX_EXAMPLES = 6
DERANDOMIZE = os.environ.get("CI") == "true"

#: CONTRACT.md section 2: each status and the codes it may carry.
CODES_BY_STATUS = {
    400: {"validation_error", "invalid_json"},
    401: {"missing_api_key", "invalid_api_key"},
    403: {"forbidden"},
    404: {"not_found", "chat_not_found", "workspace_not_found"},
    405: {"method_not_allowed"},
    413: {"payload_too_large"},
    429: {"rate_limited"},
}

#: What internals look like when they leak: Python tracebacks, SQLAlchemy's and the drivers'
#: error texts (which carry the SQL), the server's secret key and admin token.
LEAKS = ("Traceback (most recent call last)", 'File "/', "[SQL: ", "[parameters: ",
         "sqlalche.me", "sqlalchemy.", "psycopg2.", "sqlite3.", "live-secret", ADMIN_TOKEN)

OWN_SECRET = "sk-own-openai-key-0123456789"
OTHER_SECRET = "whsec-other-tenant-9876543210"
USERS = ["ann", "bob", "carol@example.com"]


@dataclass
class Sent:
    """One request the fuzzing made, as recorded after its answer."""

    label: str  # the operation, "METHOD /path"
    method: str  # the method sent (schemathesis also tries undocumented ones on each path)
    status: int
    own: bool  # it named one of the fuzzing tenant's workspaces or chats
    foreign: bool  # it named one of the other tenant's

    @property
    def as_documented(self) -> bool:
        return self.label.startswith(self.method.upper() + " ")


@dataclass
class World:
    """The server and what was stored on it before fuzzing."""

    server: object
    fuzzer: Tenant
    other: Tenant
    #: parameter name -> ids that exist (the fuzzer's own and the other tenant's)
    pools: dict[str, list[str]]
    #: per operation, pools that replace the shared ones (deletions get objects of their own)
    pools_by_operation: dict[str, dict[str, list[str]]]
    #: the fuzzing tenant's workspace and chat ids
    own_objects: set[str]
    #: the other tenant's workspace and chat ids, and all its ids (messages too)
    other_objects: set[str]
    other_ids: set[str]
    #: the other tenant's objects as it read them over REST before fuzzing
    other_snapshot: dict
    sent: list[Sent] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def pool(self, label: str, name: str) -> list[str]:
        return self.pools_by_operation.get(label, {}).get(name) or self.pools.get(name, [])


# --- seeding -------------------------------------------------------------------------------

def _post_messages(tenant: Tenant, chat_id: str, user_id: str, contents: list[str]) -> None:
    client = connect(tenant.url, {"chat_id": chat_id, "api_key": tenant.key, "user_id": user_id})
    assert client.connect_error is None, client.connect_error
    try:
        message_string = client.message_string
        for content in contents:
            ack = client.send(content, message_string)
            assert ack["ok"], ack
            message_string = ack["next_message_string"]
    finally:
        client.disconnect()


def _patch(tenant: Tenant, workspace_id: str, body: dict) -> None:
    r = requests.patch(f"{tenant.url}/api/v1/workspaces/{workspace_id}", json=body,
                       headers=tenant.headers, timeout=10)
    assert r.status_code == 200, r.text


def _get(tenant: Tenant, path: str, **params) -> dict:
    r = requests.get(tenant.url + path, headers=tenant.headers, params=params, timeout=10)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


def _snapshot(tenant: Tenant) -> dict:
    """Everything the tenant can read over REST about its users' workspaces, chats, messages."""
    workspaces = {u: _get(tenant, f"/api/v1/workspaces/user/{u}", limit=200) for u in USERS}
    chats = {u: _get(tenant, f"/api/v1/chats/user/{u}", limit=200) for u in USERS}
    workspace_ids = sorted({w["id"] for page in workspaces.values() for w in page["workspaces"]})
    chat_ids = sorted({c["id"] for page in chats.values() for c in page["chats"]})
    return {
        "user_workspaces": workspaces,
        "user_chats": chats,
        "workspaces": {w: _get(tenant, f"/api/v1/workspaces/{w}") for w in workspace_ids},
        "chats": {c: _get(tenant, f"/api/v1/chats/{c}") for c in chat_ids},
        "messages": {c: _get(tenant, f"/api/v1/chats/{c}/messages", limit=200)
                     for c in chat_ids},
    }


def _admin_post(url: str, path: str, body: dict | None = None) -> dict:
    r = requests.post(url + path, json=body, timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 201, r.text
    return r.json()


def _seed(server) -> World:
    url = server.url
    fuzzer = new_tenant(url, "Fuzzer")
    other = new_tenant(url, "Bystander")

    # The other tenant: the same user ids as the fuzzer's (user ids are tenant-scoped), a team
    # workspace with members and a secret-holding agent, chats with messages. The agent is set
    # after the messages, so that no reply is ever attempted.
    team = other.workspace("ann", members=("bob", "carol@example.com"))
    plans = other.chat("ann", workspace_id=team, title="Private plans",
                       metadata={"topic": "secret roadmap", "n": 1})
    alone = other.chat("bob", title=None)
    _post_messages(other, plans, "ann", ["first", "second", "third"])
    _post_messages(other, plans, "bob", ["from a member"])
    _post_messages(other, alone, "bob", ["alone"])
    _patch(other, team, {"agent": {"kind": "webhook", "url": "http://127.0.0.1:9/hook",
                                   "secret": OTHER_SECRET}})
    snapshot = _snapshot(other)
    other_workspaces, other_chats = list(snapshot["workspaces"]), list(snapshot["chats"])
    other_ids = set(other_workspaces) | set(other_chats) | {
        m["id"] for page in snapshot["messages"].values() for m in page["messages"]}
    assert len(other_workspaces) == 2 and len(other_chats) == 2 and len(other_ids) == 9

    # The fuzzer's own objects, so that generated requests reach existing ones.
    own_team = fuzzer.workspace("ann", members=("bob",))
    own_solo = fuzzer.workspace("carol@example.com")
    own_chats = [fuzzer.chat("ann", workspace_id=own_team, title="Mine", metadata={"a": [1]}),
                 fuzzer.chat("ann", workspace_id=own_team), fuzzer.chat("bob")]
    _post_messages(fuzzer, own_chats[0], "ann", ["hello", "world"])
    _patch(fuzzer, own_team, {"agent": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1",
                                        "model": "m", "api_key": OWN_SECRET}})
    # Objects only the deleting operations get, so that the others keep finding theirs.
    doomed_workspaces = [fuzzer.workspace("dave") for _ in range(2)]
    doomed_chats = [fuzzer.chat("erin") for _ in range(3)]

    # A tenant only the admin operations get (they may revoke its keys).
    target = _admin_post(url, "/admin/tenants", {"name": "Admin target"})["id"]
    target_keys = [_admin_post(url, f"/admin/tenants/{target}/api-keys")["id"]
                   for _ in range(3)]

    return World(
        server=server, fuzzer=fuzzer, other=other,
        pools={
            "workspace_id": [own_team, own_solo, *other_workspaces],
            "chat_id": [*own_chats, *other_chats],
            "user_id": [*USERS, "dave", "nobody"],
            "owner_id": [*USERS, "nobody"],
            "tenant_id": [target],
            "key_id": target_keys,
        },
        pools_by_operation={
            "DELETE /api/v1/workspaces/{workspace_id}": {
                "workspace_id": [*doomed_workspaces, *other_workspaces]},
            "DELETE /api/v1/chats/{chat_id}": {"chat_id": [*doomed_chats, *other_chats]},
        },
        own_objects={own_team, own_solo, *own_chats, *doomed_workspaces, *doomed_chats},
        other_objects={*other_workspaces, *other_chats}, other_ids=other_ids,
        other_snapshot=snapshot)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory, pg_database_factory):
    env = dict(SERVER_ENV)
    if request.param == "postgresql":
        env["DATABASE_URL"] = pg_database_factory()
    server = start_server(tmp_path_factory.mktemp(f"fuzz-{request.param}"), **env)
    try:
        yield _seed(server)
    finally:
        stop_server(server.process)


# --- the schemas under test ----------------------------------------------------------------

#: Strings next to what parsers and databases get wrong (a NUL, which PostgreSQL refuses; a
#: trailing newline, which re.match's "$" lets through; digits str.isdigit() takes and int()
#: does not; the 64-bit edge; a BOM; the Kelvin sign, which case-folds to "k"). schemathesis
#: draws them for a fifth of the strings it generates where the document allows them (path,
#: query and header values; it keeps NUL out of paths, hence the near-miss tests below).
NEAR_MISSES = ["\x00", "a\x00b", "ann\n", "ann\r\n", "\u00b2", "\u0663", "1\u00b2",
               "9223372036854775807", "9223372036854775808", "-1", " ann", "\u212a", "\ufeff"]


def _load(world: World, config: dict):
    return schemathesis.openapi.from_url(
        world.url + "/openapi.json",
        config=schemathesis.Config.from_dict({
            "base-url": world.url,
            "dictionaries": {"near_misses": {"values": NEAR_MISSES}},
            "generation": {"dictionaries": {"string": {"dictionary": "near_misses",
                                                       "probability": 0.2}}},
            **config}))


def _named_objects(case) -> set[str]:
    """The workspace and chat ids a request names, in its path or its body."""
    values = list((case.path_parameters or {}).values())
    if isinstance(case.body, dict):
        values.append(case.body.get("workspace_id"))
    return {v for v in values if isinstance(v, str)}


@pytest.fixture(scope="module")
def api_schema(world):
    # The document's own security schemes carry the credentials: the tenant's key wherever the
    # default ApiKey scheme applies, the admin token where an operation declares AdminToken.
    schema = _load(world, {"auth": {"openapi": {"ApiKey": {"api_key": world.fuzzer.key},
                                                "AdminToken": {"bearer": ADMIN_TOKEN}}}})

    @schema.hook
    def flatmap_case(context, case):
        # Some of the time, replace generated ids (in the path, and the body's workspace_id and
        # user ids) with ids that exist. Only in a part that was generated valid, so that a case
        # meant to be refused for that part stays one.
        label = case.operation.label
        choices = {}
        negative = case.meta is not None and case.meta.is_negative_at
        if not (negative and negative(ParameterLocation.PATH)):
            for name in case.path_parameters or {}:
                if world.pool(label, name):
                    choices[("path", name)] = world.pool(label, name)
        if isinstance(case.body, dict) and not (negative and negative(ParameterLocation.BODY)):
            for name in ("workspace_id", "user_id", "owner_id"):
                if name in case.body and world.pool(label, name):
                    choices[("body", name)] = world.pool(label, name)
        if not choices:
            return st.just(case)

        def replace(chosen: dict) -> object:
            # The ids put in are valid where the generated ones were (the document asks only
            # for non-empty strings, and user ids of its pattern), so the case's metadata stays
            # true as generated; object.__setattr__ keeps schemathesis from re-deriving it.
            path = {n: v for (where, n), v in chosen.items() if where == "path" and v}
            body = {n: v for (where, n), v in chosen.items() if where == "body" and v}
            if path:
                object.__setattr__(case, "path_parameters", {**case.path_parameters, **path})
            if body:
                object.__setattr__(case, "body", {**case.body, **body})
            return case

        # None keeps the generated value.
        return st.fixed_dictionaries({
            key: st.sampled_from([None, *pool]) for key, pool in choices.items()
        }).map(replace)

    @schema.hook
    def after_call(context, case, response):
        named = _named_objects(case)
        world.sent.append(Sent(case.operation.label, case.method, response.status_code,
                               bool(named & world.own_objects), bool(named & world.other_objects)))

    return schema


@pytest.fixture(scope="module")
def unauthenticated_schema(world):
    # No credentials configured; each case is sent without one and with a wrong one. The
    # coverage phase is off: refusing comes before reading anything else, so only the
    # credential matters and a few generated requests per operation show it.
    return _load(world, {"phases": {"coverage": {"enabled": False}}})


schema = schemathesis.pytest.from_fixture("api_schema")
unauthenticated = schemathesis.pytest.from_fixture("unauthenticated_schema")


# --- checks on every response --------------------------------------------------------------

def is_admin(case) -> bool:
    return case.path.startswith("/admin/")


def contract_envelope(ctx, response, case):
    """Never a 5xx; a JSON body; every 4xx the contract's envelope with a code of its status."""
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:500]}"
    if case.method.upper() == "OPTIONS" and status == 200:
        # HTTP's own answer (and a CORS preflight's): no body, the methods in Allow.
        assert response.headers.get("allow"), response.headers
        assert response.content == b"", response.text
        return None
    if status == 204:
        assert response.content == b"", response.text
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.split(";")[0].strip() == "application/json", (content_type, response.text)
    body = response.json()
    if status >= 400:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert isinstance(error, dict) and set(error) == {"code", "message", "details"}, body
        assert error["code"] in CODES_BY_STATUS.get(status, set()), (status, body)
        assert isinstance(error["message"], str) and error["message"], body
        assert isinstance(error["details"], dict), body
    return None


ID_KEYS = {"id", "chat_id", "workspace_id", "reply_to"}


def _ids_in(node) -> set[str]:
    """Every id a JSON document names (id-like keys at any depth, outside chat metadata)."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "metadata":  # the client's own free-form object, echoed back
                continue
            if key in ID_KEYS and isinstance(value, (str, int)):
                found.add(str(value))
            found |= _ids_in(value)
    elif isinstance(node, list):
        for value in node:
            found |= _ids_in(value)
    return found


def make_no_leak_check(world: World):
    def no_internals_secrets_or_foreign_ids(ctx, response, case):
        """No traceback, SQL or secret in any body; none of the other tenant's ids either."""
        text = response.text
        leaked = [marker for marker in LEAKS if marker in text]
        assert not leaked, (leaked, text[:1000])
        for secret in (OWN_SECRET, OTHER_SECRET, world.fuzzer.key, world.other.key):
            assert secret not in text, text[:1000]
        if response.content and not is_admin(case):
            try:
                body = response.json()
            except ValueError:
                body = None
            seen = _ids_in(body) & world.other_ids
            assert not seen, (seen, text[:1000])
        return None

    return no_internals_secrets_or_foreign_ids


#: Rules the document states only in words, because JSON Schema cannot say them: an agent's
#: URL must have a host marshmallow's URL validator accepts (and that is a valid address if
#: numeric), a python agent's callable must be listed in PYTHON_AGENTS (none is, here), and
#: chat metadata must fit in 16 KB as JSON and hold no NUL anywhere (PostgreSQL cannot store
#: one). A schema-valid request refused for one of these, and only these, is right;
#: schemathesis' positive_data_acceptance is run for everything else.
RULES_IN_WORDS = {"agent": {"url", "base_url", "callable"}, "metadata": None}


def _refused_only_for_rules_in_words(response) -> bool:
    if response.status_code != 400:
        return False
    error = response.json()["error"]
    if error["code"] != "validation_error" or not error["details"]:
        return False
    for name, messages in error["details"].items():
        if name not in RULES_IN_WORDS:
            return False
        fields = RULES_IN_WORDS[name]
        if fields is not None and not (isinstance(messages, dict) and set(messages) <= fields):
            return False
    return True


def positive_data_acceptance_but_for_rules_in_words(ctx, response, case):
    """schemathesis' positive_data_acceptance, but for the rules in RULES_IN_WORDS."""
    try:
        return openapi_checks.positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if _refused_only_for_rules_in_words(response):
            return None
        raise


# --- the fuzzing ---------------------------------------------------------------------------

@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, derandomize=DERANDOMIZE, deadline=None,
                     database=None)
def test_every_operation_answers_generated_requests_within_the_contract(case, world):
    case.call_and_validate(
        additional_checks=[contract_envelope, make_no_leak_check(world),
                           positive_data_acceptance_but_for_rules_in_words],
        excluded_checks=[openapi_checks.positive_data_acceptance])


@unauthenticated.parametrize()
@hypothesis.settings(max_examples=UNAUTHENTICATED_MAX_EXAMPLES, derandomize=DERANDOMIZE,
                     deadline=None, database=None)
def test_every_operation_refuses_a_missing_or_wrong_credential_with_401(case, world):
    # The wrong credential is the other door's: the admin token as a tenant key, a tenant key
    # as the admin token. The request is sent as generated but for that header (schemathesis'
    # own transport would drop a credential header from a case it generated without one).
    if is_admin(case):
        name, wrong = "Authorization", f"Bearer {world.fuzzer.key}"
    else:
        name, wrong = "X-API-Key", ADMIN_TOKEN
    leak_check = make_no_leak_check(world)
    request = case.as_transport_kwargs(base_url=world.url)
    for value, code in ((None, "missing_api_key"), (wrong, "invalid_api_key")):
        headers = {k: v for k, v in (request.get("headers") or {}).items()
                   if k.lower() not in ("authorization", "x-api-key")}
        if value is not None:
            headers[name] = value
        response = schemathesis.Response.from_any(
            requests.request(**{**request, "headers": headers}, timeout=10))
        if case.method.upper() == "OPTIONS":  # answered by HTTP itself, before any route
            assert response.status_code == 200, response.text
            continue
        assert response.status_code == 401, (value, response.status_code, response.text)
        contract_envelope(None, response, case)
        leak_check(None, response, case)
        assert response.json()["error"]["code"] == code, (value, response.text)


# Inputs next to what the fuzzing found, that once got past the checks; schemathesis draws them
# too rarely to be sure of them in a bounded run. Ids: str.isdigit() digits that int() refuses
# (a 500) or reads ("٣" was 3); a trailing newline, which re.match's "$" lets through ("ann\n"
# was a user id); NUL, which PostgreSQL refuses in any string (a lookup was a 500). Bodies: a
# lone surrogate escape, which no database can store (a 500 whose error handler then failed too,
# answering an HTML page).
SURROGATE = "a\ud800b"
EDGE_INPUTS = [
    pytest.param("get", "/api/v1/chats/{chat}/messages?after_id=%C2%B2", None,
                 400, "validation_error", id="after_id superscript two"),
    pytest.param("get", "/api/v1/chats/{chat}/messages?before_id=%D9%A3", None,
                 400, "validation_error", id="before_id arabic-indic three"),
    pytest.param("get", "/api/v1/chats/user/ann%0A", None,
                 400, "validation_error", id="user id in path with newline"),
    pytest.param("put", "/api/v1/workspaces/{workspace}/members/bob%0A", None,
                 400, "validation_error", id="member id in path with newline"),
    pytest.param("post", "/api/v1/chats/", {"user_id": "ann\n"},
                 400, "validation_error", id="chat user_id with newline"),
    pytest.param("post", "/api/v1/workspaces", {"owner_id": "ann\n", "name": "x"},
                 400, "validation_error", id="workspace owner_id with newline"),
    pytest.param("get", "/api/v1/workspaces/%00", None,
                 404, "workspace_not_found", id="workspace id NUL"),
    pytest.param("delete", "/api/v1/workspaces/a%00b/members/bob", None,
                 404, "workspace_not_found", id="member workspace id NUL"),
    pytest.param("get", "/api/v1/chats/%00", None, 404, "chat_not_found", id="chat id NUL"),
    pytest.param("get", "/api/v1/chats/%00/messages", None,
                 404, "chat_not_found", id="history chat id NUL"),
    pytest.param("post", "/api/v1/chats/", {"user_id": "ann", "workspace_id": "a\x00b"},
                 404, "workspace_not_found", id="chat workspace_id NUL"),
    pytest.param("post", "/admin/tenants/%00/api-keys", None,
                 404, "not_found", id="admin tenant id NUL"),
    pytest.param("delete", "/admin/tenants/{tenant}/api-keys/%00", None,
                 404, "not_found", id="admin key id NUL"),
    pytest.param("post", "/api/v1/chats/", {"user_id": "ann", "title": SURROGATE},
                 400, "invalid_json", id="chat title lone surrogate"),
    pytest.param("post", "/chat", {"user_id": "ann", "metadata": {SURROGATE: 1}},
                 400, "invalid_json", id="chat metadata key lone surrogate"),
    pytest.param("post", "/api/v1/workspaces", {"owner_id": "ann", "name": SURROGATE},
                 400, "invalid_json", id="workspace name lone surrogate"),
    pytest.param("patch", "/api/v1/workspaces/{workspace}",
                 {"agent": {"kind": "openai", "base_url": "http://h/v1", "model": SURROGATE}},
                 400, "invalid_json", id="agent model lone surrogate"),
    pytest.param("post", "/admin/tenants", {"name": SURROGATE},
                 400, "invalid_json", id="tenant name lone surrogate"),
]


@pytest.mark.parametrize("method, path, body, status, code", EDGE_INPUTS)
def test_near_miss_inputs_get_their_contract_error(world, method, path, body, status, code):
    path = path.format(chat=world.pools["chat_id"][0], workspace=world.pools["workspace_id"][0],
                       tenant=world.pools["tenant_id"][0])
    headers = ({"Authorization": f"Bearer {ADMIN_TOKEN}"} if path.startswith("/admin/")
               else world.fuzzer.headers)
    r = requests.request(method, world.url + path, json=body, headers=headers, timeout=10)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json", r.text
    error = r.json()["error"]
    assert error["code"] == code, r.text
    assert set(error) == {"code", "message", "details"}, r.text


# --- every operation taking an id, given an existing id of each tenant ---------------------

#: What a request to each operation that takes a workspace or chat id needs besides the id: the
#: other path parameters and the body with which the fuzzer's own object is found and served.
ID_OPERATIONS = {
    "GET /api/v1/workspaces/{workspace_id}": ({}, None, 200),
    "PATCH /api/v1/workspaces/{workspace_id}": ({}, {"name": "Renamed"}, 200),
    "DELETE /api/v1/workspaces/{workspace_id}": ({}, None, 204),
    "PUT /api/v1/workspaces/{workspace_id}/members/{user_id}": ({"user_id": "carol@example.com"},
                                                               None, 204),
    "DELETE /api/v1/workspaces/{workspace_id}/members/{user_id}": ({"user_id": "bob"}, None, 204),
    "GET /api/v1/chats/{chat_id}": ({}, None, 200),
    "GET /api/v1/chats/{chat_id}/messages": ({}, None, 200),
    "DELETE /api/v1/chats/{chat_id}": ({}, None, 204),
    "POST /api/v1/chats/{chat_id}/connection-string": ({}, {"user_id": "ann"}, 200),
}


def _own_object(world: World, kind: str) -> str:
    """A new workspace (ann owns it, bob is a member) or a chat in one, of the fuzzer's."""
    workspace = world.fuzzer.workspace("ann", members=("bob",))
    found = workspace if kind == "workspace_id" else world.fuzzer.chat("ann", workspace)
    world.own_objects.add(found)
    return found


def test_every_operation_taking_an_id_is_listed_here(world):
    document = requests.get(world.url + "/openapi.json", timeout=10).json()
    labels = {f"{method.upper()} {path}" for path, item in document["paths"].items()
              for method in item if method in ("get", "put", "post", "patch", "delete")
              and ("{workspace_id}" in path or "{chat_id}" in path)}
    assert labels == set(ID_OPERATIONS)


# Not left to chance: the fuzzing draws existing ids only some of the time, so each operation
# is also sent one of the fuzzer's own ids (found and served) and one of the other tenant's
# (refused 404 with nothing revealed), on both backends; recorded beside the fuzzing's requests.
@pytest.mark.parametrize("whose", ["own", "foreign"])
@pytest.mark.parametrize("label", list(ID_OPERATIONS))
def test_every_operation_taking_an_id_serves_own_ids_and_refuses_the_other_tenants(
        world, label, whose):
    params, body, own_status = ID_OPERATIONS[label]
    method, path = label.split(" ", 1)
    kind = "workspace_id" if "{workspace_id}" in path else "chat_id"
    if whose == "own":
        object_id = _own_object(world, kind)
    else:
        object_id = sorted(set(world.pools[kind]) & world.other_objects)[0]
    url = world.url + path.format(**{kind: object_id, **params})
    r = requests.request(method, url, json=body, headers=world.fuzzer.headers, timeout=10)
    world.sent.append(Sent(label, method, r.status_code, whose == "own", whose == "foreign"))
    if whose == "own":
        assert r.status_code == own_status, r.text
        return
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert set(error) == {"code", "message", "details"}, r.text
    assert error["code"] == ("workspace_not_found" if kind == "workspace_id"
                             else "chat_not_found"), r.text
    assert not _ids_in(r.json()) & world.other_ids, r.text  # nothing of theirs revealed
    for secret in (OTHER_SECRET, world.other.key):
        assert secret not in r.text, r.text


# --- afterwards ----------------------------------------------------------------------------

def _fuzzed(world: World) -> None:
    if not any(s.as_documented and s.status < 400 for s in world.sent):
        pytest.skip("runs after the fuzzing tests of this module")


def test_existing_ids_of_both_tenants_were_sent_to_every_operation_taking_one(world):
    _fuzzed(world)
    sent = [s for s in world.sent if s.as_documented]
    with_ids = {s.label for s in sent if "{workspace_id}" in s.label or "{chat_id}" in s.label}
    assert with_ids == set(ID_OPERATIONS), with_ids
    assert with_ids - {s.label for s in sent if s.own} == set()
    assert with_ids - {s.label for s in sent if s.foreign} == set()
    # And its own objects were found: requests got past the lookups, to read and to change.
    found = {s.label.split()[0] for s in sent if s.own and 200 <= s.status < 300}
    assert "GET" in found and found & {"PATCH", "PUT", "DELETE"}, Counter(
        (s.label, s.status) for s in sent if s.own)


def test_no_request_naming_the_other_tenants_objects_succeeded(world):
    _fuzzed(world)
    foreign = [s for s in world.sent if s.as_documented and s.foreign]
    assert foreign
    assert [s for s in foreign if s.status < 400] == []
    assert {s.status for s in foreign} <= {400, 401, 404, 405}, Counter(s.status for s in foreign)


def test_the_other_tenants_objects_read_back_exactly_as_stored(world):
    _fuzzed(world)
    assert _snapshot(world.other) == world.other_snapshot


def test_the_server_is_alive_with_no_traceback_in_its_log(world):
    _fuzzed(world)
    assert world.server.process.poll() is None
    r = requests.get(world.url + "/healthz", timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    log = world.server.log()
    assert "Traceback" not in log, log[-5000:]
    assert "unhandled error" not in log, log[-5000:]

