"""Plain-language schema messages (data.schema_messages): every violation names
its field and never echoes a long value back."""

import jsonschema

from phems_clinical.data.schema_messages import show_value, translate

SCHEMA = {
    "type": "object",
    "properties": {
        "product": {"type": "string", "title": "product"},
        "model": {"type": "string", "title": "model file"},
        "note": {"type": "string", "maxLength": 8, "title": "note"},
        "tags": {"type": "array", "maxItems": 2, "title": "tags"},
    },
    "oneOf": [{"required": ["product"]}, {"required": ["model"]}],
}


def _messages(instance):
    v = jsonschema.Draft202012Validator(SCHEMA)
    out = []
    for err in v.iter_errors(instance):
        out += translate(err, lambda s, fb: s.get("title", fb))
    return out


def test_oneof_on_a_non_object_says_object_expected():
    # was: TypeError "argument of type 'int' is not iterable"
    msgs = _messages(5)
    assert any(m.message.startswith("expected an object, got 5") for m in msgs)


def test_max_length_and_items_name_the_size_not_the_value():
    secret = "MRN-0049001-" * 20
    msgs = _messages({"product": "advate", "note": secret, "tags": [1, 2, 3]})
    by = {m.field: m.message for m in msgs}
    assert by["note"] == f"expected at most 8 characters (note), got {len(secret)}"
    assert by["tags"] == "expected at most 2 entries (tags), got 3"
    assert all("MRN" not in m.message for m in msgs)


def test_long_text_is_shortened_when_shown():
    assert show_value("x" * 100) == repr("x" * 40) + "... (100 characters)"
    assert show_value("short") == "'short'"
