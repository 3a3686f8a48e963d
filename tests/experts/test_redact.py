"""The one redaction path (experts.remote.redact): forms, pieces left by truncation, JSON kept valid,
ordinary words kept, objects, bytes and log records; and the places that used to cut before redacting."""

from __future__ import annotations

import base64
import io
import json
import logging
from secrets import token_hex
from urllib.parse import quote, quote_plus

import pytest

from experts.remote.redact import MARK, MIN_PREFIX, REDACTOR, Redactor, install_log_redaction
from experts.remote.upstream import error_fields


def fresh(*secrets: str) -> Redactor:
    r = Redactor()
    r.add(*secrets)
    return r


def test_every_form_of_a_key_is_redacted():
    key = "sk-" + token_hex(4) + '/+="\\&%?~' + token_hex(12)
    r = fresh(key)
    b64 = [base64.b64encode(prefix + key.encode()).decode() for prefix in (b"", b"Bearer ", b"user:")]
    for text in [key, json.dumps(key), json.dumps(json.dumps(key)), json.dumps(key).replace("/", "\\/"),
                 quote(key, safe=""), quote(key), quote_plus(key), quote(key, safe="").lower(), *b64,
                 base64.urlsafe_b64encode(key.encode()).decode(), f"<b>{key.replace('&', '&amp;')}</b>"]:
        out = r.redact(f"before {text} after")
        assert MARK in out and out.startswith("before ") and out.endswith(" after"), text
        assert key[3:15] not in out and text[:-3] not in out


@pytest.mark.parametrize("cut", range(MIN_PREFIX, 44))
def test_what_a_cut_leaves_is_redacted_and_json_stays_valid(cut):
    key = "sk-" + token_hex(4) + '/+="\\&%?~' + token_hex(12)
    r = fresh(key)
    for piece in (key[:cut], key[-cut:]):
        out = r.redact(json.dumps({"message": f"x {piece}", piece: [piece]}))
        assert json.loads(out) == {"message": f"x {MARK}", MARK: [MARK]}
    escaped = json.dumps(key)[1:-1]
    text = '{"m": "' + escaped[:cut] + '"}'
    out = r.redact(text)
    assert escaped[:MIN_PREFIX] not in out
    if not escaped[:cut].endswith("\\") or escaped[:cut].endswith("\\\\"):  # the input is JSON: so is the output
        assert json.loads(out)["m"].startswith(MARK)


def test_pieces_too_short_to_identify_and_ordinary_words_are_kept():
    hexkey, worded, vendor = "sk-" + token_hex(20), "provider-client-key", "sk-proj-" + token_hex(20)
    r = fresh(hexkey, worded, vendor, "mergegate-admin-2024", "short")
    assert r.redact(hexkey[:MIN_PREFIX - 1]) == hexkey[:MIN_PREFIX - 1]
    assert r.redact(hexkey[:MIN_PREFIX]) == MARK
    text = '{"provider": "x", "client-key": 1} x-mergegate-expert mergegate_requests_total sk-proj-abc short'
    assert r.redact(text) == text  # words in a key are public: only the whole key, or its random part, goes
    assert r.redact(f"a {worded}.") == f"a {MARK}." and r.redact(vendor[:12] + "'") == MARK + "'"
    assert "short" not in r  # too short to tell from a word: not a secret at all


def test_objects_bytes_and_depth():
    key = "sk-" + token_hex(20)
    r = fresh(key)
    obj = {"a": [key, {key: (1, key[:20])}], "n": 1.5, "none": None, 3: key}
    assert r.redact_obj(obj) == {"a": [MARK, {MARK: (1, MARK)}], "n": 1.5, "none": None, 3: MARK}
    assert r.redact_bytes(b"data: " + key.encode() + b"\n\n") == b"data: " + MARK.encode() + b"\n\n"
    deep: object = key
    for _ in range(200):
        deep = [deep]
    assert key not in json.dumps(r.redact_obj(deep))
    assert fresh().redact(key) == key and Redactor().redact_obj(obj) is obj  # nothing known: untouched


def test_error_fields_redacts_before_cutting():
    key = "sk-" + token_hex(20)
    REDACTOR.add(key)
    spelled = "".join(f"\\u{ord(c):04x}" for c in key)
    bodies = [json.dumps({"error": {"message": "x" * 990 + key, "code": key}}).encode(),
              ("y" * 290 + key).encode(), json.dumps({"error": {"detail": {key: "x" * 280 + key}}}).encode(),
              json.dumps(["z" * 290 + key]).encode(), ('{"error": {"message": "' + spelled + '"}}').encode()]
    for body in bodies:
        fields = error_fields(body)
        assert not any(key[:MIN_PREFIX] in str(v) for v in fields.values()), fields


def test_log_records_are_redacted_whoever_handles_them():
    key = "sk-" + token_hex(20)
    REDACTOR.add(key)
    install_log_redaction()
    install_log_redaction()  # idempotent
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # added after the installation
    log = logging.getLogger("test.redact")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        log.warning("upstream said %s (%d)", key, 1)
        log.info({"key": key})
        try:
            raise RuntimeError(f"failed with {key[:20]}")
        except RuntimeError:
            log.exception("boom %s", quote(key))
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert key[:MIN_PREFIX] not in text and text.count(MARK) == 4 and "RuntimeError" in text
