"""Reference oracle for tests/it/signature_differential.rs.

Reads JSON lines on stdin, answers each with one JSON line on stdout, computed by the official
twilio-python SDK (``twilio.request_validator.RequestValidator``). The first output line is a
handshake carrying the SDK version, so the Rust side can refuse to compare against the wrong one.

Request (form webhook)::

    {"id": 1, "kind": "form", "token": "...", "url": "...", "params": [["k", "v"], ...],
     "probes": [{"url": "...", "params": [["k", "v"], ...]}, ...]}

    -> {"id": 1, "sigs": [...], "valid": [...], "errors": [...]}

For each probe: ``sig = compute_signature(probe.url, probe.params)`` and
``valid = validate(url, params, sig)`` (the case's own url and params), i.e. "would the SDK accept
a request to ``url`` carrying the signature Twilio would have made for the probe".

Request (JSON body)::

    {"id": 2, "kind": "json", "token": "...", "url": "...",
     "probes": [{"url": "...", "body": "..."}, ...]}

For each probe: ``sig = compute_signature(probe.url, {})`` and ``valid = validate(url, probe.body, sig)``.

``errors[i]`` is null, or the exception text when ``validate`` raised (then ``valid[i]`` is null).
"""

import json
import sys

import twilio
from twilio.request_validator import RequestValidator


class MultiParams(dict):
    """Repeated keys for the SDK.

    ``compute_signature`` iterates the mapping for names and asks ``getall(name)`` (Flask's
    MultiDict), then ``getlist(name)`` (Django's QueryDict), and only then falls back to
    ``[params[name]]``. A plain dict whose values are lists therefore fails
    (``TypeError: unhashable type: 'list'`` from ``set([[...]])``), so repeated keys need an object
    with ``getall``.
    """

    def __init__(self, pairs):
        super().__init__()
        for name, value in pairs:
            self.setdefault(name, []).append(value)

    def getall(self, name):
        return list(self[name])


def answer(case):
    validator = RequestValidator(case["token"])
    sigs, valid, errors = [], [], []
    for probe in case["probes"]:
        if case["kind"] == "form":
            sig = validator.compute_signature(probe["url"], MultiParams(probe["params"]))
            request_params = MultiParams(case["params"])
        else:
            sig = validator.compute_signature(probe["url"], MultiParams([]))
            request_params = probe["body"]
        sigs.append(sig)
        try:
            valid.append(bool(validator.validate(case["url"], request_params, sig)))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - reported to the Rust side, which decides
            valid.append(None)
            errors.append("%s: %s" % (type(exc).__name__, exc))
    return {"id": case["id"], "sigs": sigs, "valid": valid, "errors": errors}


def main():
    stdin = open(sys.stdin.fileno(), "r", encoding="utf-8", newline="\n", closefd=False)
    out = sys.stdout
    out.write(json.dumps({"handshake": True, "twilio_version": twilio.__version__}) + "\n")
    for line in stdin:
        if not line.strip():
            continue
        out.write(json.dumps(answer(json.loads(line))) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
