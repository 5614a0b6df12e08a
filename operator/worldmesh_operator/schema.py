"""Checking a ModelDeployment manifest against the CRD file (``worldmesh validate`` is in ``cli``).

The CRD YAML (``crds/modeldeployment.yaml``) is the one schema: ``CrdSchema`` reads it at
run time and checks a manifest the way the API server (with kubectl's strict field
validation) would, in its order:

- the header: ``apiVersion``, ``kind``, ``metadata.name`` a DNS-1035 label;
- the schema's defaults are applied (to a copy), as the API server defaults;
- the openAPIV3Schema, turned into a JSON Schema (Draft 2020-12) and checked by
  ``jsonschema``: types, bounds, enums, patterns, required fields and unknown fields
  (every object with ``properties`` rejects other keys, where Kubernetes would prune);
- ``x-kubernetes-list-type`` ``set`` (no duplicate items) and ``map`` (unique keys);
- every ``x-kubernetes-validations`` CEL rule, evaluated with ``celpy`` (cel-python)
  with ``self`` bound as Kubernetes binds it (escaped property names, ``isSorted()``
  from the Kubernetes list library). A rule runs only where its subtree passed the
  schema, as a rule over ill-typed data says nothing.

Every problem is a ``FieldError`` naming its path (``spec.stages[1].replicas.max``).
A CRD file that cannot be read or whose rules do not compile is a ``CrdError``.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
CRD_FILE = "modeldeployment.yaml"

Path_ = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class FieldError:
    path: str  #: e.g. ``spec.stages[1].replicas.max``
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(ValueError):
    """A manifest is not a valid ModelDeployment; ``errors`` lists every problem found."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class CrdError(RuntimeError):
    """The CRD file itself is missing, unreadable or has a rule that does not compile."""


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(manifest)"


def default_crd_path() -> Path:
    """The repository's ``crds/modeldeployment.yaml`` (editable installs, tests), else the
    copy shipped as package data ``worldmesh_operator/crds/``. Raises ``CrdError``."""
    repo = Path(__file__).resolve().parents[2] / "crds" / CRD_FILE
    if repo.is_file():
        return repo
    packaged = importlib.resources.files("worldmesh_operator") / "crds" / CRD_FILE
    if packaged.is_file():
        return Path(str(packaged))
    raise CrdError(f"cannot find the CRD: neither {repo} nor the package data has {CRD_FILE}")


@functools.lru_cache(maxsize=4)
def load_schema(path: Path | None = None) -> CrdSchema:
    """Read and compile the CRD once per process (cached by path). Raises ``CrdError``."""
    path = path or default_crd_path()
    try:
        crd = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CrdError(f"{path}: cannot read the CRD: {exc}") from None
    return CrdSchema(crd, str(path))


