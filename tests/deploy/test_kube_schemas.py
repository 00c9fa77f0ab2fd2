"""tests.kube_schemas: the supported Kubernetes versions exist in kubernetes-validate, and
validate_strict refuses what kubernetes-validate's strict mode refuses, saying where."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from kubernetes_validate import utils as kv_utils

from tests.kube_schemas import SUPPORTED_KUBERNETES_VERSIONS, validate_strict

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "nginx:1"}]},
        },
    },
}


def _with(path: list[str | int], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(DEPLOYMENT)
    target: Any = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


def test_the_supported_versions_are_shipped_and_in_order() -> None:
    shipped = {kv_utils.major_minor(version) for version in kv_utils.all_versions()}
    assert set(SUPPORTED_KUBERNETES_VERSIONS) <= shipped
    as_numbers = [tuple(map(int, v.split("."))) for v in SUPPORTED_KUBERNETES_VERSIONS]
    assert as_numbers == sorted(set(as_numbers))
    assert as_numbers[0] >= (1, 25) and as_numbers[-1] <= (1, 37)


def test_a_valid_object_passes() -> None:
    validate_strict(copy.deepcopy(DEPLOYMENT))


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        (_with(["spec", "replicass"], 2), "'replicass' was unexpected"),
        (
            _with(["spec", "template", "spec", "containers", 0, "imagePolicy"], "Always"),
            "spec.template.spec.containers.0",
        ),
        (_with(["spec", "replicas"], "two"), "spec.replicas"),
    ],
    ids=["unknown-field", "unknown-nested-field", "wrong-type"],
)
def test_an_invalid_object_is_refused_naming_the_version_object_and_place(
    changed: dict[str, Any], expected: str
) -> None:
    with pytest.raises(AssertionError) as refused:
        validate_strict(changed)
    message = str(refused.value)
    assert f"Kubernetes {SUPPORTED_KUBERNETES_VERSIONS[0]}" in message
    assert "Deployment/shop/web" in message
    assert expected in message


def test_a_kind_no_supported_version_serves_is_refused() -> None:
    removed = {
        "apiVersion": "batch/v1beta1",  # CronJob's beta API, gone since 1.25
        "kind": "CronJob",
        "metadata": {"name": "nightly"},
        "spec": {},
    }
    with pytest.raises(AssertionError, match=r"has no CronJob in batch/v1beta1"):
        validate_strict(removed)
    with pytest.raises(AssertionError, match="apiVersion and kind"):
        validate_strict({"metadata": {"name": "x"}})


@pytest.mark.parametrize(
    "obj",
    [
        DEPLOYMENT,
        _with(["spec", "replicass"], 2),
        _with(["spec", "template", "spec", "containers", 0, "name"], 7),
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "deny"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "deny"},
            "spec": {"podSelector": {}, "policyType": ["Ingress"]},
        },
    ],
    ids=["valid", "unknown-field", "wrong-type", "valid-policy", "misspelt-policy"],
)
def test_it_agrees_with_kubernetes_validate(obj: dict[str, Any]) -> None:
    def passes_kubernetes_validate(version: str) -> bool:
        try:
            kubernetes_validate.validate(copy.deepcopy(obj), version, strict=True)
        except kubernetes_validate.ValidationError:
            return False
        return True

    expected = all(passes_kubernetes_validate(v) for v in SUPPORTED_KUBERNETES_VERSIONS)
    try:
        validate_strict(copy.deepcopy(obj))
    except AssertionError:
        assert not expected, "refused what kubernetes-validate accepts"
    else:
        assert expected, "accepted what kubernetes-validate refuses"
