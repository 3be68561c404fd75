"""Serving layer: exports for TF Serving and other runtimes, the gRPC client, the dev server.

Submodules: `savedmodel` (read and check a SavedModel, its versions and kiqa.json),
`export` (write and publish a versioned SavedModel; `ExportOptions`, shared by every
format), `warmup` (TF Serving's warmup records), `ops` (the op allow list), `onnx` and
`litert` (other export formats), `artifact` (their parity and kiqa.json), `preprocess`
(kiqa's image rule in Pillow, for runtimes without kiqa's decoder), `engines` (ONNX
Runtime, OpenVINO), `client` (score images against TF Serving's gRPC API) and
`devserver` (a loopback stand-in for TF Serving). Nothing is imported here, so
`import kiqa.serving.client` does not load the Keras exporter.
"""
