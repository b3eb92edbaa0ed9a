"""Validates JSON request bodies against a JSON Schema with the `jsonschema` library, as the
`ffi` plugin's access phase: a valid body goes on to the upstream (with an X-Validated-By
header), an invalid one is answered 400 with the validation errors.

    plugins:
      ffi:
        lib: ffi_python3
        cfg: "venv=.venv-py;examples/python/validate_json,init,examples/python/order.schema.json"
        include_body: true

cfg's third field is the schema file. The virtualenv holds jsonschema:
    python3 -m venv .venv-py && .venv-py/bin/pip install jsonschema
"""
import json

import jsonschema
import polygate_ffi


def _respond(status, body):
    return {
        "action": "respond",
        "status": status,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(body) + "\n",
    }


def init(cfg, tq):
    path = polygate_ffi.cfg_str(cfg)
    with open(path) as f:
        schema = json.load(f)
    validator = jsonschema.Draft202012Validator(schema)

    def handle(req):
        doc = json.loads(req)
        try:
            body = json.loads(doc.get("body") or "")
        except ValueError as e:
            return _respond(400, {"error_msg": "body is not JSON: %s" % e})
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        if errors:
            return _respond(
                400,
                {
                    "error_msg": "invalid request body",
                    "errors": [
                        {"path": "/" + "/".join(str(p) for p in e.absolute_path), "message": e.message}
                        for e in errors
                    ],
                },
            )
        return {"action": "continue", "set_headers": {"x-validated-by": "python-jsonschema"}}

    # validation is CPU work under the GIL: one poll thread, handlers run inline
    return polygate_ffi.serve(tq, handle)
