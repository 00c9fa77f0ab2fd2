"""Typed algorithm parameters: a declaration is checked when the algorithm is published, a
job's values when it starts (against the declaration, then against each dataset's bounds),
refusals name `parameters.<name>` over gRPC and REST, and the values the job runs with (given,
or defaults) are what it reads from algoCustomData.json."""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
import pytest
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import struct_pb2

from mesh.errors import InvalidArgument
from provider import parameters
from tests.conftest import LocalMesh, Rest, needs_root, new_key
from tests.e2e.test_hostile import log_of
from tests.e2e.test_job import error_info, run_to_end
from tests.e2e.test_rest import error_info as rest_error_info
from tests.e2e.test_rest import error_of, signed
from tests.provider.test_policy import publish_data, refused

T = pb.ParameterType
DID = "did:c2d:" + "a" * 64
OTHER_DID = "did:c2d:" + "b" * 64


def value(v: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    if isinstance(v, bool):
        message.bool_value = v
    elif isinstance(v, int | float):
        message.number_value = v
    else:
        message.string_value = v
    return message


def spec(name: str, kind: int, **fields: Any) -> pb.ParameterSpec:
    declared = pb.ParameterSpec(name=name, type=kind)  # type: ignore[arg-type]
    if "default" in fields:
        declared.default_value.CopyFrom(value(fields.pop("default")))
    declared.options.extend(value(o) for o in fields.pop("options", []))
    for key, item in fields.items():
        setattr(declared, key, item)
    return declared


DECLARATION = [
    spec("min_group_size", T.PARAMETER_TYPE_INTEGER, required=True, minimum=1),
    spec("rate", T.PARAMETER_TYPE_NUMBER, default=0.5, minimum=0, maximum=1),
    spec("mode", T.PARAMETER_TYPE_STRING, default="mean", options=["mean", "median"]),
    spec("verbose", T.PARAMETER_TYPE_BOOLEAN),
    spec("label", T.PARAMETER_TYPE_STRING),
]


def bounded(*bounds: pb.ParameterBound) -> pb.Dataset:
    return pb.Dataset(
        name="datasets/" + "c" * 64, policy=pb.ComputePolicy(parameter_bounds=list(bounds))
    )


def declared(specs: list[pb.ParameterSpec] = DECLARATION, did: str = DID) -> pb.Algorithm:
    return pb.Algorithm(did=did, parameters=specs)


def refusal_field(call: Any) -> str:
    with pytest.raises(InvalidArgument) as caught:
        call()
    assert caught.value.field is not None
    assert caught.value.field in caught.value.message
    return caught.value.field


# -- declarations ----------------------------------------------------------------------------


def test_a_well_formed_declaration_passes() -> None:
    parameters.check_declaration(DECLARATION)
    parameters.check_declaration([])


@pytest.mark.parametrize(
    ("specs", "field"),
    [
        ([spec("", T.PARAMETER_TYPE_STRING)], "parameters[0].name"),
        ([spec("9lives", T.PARAMETER_TYPE_STRING)], "parameters[0].name"),
        ([spec("a-b", T.PARAMETER_TYPE_STRING)], "parameters[0].name"),
        ([spec("x" * 65, T.PARAMETER_TYPE_STRING)], "parameters[0].name"),
        (
            [spec("k", T.PARAMETER_TYPE_STRING), spec("k", T.PARAMETER_TYPE_NUMBER)],
            "parameters[1].name",
        ),
        ([spec("k", T.PARAMETER_TYPE_UNSPECIFIED)], "parameters[0].type"),
        ([spec("k", 9)], "parameters[0].type"),
        ([spec("k", T.PARAMETER_TYPE_INTEGER, default=1.5)], "parameters[0].default_value"),
        ([spec("k", T.PARAMETER_TYPE_BOOLEAN, default=1)], "parameters[0].default_value"),
        (
            [spec("k", T.PARAMETER_TYPE_NUMBER, required=True, default=1)],
            "parameters[0].default_value",
        ),
        ([spec("k", T.PARAMETER_TYPE_NUMBER, default=5, maximum=4)], "parameters[0].default_value"),
        (
            [spec("k", T.PARAMETER_TYPE_STRING, default="c", options=["a", "b"])],
            "parameters[0].default_value",
        ),
        ([spec("k", T.PARAMETER_TYPE_STRING, options=["a", 1])], "parameters[0].options[1]"),
        ([spec("k", T.PARAMETER_TYPE_INTEGER, options=[1, 2.5])], "parameters[0].options[1]"),
        ([spec("k", T.PARAMETER_TYPE_NUMBER, minimum=2, maximum=1)], "parameters[0].minimum"),
        ([spec("k", T.PARAMETER_TYPE_STRING, minimum=1)], "parameters[0].minimum"),
        ([spec("k", T.PARAMETER_TYPE_BOOLEAN, maximum=1)], "parameters[0].maximum"),
        ([spec("k", T.PARAMETER_TYPE_NUMBER, maximum=float("inf"))], "parameters[0].maximum"),
        ([spec(f"k{i}", T.PARAMETER_TYPE_STRING) for i in range(101)], "parameters"),
    ],
)
def test_a_malformed_declaration_is_refused_naming_the_field(
    specs: list[pb.ParameterSpec], field: str
) -> None:
    assert refusal_field(lambda: parameters.check_declaration(specs)) == field


# -- a job's values --------------------------------------------------------------------------


def test_defaults_fill_what_is_not_given() -> None:
    values = parameters.job_values(declared(), {"min_group_size": 5.0}, [])
    assert values == {"min_group_size": 5.0, "rate": 0.5, "mode": "mean"}
    given = {"min_group_size": 7, "rate": 1, "mode": "median", "verbose": True, "label": "x"}
    assert parameters.job_values(declared(), given, []) == given


@pytest.mark.parametrize(
    ("given", "field", "words"),
    [
        ({"min_group_size": 5, "colour": "red"}, "parameters.colour", "not a parameter"),
        ({"min_group_size": 5, "bad name": 1}, "parameters", "letters, digits"),
        ({}, "parameters.min_group_size", "required"),
        ({"min_group_size": 2.5}, "parameters.min_group_size", "whole number"),
        ({"min_group_size": "5"}, "parameters.min_group_size", "whole number"),
        ({"min_group_size": True}, "parameters.min_group_size", "whole number"),
        ({"min_group_size": 0}, "parameters.min_group_size", "at least 1"),
        ({"min_group_size": 5, "rate": 1.5}, "parameters.rate", "between 0 and 1"),
        ({"min_group_size": 5, "mode": "max"}, "parameters.mode", '"mean", "median"'),
        ({"min_group_size": 5, "verbose": "yes"}, "parameters.verbose", "true or false"),
        ({"min_group_size": 5, "label": 3}, "parameters.label", "a string"),
        ({"min_group_size": 5, "rate": float("nan")}, "parameters.rate", "a number"),
    ],
)
def test_values_the_declaration_refuses(given: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parameters.job_values(declared(), given, [])
    assert caught.value.field == field
    assert words in caught.value.message


def test_bounds_hold_for_the_values_a_declaring_algorithm_runs_with() -> None:
    at_least_10 = pb.ParameterBound(name="min_group_size", minimum=10)
    rate_cap = pb.ParameterBound(name="rate", maximum=0.25)
    job = parameters.job_values
    assert job(declared(), {"min_group_size": 10}, [bounded(at_least_10)])["min_group_size"] == 10
    with pytest.raises(InvalidArgument) as small:
        job(declared(), {"min_group_size": 3}, [bounded(at_least_10)])
    assert small.value.field == "parameters.min_group_size"
    assert "at least 10" in small.value.message and "datasets/" + "c" * 64 in small.value.message
    # The default counts: rate 0.5 is above this dataset's cap.
    with pytest.raises(InvalidArgument) as default:
        job(declared(), {"min_group_size": 10}, [bounded(rate_cap)])
    assert default.value.field == "parameters.rate"
    # A bound for another algorithm, or on a parameter that is not a declared number, does
    # not apply.
    elsewhere = pb.ParameterBound(name="min_group_size", algorithm_did=OTHER_DID, minimum=99)
    on_string = pb.ParameterBound(name="mode", minimum=99)
    undeclared = pb.ParameterBound(name="window", minimum=99)
    assert job(declared(), {"min_group_size": 5}, [bounded(elsewhere, on_string, undeclared)])
    mine = pb.ParameterBound(name="min_group_size", algorithm_did=DID, minimum=99)
    with pytest.raises(InvalidArgument):
        job(declared(), {"min_group_size": 5}, [bounded(mine)])
    # A bounded number the job gives no value for (no default either) must be given.
    optional = [spec("k", T.PARAMETER_TYPE_NUMBER)]
    with pytest.raises(InvalidArgument) as missing:
        job(declared(optional), {}, [bounded(pb.ParameterBound(name="k", maximum=3))])
    assert missing.value.field == "parameters.k" and "must be given" in missing.value.message


def test_undeclared_values_pass_but_bounds_hold_for_those_given() -> None:
    bound = bounded(pb.ParameterBound(name="k", minimum=10, maximum=20))
    for algorithm in (None, declared([])):
        anything = {"k": 15, "free": {"nested": [1, "x"]}}
        assert parameters.job_values(algorithm, anything, [bound]) == anything
        # A bound on a value not given does not apply.
        assert parameters.job_values(algorithm, {"other": 1}, [bound]) == {"other": 1}
        for wrong in (5, 25, "15", True):
            with pytest.raises(InvalidArgument) as caught:
                parameters.job_values(algorithm, {"k": wrong}, [bound])
            assert caught.value.field == "parameters.k"
            assert "between 10 and 20" in caught.value.message
    # A bound for a published algorithm's DID never applies to raw code.
    did_bound = bounded(pb.ParameterBound(name="k", algorithm_did=DID, minimum=10))
    assert parameters.job_values(None, {"k": 1}, [did_bound]) == {"k": 1}


# -- through StartCompute --------------------------------------------------------------------

# Prints what it was given, so the test can see the values the job ran with.
ECHO = b"""
import json
print(json.dumps(json.load(open("/data/inputs/algoCustomData.json")), sort_keys=True))
"""


async def published_with_bounds(mesh: LocalMesh, owner: Any, consumer: Any) -> tuple[Any, Any]:
    algorithm = await consumer.publish_algorithm(
        b"print(1)\n" + ECHO, "python3 $ALGO", parameters=DECLARATION
    )
    assert list(algorithm.parameters) == DECLARATION
    policy = pb.ComputePolicy(
        publisher_trusted_algorithms=[await owner.trust(algorithm.did)],
        parameter_bounds=[pb.ParameterBound(name="min_group_size", minimum=10)],
    )
    return algorithm, await publish_data(mesh, owner, policy)


@needs_root
async def test_start_compute_refuses_values_naming_the_parameter(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        bad = await refused(
            consumer.publish_algorithm(
                b"print(1)\n", "python3 $ALGO", parameters=[spec("k", T.PARAMETER_TYPE_UNSPECIFIED)]
            )
        )
        assert error_info(bad).metadata["field"] == "parameters[0].type"
        algorithm, dataset = await published_with_bounds(local_mesh, owner, consumer)
        for given, field in (
            ({"min_group_size": 3}, "parameters.min_group_size"),  # the dataset's bound
            ({"min_group_size": 12.5}, "parameters.min_group_size"),  # not whole
            ({}, "parameters.min_group_size"),  # required
            ({"min_group_size": 12, "extra": 1}, "parameters.extra"),
            ({"min_group_size": 12, "mode": "max"}, "parameters.mode"),
        ):
            error = await refused(
                consumer.start_compute([dataset.did], algorithm=algorithm.did, parameters=given)
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, given
            assert error_info(error).metadata["field"] == field
        bound = await refused(
            consumer.start_compute(
                [dataset.did], algorithm=algorithm.did, parameters={"min_group_size": 3}
            )
        )
        assert dataset.name in (bound.details() or "") and "at least 10" in (bound.details() or "")
        assert error_info(bound).reason == "PARAMETER_OUT_OF_BOUNDS"
        refusals = await owner.list_audit_events(action="compute.start")
        assert [e.reason for e in refusals] == [
            "PARAMETER_OUT_OF_BOUNDS",
            "PARAMETER_INVALID",
            "PARAMETER_REQUIRED",
            "UNKNOWN_PARAMETER",
            "PARAMETER_INVALID",
            "PARAMETER_OUT_OF_BOUNDS",
        ]
        assert all(e.outcome == pb.AUDIT_OUTCOME_REFUSED for e in refusals)
        assert all(e.resource == dataset.name for e in refusals)


@needs_root
async def test_start_compute_refusals_name_the_parameter_over_rest(rest: Rest) -> None:
    async with (
        rest.mesh.client(rest.mesh.owner) as owner,
        rest.mesh.client(new_key()) as consumer,
    ):
        algorithm, dataset = await published_with_bounds(rest.mesh, owner, consumer)
        request_id = uuid.uuid4().hex
        body = {
            "requestId": request_id,
            "dataset": dataset.name,
            "algorithm": algorithm.name,
            "parameters": {"min_group_size": 3},
        }
        message = pb.StartComputeRequest(
            request_id=request_id, dataset=dataset.name, algorithm=algorithm.name
        )
        message.parameters.update({"min_group_size": 3})
        response = await rest.http.post(
            "/v1/jobs", json=body, headers=signed(consumer, "StartCompute", message)
        )
        error = error_of(response, 400, "INVALID_ARGUMENT")
        assert rest_error_info(error)["metadata"]["field"] == "parameters.min_group_size"
        assert dataset.name in error["message"]


@needs_root
async def test_the_job_reads_the_values_it_runs_with(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        algorithm, dataset = await published_with_bounds(local_mesh, owner, consumer)
        job = await consumer.start_compute(
            [dataset.did], algorithm=algorithm.did, parameters={"min_group_size": 12, "rate": 1}
        )
        _, final = await run_to_end(consumer, job)
        assert final.state == final.STATE_SUCCEEDED, final.message
        printed = (await log_of(consumer, final)).splitlines()[-1]
        # Defaults filled in; whole numbers as integers.
        assert json.loads(printed) == {"min_group_size": 12, "rate": 1, "mode": "mean"}
        assert '"min_group_size": 12,' in printed and '"rate": 1' in printed
