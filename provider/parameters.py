"""Typed algorithm parameters: the checks on an algorithm's declaration when it is published,
and on a job's values against that declaration and the datasets' bounds when it starts."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import json_format, struct_pb2

from mesh.errors import InvalidArgument

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
NAME_RULE = "must be 1 to 64 letters, digits or _, starting with a letter"
MAX_DECLARED = 100

_KINDS = {
    pb.PARAMETER_TYPE_STRING: "a string",
    pb.PARAMETER_TYPE_INTEGER: "a whole number",
    pb.PARAMETER_TYPE_NUMBER: "a number",
    pb.PARAMETER_TYPE_BOOLEAN: "true or false",
}
NUMERIC = frozenset({pb.PARAMETER_TYPE_INTEGER, pb.PARAMETER_TYPE_NUMBER})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_of_type(value: Any, kind: int) -> bool:
    """Whether a JSON value (as Python) is of the parameter type `kind`."""
    if kind == pb.PARAMETER_TYPE_STRING:
        return isinstance(value, str)
    if kind == pb.PARAMETER_TYPE_BOOLEAN:
        return isinstance(value, bool)
    if kind == pb.PARAMETER_TYPE_NUMBER:
        return _is_number(value)
    if kind == pb.PARAMETER_TYPE_INTEGER:
        return _is_number(value) and float(value).is_integer()
    return False


def plain(value: struct_pb2.Value) -> Any:
    """A google.protobuf.Value as Python; a non-finite number stays a float (and is of no
    parameter type) rather than failing to convert."""
    if value.WhichOneof("kind") == "number_value":
        return value.number_value
    return json_format.MessageToDict(value)


def _shown(value: Any) -> str:
    """A value for an error message: JSON, whole numbers without `.0`, cut short."""
    if _is_number(value) and float(value).is_integer() and abs(value) < 2**53:
        value = int(value)
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"between {_shown(minimum)} and {_shown(maximum)}"
    return f"at least {_shown(minimum)}" if minimum is not None else f"at most {_shown(maximum)}"


def _optional(
    message: pb.ParameterSpec | pb.ParameterBound, field: Literal["minimum", "maximum"]
) -> float | None:
    return float(getattr(message, field)) if message.HasField(field) else None


def _refusal(spec: pb.ParameterSpec, value: Any) -> str | None:
    """Why `value` does not fit `spec` (a phrase to follow the parameter's name), or None."""
    if not is_of_type(value, spec.type):
        return f"must be {_KINDS[spec.type]}, not {_shown(value)}"
    options = [plain(o) for o in spec.options]
    if options and value not in options:
        listed = ", ".join(_shown(o) for o in options[:10])
        return f"must be one of {listed}{', ...' if len(options) > 10 else ''}, not {_shown(value)}"
    minimum, maximum = _optional(spec, "minimum"), _optional(spec, "maximum")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        return f"must be {_range(minimum, maximum)}, not {_shown(value)}"
    return None


def check_range(message: pb.ParameterSpec | pb.ParameterBound, at: str) -> None:
    """INVALID_ARGUMENT naming `<at>.minimum` or `<at>.maximum` unless each end that is set is
    finite and the minimum is not above the maximum: a declaration's range and a policy's
    bound alike."""
    for end in ("minimum", "maximum"):
        if message.HasField(end) and not math.isfinite(getattr(message, end)):
            raise InvalidArgument(f"{at}.{end} must be a finite number", field=f"{at}.{end}")
    minimum, maximum = _optional(message, "minimum"), _optional(message, "maximum")
    if minimum is not None and maximum is not None and minimum > maximum:
        raise InvalidArgument(f"{at}.minimum must not be above {at}.maximum", field=f"{at}.minimum")


def check_declaration(specs: Sequence[pb.ParameterSpec]) -> None:
    """INVALID_ARGUMENT naming `parameters[i].<field>` unless `specs` is a well-formed
    declaration: valid unique names, a type each, a default and options of that type (and a
    default the declaration itself accepts), no default for a required parameter, and a range
    only on numbers, its minimum not above its maximum."""
    if len(specs) > MAX_DECLARED:
        raise InvalidArgument(
            f"an algorithm declares at most {MAX_DECLARED} parameters", field="parameters"
        )
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        at = f"parameters[{i}]"
        if not NAME.fullmatch(spec.name):
            raise InvalidArgument(f"{at}.name {NAME_RULE}", field=f"{at}.name")
        if spec.name in seen:
            raise InvalidArgument(f"{at}.name: {spec.name} is declared twice", field=f"{at}.name")
        seen.add(spec.name)
        if spec.type not in _KINDS:
            raise InvalidArgument(
                f"{at}.type must be STRING, INTEGER, NUMBER or BOOLEAN", field=f"{at}.type"
            )
        if spec.type not in NUMERIC:
            for end in ("minimum", "maximum"):
                if spec.HasField(end):
                    raise InvalidArgument(
                        f"{at}.{end}: only INTEGER and NUMBER parameters take a range",
                        field=f"{at}.{end}",
                    )
        check_range(spec, at)
        for j, option in enumerate(spec.options):
            if not is_of_type(plain(option), spec.type):
                raise InvalidArgument(
                    f"{at}.options[{j}] must be {_KINDS[spec.type]}", field=f"{at}.options[{j}]"
                )
        if spec.HasField("default_value"):
            if spec.required:
                raise InvalidArgument(
                    f"{at}.default_value: a required parameter has no default",
                    field=f"{at}.default_value",
                )
            refusal = _refusal(spec, plain(spec.default_value))
            if refusal is not None:
                raise InvalidArgument(f"{at}.default_value {refusal}", field=f"{at}.default_value")


def job_values(
    algorithm: pb.Algorithm | None,
    given: Mapping[str, Any],
    datasets: Sequence[pb.Dataset],
) -> dict[str, Any]:
    """The parameters a job runs with: `given` checked against the algorithm's declaration,
    its defaults filled in, then held to every dataset's bounds that apply. INVALID_ARGUMENT
    naming `parameters.<name>` otherwise, with the reason UNKNOWN_PARAMETER,
    PARAMETER_REQUIRED, PARAMETER_INVALID (against the declaration) or PARAMETER_OUT_OF_BOUNDS
    (against a dataset's bound).

    Raw code (`algorithm` None), and an algorithm that declares no parameters (as every one
    published before declarations existed), take any values; a bound then applies to a value
    given under its name and must be a number within it."""
    declared = {s.name: s for s in algorithm.parameters} if algorithm is not None else {}
    values = _declared_values(declared, given) if declared else dict(given)
    did = algorithm.did if algorithm is not None else ""
    for dataset in datasets:
        for bound in dataset.policy.parameter_bounds:
            if bound.algorithm_did and bound.algorithm_did != did:
                continue
            _hold(bound, dataset.name, declared, values)
    return values


def _declared_values(
    declared: Mapping[str, pb.ParameterSpec], given: Mapping[str, Any]
) -> dict[str, Any]:
    for name in given:
        if name not in declared:
            if not NAME.fullmatch(name):
                raise InvalidArgument(
                    f"parameter names {NAME_RULE}", reason="UNKNOWN_PARAMETER", field="parameters"
                )
            raise InvalidArgument(
                f"parameters.{name} is not a parameter of this algorithm "
                f"(it takes {', '.join(declared)})",
                reason="UNKNOWN_PARAMETER",
                field=f"parameters.{name}",
            )
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        field = f"parameters.{name}"
        if name in given:
            refusal = _refusal(spec, given[name])
            if refusal is not None:
                raise InvalidArgument(f"{field} {refusal}", reason="PARAMETER_INVALID", field=field)
            values[name] = given[name]
        elif spec.required:
            raise InvalidArgument(f"{field} is required", reason="PARAMETER_REQUIRED", field=field)
        elif spec.HasField("default_value"):
            values[name] = plain(spec.default_value)
    return values


def _hold(
    bound: pb.ParameterBound,
    dataset: str,
    declared: Mapping[str, pb.ParameterSpec],
    values: Mapping[str, Any],
) -> None:
    """INVALID_ARGUMENT unless the job's value under `bound.name` lies within it. A declaring
    algorithm's bound applies to a numeric parameter it declares, which then needs a value; an
    undeclared value is bounded only when given."""
    minimum, maximum = _optional(bound, "minimum"), _optional(bound, "maximum")
    if minimum is None and maximum is None:
        return
    field = f"parameters.{bound.name}"
    limit = f"{_range(minimum, maximum)} ({dataset} bounds it)"
    if declared:
        spec = declared.get(bound.name)
        if spec is None or spec.type not in NUMERIC:
            return
        if bound.name not in values:
            raise InvalidArgument(
                f"{field} must be given: it must be {limit}",
                reason="PARAMETER_OUT_OF_BOUNDS",
                field=field,
            )
    elif bound.name not in values:
        return
    value = values[bound.name]
    if (
        not _is_number(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise InvalidArgument(
            f"{field} must be {limit}, not {_shown(value)}",
            reason="PARAMETER_OUT_OF_BOUNDS",
            field=field,
        )
