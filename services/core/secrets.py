"""Refusing the placeholder secrets the deploy templates ship, so that a deployment made from a
template as is cannot run with a published password or token.

deploy/lib.sh (`hb_check_secret`) applies the same patterns to the deploy scripts; the tests
feed both the values the templates hold.
"""

from __future__ import annotations

import re

# deploy/k8s/secret.yaml's REPLACE-WITH-..., deploy/hardbatch.env.example's <...>, change-me.
_SECRET_YAML = re.compile(r"replace-?with", re.IGNORECASE)
_ENV_EXAMPLE = re.compile(r"^<.*>$")
_CHANGE_ME = re.compile(r"change-?me", re.IGNORECASE)

_MAKE_ENV = "run deploy/make-env.sh (it writes deploy/hardbatch.env with random values)"
_SECRET = ("fill the Kubernetes Secret hardbatch-tokens with random values (deploy/k8s/"
           "secret.yaml says how)")


def secret_problem(name: str, value: str) -> str | None:
    """Why `value` of the setting `name` cannot be a real secret, naming what to edit; else None."""
    if not value.strip():
        return (f"{name} is set but empty: unset it, or {_MAKE_ENV}; on Kubernetes, {_SECRET}")
    if _SECRET_YAML.search(value):
        return (f"{name} holds the placeholder {value!r} of deploy/k8s/secret.yaml: {_SECRET}, "
                "never the template as is")
    if _ENV_EXAMPLE.match(value):
        return (f"{name} holds the placeholder {value!r} of deploy/hardbatch.env.example: "
                f"{_MAKE_ENV}, instead of copying the example")
    if _CHANGE_ME.search(value):
        return (f"{name} holds the placeholder {value!r}: edit the file it came from; "
                f"{_MAKE_ENV}, or on Kubernetes {_SECRET}")
    return None