class CrdSchema:
    """One version of the CRD, compiled: a JSON-schema validator and the CEL programs."""

    def __init__(self, crd: dict[str, Any], source: str = "CRD") -> None:
        try:
            names = crd["spec"]["names"]
            version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
            self.api_version = f"{crd['spec']['group']}/{version['name']}"
            self.kind: str = names["kind"]
            self.openapi: dict[str, Any] = version["schema"]["openAPIV3Schema"]
        except (KeyError, TypeError, StopIteration) as exc:
            raise CrdError(f"{source}: not a CustomResourceDefinition: {exc!r}") from None
        self.validator = _VALIDATOR(to_json_schema(self.openapi))
        self.programs: dict[str, celpy.Runner] = {}
        env = celpy.Environment()
        for node in _schema_nodes(self.openapi):
            for rule in node.get("x-kubernetes-validations", []):
                try:
                    ast = env.compile(rule["rule"])
                except Exception as exc:  # celpy raises CELParseError and friends
                    raise CrdError(f"{source}: rule {rule['rule']!r}: {exc}") from None
                self.programs[rule["rule"]] = env.program(ast, functions=K8S_CEL_FUNCTIONS)

    def check(self, manifest: Any) -> tuple[dict[str, Any], list[FieldError]]:
        """The manifest (any Mapping, e.g. a kopf Body) as plain data with defaults applied,
        and every problem found (none: valid). The manifest itself is left alone."""
        if not isinstance(manifest, Mapping):
            return {}, [FieldError("(manifest)", "must be a mapping")]
        data = _plain(manifest)
        errors = list(self._header(data))
        apply_defaults(data, self.openapi)
        bad: list[tuple[Path_, str]] = [
            e for err in self.validator.iter_errors(data) for e in _explain(err)
        ]
        for node, schema, path in walk(data, self.openapi):
            bad.extend(_list_errors(node, schema, path))
        for node, schema, path in walk(data, self.openapi):
            if not any(p[: len(path)] == path for p, _ in bad):
                bad.extend(self._rules(node, schema, path))
        errors += [FieldError(format_path(p), m) for p, m in sorted(set(bad), key=_sort_key)]
        return data, errors

    def _header(self, manifest: dict[str, Any]) -> Iterator[FieldError]:
        for key, want in (("apiVersion", self.api_version), ("kind", self.kind)):
            if manifest.get(key) != want:
                yield FieldError(key, f"must be {want}, got {manifest.get(key)!r}")
        meta = manifest.get("metadata")
        if not isinstance(meta, dict):
            yield FieldError("metadata", "must be a mapping with a name")
            return
        name = meta.get("name")
        if not isinstance(name, str) or not DNS_1035_LABEL.match(name):
            yield FieldError("metadata.name", f"must be a DNS-1035 label, got {name!r}")
        namespace = meta.get("namespace")
        if namespace is not None and not (
            isinstance(namespace, str) and DNS_1123_LABEL.match(namespace)
        ):
            yield FieldError("metadata.namespace", f"must be a DNS label, got {namespace!r}")

    def _rules(self, node: Any, schema: dict[str, Any], path: Path_) -> Iterator[tuple[Path_, str]]:
        for rule in schema.get("x-kubernetes-validations", []):
            result: Any
            try:
                result = self.programs[rule["rule"]].evaluate({"self": to_cel(node, schema)})
            except CELEvalError as exc:
                result = exc
            if isinstance(result, CELEvalError):
                yield path, f"rule {rule['rule']!r} cannot be evaluated: {result.args[0]}"
            elif not result:
                where = re.findall(r"[^.\[\]']+", rule.get("fieldPath", ""))
                yield path + tuple(where), rule.get("message", f"failed rule: {rule['rule']}")


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 (Kubernetes structural) schema as JSON Schema Draft 2020-12."""
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEPT}
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get(_PRESERVE):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    for word in ("anyOf", "allOf", "oneOf"):
        if word in node:
            out[word] = [to_json_schema(s) for s in node[word]]
    for word, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(word) is True and bound in out:
            out[word] = out.pop(bound)
    if node.get("x-kubernetes-int-or-string"):
        # numeric keywords bind only integers and string ones only strings: merge the branches
        for branch in out.pop("anyOf", []):
            out.update({k: v for k, v in branch.items() if k != "type"})
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    return out


def apply_defaults(data: Any, schema: dict[str, Any]) -> None:
    """Fill absent (or null, unless nullable) fields from ``default``, as the API server
    does, then recurse into every value, defaulted ones included."""
    if isinstance(data, dict):
        props = schema.get("properties", {})
        for key, sub in props.items():
            missing = key not in data or (data[key] is None and not sub.get("nullable"))
            if missing and "default" in sub:
                data[key] = copy.deepcopy(sub["default"])
        for key, value in data.items():
            sub = props.get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                apply_defaults(value, sub)
    elif isinstance(data, list) and "items" in schema:
        for item in data:
            apply_defaults(item, schema["items"])


def walk(
    data: Any, schema: dict[str, Any], path: Path_ = ()
) -> Iterator[tuple[Any, dict[str, Any], Path_]]:
    """Every node of the data that the schema describes, with its schema and path."""
    yield data, schema, path
    if isinstance(data, dict):
        for key, value in data.items():
            sub = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                yield from walk(value, sub, (*path, key))
    elif isinstance(data, list) and "items" in schema:
        for i, item in enumerate(data):
            yield from walk(item, schema["items"], (*path, i))


def to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """A value as Kubernetes binds it in CEL: by schema type, declared property names
    escaped (``nvidia.com/gpu`` is ``nvidia__dot__com__slash__gpu``)."""
    kind = schema.get("type")
    if value is None or schema.get("x-kubernetes-int-or-string") or schema.get(_PRESERVE):
        return json_to_cel(value)
    if kind == "object" and "properties" in schema and isinstance(value, dict):
        props = schema["properties"]
        return celtypes.MapType(
            {
                celtypes.StringType(cel_escape(k)): to_cel(v, props[k])
                for k, v in value.items()
                if k in props
            }
        )
    if kind == "array" and isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items", {})) for v in value])
    if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return celtypes.DoubleType(float(value))
    return json_to_cel(value)


def cel_escape(name: str) -> str:
    """Kubernetes' escaping of a property name into a CEL identifier."""
    if name in _CEL_RESERVED:
        return f"__{name}__"
    name = name.replace("__", "__underscores__")
    for char, word in ((".", "dot"), ("-", "dash"), ("/", "slash")):
        name = name.replace(char, f"__{word}__")
    return name


