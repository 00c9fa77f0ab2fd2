"""Offline, strict validation of Kubernetes objects against the API schemas of every Kubernetes
version the mesh supports (kubernetes-validate's bundled schemas; no cluster needed).

Shared by the manifest tests (tests/deploy) and the engine's Kubernetes backend tests, which
validate the objects the engine builds."""

from __future__ import annotations

import functools
import re
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import referencing
from kubernetes_validate import utils as kv_utils  # type: ignore[import-untyped]

# The oldest minor we claim is 1.30: every feature the manifests and job pods use is GA there
# (gRPC probes since 1.27, Pod Security admission since 1.25), and managed offerings still run
# it under extended support. The newest is 1.37, the last kubernetes-validate 1.37 ships; the
# even minors between catch a field that was added or dropped along the way.
SUPPORTED_KUBERNETES_VERSIONS: tuple[str, ...] = ("1.30", "1.32", "1.34", "1.36", "1.37")

_SCHEMA_ROOT = "kubernetes-json-schema"


def validate_strict(obj: dict[str, Any]) -> None:
    """Validates `obj` against each supported version's schema in strict mode (unknown fields
    are refused). Raises AssertionError naming the version, the object and what is wrong."""
    if not isinstance(obj, dict):
        raise AssertionError(f"not a Kubernetes object (a mapping): {obj!r:.200}")
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise AssertionError(f"apiVersion and kind must be strings: {obj!r:.200}")
    for version in SUPPORTED_KUBERNETES_VERSIONS:
        validator = _validator(version, api_version, kind)
        if validator is None:
            raise AssertionError(
                f"Kubernetes {version} has no {kind} in {api_version}: {_label(obj)}"
            )
        error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
        if error is not None:
            where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
            raise AssertionError(
                f"Kubernetes {version}: {_label(obj)} is invalid at {where}: {error.message}"
            )


def _label(obj: dict[str, Any]) -> str:
    """kind/namespace/name, as far as the object says."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    parts = [str(obj.get("kind")), metadata.get("namespace"), metadata.get("name", "(no name)")]
    return "/".join(str(part) for part in parts if part)


@functools.cache
def _schema_dir(version: str) -> str:
    """kubernetes-validate's strict schema folder for a minor version ("1.30")."""
    for full in kv_utils.all_versions():
        if kv_utils.major_minor(full) == version:
            return f"{_SCHEMA_ROOT}/v{full}-local-strict"
    raise AssertionError(f"kubernetes-validate ships no schemas for Kubernetes {version}")


@functools.cache
def _definitions(version: str) -> referencing.Resource[Any]:
    # The shared definitions file is about 1 MB: read once per version, not once per object.
    contents = kv_utils.schema_contents(f"{_schema_dir(version)}/_definitions.json", version)
    return referencing.Resource.from_contents(contents)


@functools.cache
def _validator(version: str, api_version: str, kind: str) -> jsonschema.Draft202012Validator | None:
    """The validator of one kind in one version, as kubernetes_validate.validate builds it (the
    same files, the same draft), made once; None when that version has no such kind."""
    # "networking.k8s.io/v1" -> "networking-v1", "v1" -> "v1": kubernetes-validate's file names.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kv_utils.schema_contents(
            f"{_schema_dir(version)}/{kind.lower()}-{group_version}.json", version
        )
    except FileNotFoundError:
        return None
    registry: referencing.Registry[Any] = referencing.Resource.from_contents(schema) @ (
        _definitions(version) @ referencing.Registry()
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)
