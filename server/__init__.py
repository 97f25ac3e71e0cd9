"""rnn-server: serves exported ONNX model packages over grpc.aio (never imports torch).

Layers, outermost first: main (composition root) -> service (protobuf <-> plain data) ->
generation / scoring / infill / forecasting (pure request logic) -> scheduler (continuous
batching) -> runtime (onnxruntime sessions) -> repository (model packages on disk).
"""