def _is_sorted(values: list[Any]) -> celtypes.BoolType:
    return celtypes.BoolType(all(a <= b for a, b in itertools.pairwise(values)))


#: The functions of the Kubernetes CEL libraries that the CRD's rules use.
K8S_CEL_FUNCTIONS: dict[str, Any] = {"isSorted": _is_sorted}
_PRESERVE = "x-kubernetes-preserve-unknown-fields"
_VALIDATOR = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool)
    ),
)
# fmt: off
_CEL_RESERVED = frozenset((
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for",
    "function", "if", "import", "let", "loop", "package", "namespace", "return", "var", "void",
    "while",
))
#: OpenAPI keywords that mean the same in JSON Schema 2020-12
_KEPT = frozenset((
    "type", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems",
    "maxItems", "multipleOf", "required", "minProperties", "maxProperties", "format",
))
_TYPE_NAMES = {
    "integer": "an integer", "number": "a number", "string": "a string", "boolean": "a boolean",
    "object": "a mapping", "array": "a list", "null": "null",
}
_BOUNDS = {
    "minimum": "must be >= {}", "maximum": "must be <= {}", "exclusiveMinimum": "must be > {}",
    "exclusiveMaximum": "must be < {}", "minLength": "must be at least {} characters long",
    "maxLength": "must be at most {} characters long", "minItems": "must have at least {} item(s)",
    "maxItems": "must have at most {} item(s)", "multipleOf": "must be a multiple of {}",
}
# fmt: on


def _schema_nodes(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield schema
    for sub in schema.get("properties", {}).values():
        yield from _schema_nodes(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _schema_nodes(schema[key])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _explain(error: jsonschema.ValidationError) -> Iterator[tuple[Path_, str]]:
    """A jsonschema error as (path, message) pairs in this project's words."""
    path: Path_ = tuple(error.absolute_path)
    word = error.validator
    want: Any = error.validator_value
    got: Any = error.instance
    schema: Any = error.schema
    if word == "required":
        for key in want:
            if key not in got:
                yield (*path, key), "required"
    elif word == "additionalProperties":
        for key in got:
            if key not in schema.get("properties", {}):
                yield (*path, key), "unknown field"
    elif word == "type":
        kinds = [want] if isinstance(want, str) else want
        yield (
            path,
            f"must be {' or '.join(_TYPE_NAMES.get(k, k) for k in kinds)}, got {_short(got)}",
        )
    elif word in _BOUNDS:
        yield path, _BOUNDS[word].format(want)
    elif word == "enum":
        yield path, f"must be one of {', '.join(map(str, want))}, got {_short(got)}"
    elif word == "pattern":
        yield path, f"must match {want}, got {_short(got)}"
    else:
        yield path, error.message


def _list_errors(node: Any, schema: dict[str, Any], path: Path_) -> Iterator[tuple[Path_, str]]:
    kind = schema.get("x-kubernetes-list-type")
    if kind not in ("set", "map") or not isinstance(node, list):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen: set[str] = set()
    for i, item in enumerate(node):
        if kind == "map" and not isinstance(item, dict):
            continue
        ident = json.dumps([item.get(k) for k in keys] if kind == "map" else item, sort_keys=True)
        if ident in seen:
            where = (*path, i, keys[0]) if kind == "map" and len(keys) == 1 else (*path, i)
            shown = item.get(keys[0]) if kind == "map" and len(keys) == 1 else item
            yield where, f"duplicate value {_short(shown)}"
        seen.add(ident)


def _sort_key(item: tuple[Path_, str]) -> tuple[list[str], str]:
    return [f"{p:09d}" if isinstance(p, int) else p for p in item[0]], item[1]


def _plain(value: Any) -> Any:
    """A deep copy with every Mapping a dict and every list a list."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
