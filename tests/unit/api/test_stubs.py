"""The committed stubs are what `make proto` generates from the .proto files."""

from kvmesh.api import codegen
from kvmesh.api.v1 import generation_pb2, worker_pb2


def test_generated_stubs_match_the_protos() -> None:
    assert codegen.check() == [], "run `make proto` and commit the result"


def test_service_names_keep_the_proto_package() -> None:
    assert worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name == "kvmesh.v1.Decode"
    assert generation_pb2.GenerateRequest.__module__ == "kvmesh.api.v1.generation_pb2"
