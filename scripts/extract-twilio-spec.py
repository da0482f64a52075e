#!/usr/bin/env python3
"""Extract the slice of Twilio's OpenAPI spec that the test fake checks against.

The fake Twilio server in tests/it/support/fake_twilio.rs validates every request wagate sends
against the official spec (twilio/twilio-oai, spec/json/twilio_api_v2010.json). That file is
1.8 MB and lives in shared/, which a fresh CI clone may not have, so this script copies the
few parts the fake needs into tests/fixtures/twilio_messages_api.json, which is committed:

  * the path parameter `AccountSid` (pattern, lengths);
  * POST (CreateMessage): content type, success status, request-body properties with every
    `$ref` resolved (type, format, enum, pattern, lengths, items, x-twilio), `required`, and
    the `x-twilio.conditional` groups, both as written (snake_case) and mapped to form names;
  * GET (ListMessage): query parameters and the list response's properties;
  * the `api.v2010.account.message` schema's properties (the 201 body / list items);
  * the security scheme.

Descriptions are left out on purpose: the fake checks structure, not prose.

Usage:
  scripts/extract-twilio-spec.py                 # write the fixture
  scripts/extract-twilio-spec.py --check         # exit 1 if the committed fixture is stale
  scripts/extract-twilio-spec.py --spec PATH --out PATH --commit SHA
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = REPO_ROOT.parent / "shared" / "twilio" / "twilio_api_v2010.json"
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "twilio_messages_api.json"

# shared/reference/twilio.md section 7: where the copy in shared/twilio came from.
UPSTREAM_REPOSITORY = "twilio/twilio-oai"
UPSTREAM_PATH = "spec/json/twilio_api_v2010.json"
UPSTREAM_COMMIT = "d50069b44ea8cd23141385bdb6db48f16ff75bb5"
UPSTREAM_SHA256 = "99cae87a6bb1725f71363364cbd30282a13140374b2d5f9bdd5bdfa5d4c8a6d7"

MESSAGES_PATH = "/2010-04-01/Accounts/{AccountSid}/Messages.json"
MESSAGE_SCHEMA = "api.v2010.account.message"
FORM = "application/x-www-form-urlencoded"

# Schema keywords the fake may use; anything else (descriptions, examples) is dropped.
KEPT_KEYWORDS = (
    "type",
    "format",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "nullable",
    "items",
    "x-twilio",
)


class SpecError(Exception):
    pass


def resolve(spec, node):
    """Follow `$ref`s (local ones only) until a concrete schema is reached."""
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/") or ref in seen:
            raise SpecError(f"cannot resolve $ref {ref!r}")
        seen.add(ref)
        target = spec
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def slim(spec, schema):
    """A schema reduced to the keywords the fake checks, with refs resolved recursively."""
    schema = resolve(spec, schema)
    out = {}
    for key in KEPT_KEYWORDS:
        if key not in schema:
            continue
        value = schema[key]
        if key == "items":
            value = slim(spec, value)
        elif key == "x-twilio":
            # `pii` is about data handling, not validation.
            value = {k: v for k, v in value.items() if k != "pii"}
            if not value:
                continue
        out[key] = value
    unknown = set(schema) - set(KEPT_KEYWORDS) - {"description", "example", "examples"}
    if unknown:
        raise SpecError(f"schema uses keywords this script does not extract: {sorted(unknown)}")
    return out


def form_name(snake, properties):
    """Map an x-twilio.conditional name (`media_url`) to its form parameter (`MediaUrl`)."""
    wanted = snake.replace("_", "").lower()
    matches = [name for name in properties if name.lower() == wanted]
    if len(matches) != 1:
        raise SpecError(f"conditional name {snake!r} matches {matches} among request properties")
    return matches[0]


def parameters(spec, operation, location):
    out = {}
    for param in operation.get("parameters", []):
        param = resolve(spec, param)
        if param["in"] != location:
            continue
        entry = {"required": bool(param.get("required", False))}
        entry.update(slim(spec, param["schema"]))
        out[param["name"]] = entry
    return out


def extract(spec, source):
    path_item = spec["paths"].get(MESSAGES_PATH)
    if path_item is None:
        raise SpecError(f"spec has no path {MESSAGES_PATH}")
    post, get = path_item["post"], path_item["get"]

    # Path parameter: both operations declare it; they must agree.
    post_path = parameters(spec, post, "path")
    get_path = parameters(spec, get, "path")
    if post_path != get_path:
        raise SpecError("POST and GET disagree on the path parameters")

    # CreateMessage request body.
    content = post["requestBody"]["content"]
    if list(content) != [FORM]:
        raise SpecError(f"CreateMessage body content types changed: {list(content)}")
    body_schema = resolve(spec, content[FORM]["schema"])
    properties = {name: slim(spec, prop) for name, prop in body_schema["properties"].items()}
    conditional_raw = post.get("x-twilio", {}).get("conditional", [])
    conditional = [[form_name(n, properties) for n in group] for group in conditional_raw]
    success = [code for code in post["responses"] if code.startswith("2")]
    if len(success) != 1:
        raise SpecError(f"CreateMessage has several success responses: {success}")
    created = resolve(spec, post["responses"][success[0]]["content"]["application/json"]["schema"])

    # ListMessage.
    list_ok = get["responses"]["200"]["content"]["application/json"]["schema"]
    list_ok = resolve(spec, list_ok)
    list_properties = {}
    for name, prop in list_ok["properties"].items():
        prop = dict(prop)
        if prop.get("type") == "array":
            items_ref = prop["items"].get("$ref", "")
            prop = {"type": "array", "items_schema": items_ref.rsplit("/", 1)[-1]}
        else:
            prop = slim(spec, prop)
        list_properties[name] = prop

    # The message resource (201 body and list items).
    message = spec["components"]["schemas"][MESSAGE_SCHEMA]
    if created is not message:
        raise SpecError(f"CreateMessage no longer answers with {MESSAGE_SCHEMA}")
    message_properties = {name: slim(spec, prop) for name, prop in message["properties"].items()}

    security = [list(req) for req in post.get("security", [])]
    schemes = {
        name: spec["components"]["securitySchemes"][name] for req in security for name in req
    }

    return {
        "_source": source,
        "_note": "Generated by scripts/extract-twilio-spec.py; do not edit by hand.",
        "path": MESSAGES_PATH,
        "path_parameters": post_path,
        "security": {"requirements": security, "schemes": schemes},
        "create": {
            "operationId": post["operationId"],
            "method": "POST",
            "content_type": FORM,
            "success_status": int(success[0]),
            "required": body_schema.get("required", []),
            "conditional_raw": conditional_raw,
            "conditional": conditional,
            "properties": properties,
        },
        "list": {
            "operationId": get["operationId"],
            "method": "GET",
            "success_status": 200,
            "query_parameters": parameters(spec, get, "query"),
            "response_properties": list_properties,
        },
        "message": {
            "schema": MESSAGE_SCHEMA,
            "properties": message_properties,
        },
    }


def render(fixture):
    return json.dumps(fixture, indent=2, ensure_ascii=False) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--commit", default=UPSTREAM_COMMIT, help="twilio-oai commit of --spec")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()

    raw = args.spec.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != UPSTREAM_SHA256 and args.commit == UPSTREAM_COMMIT:
        print(
            f"warning: {args.spec} has sha256 {digest}, not the {UPSTREAM_COMMIT[:12]} copy;"
            " pass --commit with the commit it came from",
            file=sys.stderr,
        )
    spec = json.loads(raw)
    source = {
        "repository": UPSTREAM_REPOSITORY,
        "path": UPSTREAM_PATH,
        "commit": args.commit,
        "file": args.spec.name,
        "sha256": digest,
        "bytes": len(raw),
        "openapi": spec.get("openapi"),
        "info_version": spec.get("info", {}).get("version"),
    }
    try:
        text = render(extract(spec, source))
    except (SpecError, KeyError) as err:
        print(f"error: the spec's shape changed: {err!r}", file=sys.stderr)
        return 2

    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run scripts/extract-twilio-spec.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text)} bytes) from {args.spec} sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
