"""The OIP gRPC messages, built from the compiled descriptor in a private protobuf pool.

A private pool (not protobuf's default one) so that a process may also import tritonclient, whose
generated code registers the same ``inference.*`` names; and no protoc gencode, so no coupling between
protoc's version and the protobuf runtime's (see gen_proto.py).
"""
from __future__ import annotations

from google.protobuf import descriptor_pool, message_factory

from ._descriptor import FILE_DESCRIPTOR

SERVICE = "inference.GRPCInferenceService"

_pool = descriptor_pool.DescriptorPool()
_pool.AddSerializedFile(FILE_DESCRIPTOR)


def _message(name: str):
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"inference.{name}"))


ServerLiveRequest = _message("ServerLiveRequest")
ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyRequest = _message("ServerReadyRequest")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyRequest = _message("ModelReadyRequest")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataRequest = _message("ServerMetadataRequest")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataRequest = _message("ModelMetadataRequest")
ModelMetadataResponse = _message("ModelMetadataResponse")
ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")
InferTensorContents = _message("InferTensorContents")

# method name -> (request class, response class); every method the service declares.
METHODS = {
    "ServerLive": (ServerLiveRequest, ServerLiveResponse),
    "ServerReady": (ServerReadyRequest, ServerReadyResponse),
    "ModelReady": (ModelReadyRequest, ModelReadyResponse),
    "ServerMetadata": (ServerMetadataRequest, ServerMetadataResponse),
    "ModelMetadata": (ModelMetadataRequest, ModelMetadataResponse),
    "ModelInfer": (ModelInferRequest, ModelInferResponse),
}


def descriptor(name: str):
    """The descriptor of message ``inference.<name>`` (tests compare it with other copies of the proto)."""
    return _pool.FindMessageTypeByName(f"inference.{name}")
