"""The Open Inference Protocol's gRPC messages and service, generated from
``grpc_predict_v2.proto`` by ``make proto`` (do not edit the ``*_pb2*.py`` files)."""
