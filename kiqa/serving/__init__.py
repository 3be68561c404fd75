"""Serving layer: exports for TF Serving and other runtimes, the gRPC client, the dev server.

Submodules: `export` (write, check and publish a versioned SavedModel), `ops` (the op
allow list), `onnx` and `litert` (other export formats), `preprocess` (kiqa's image rule
in Pillow, for runtimes without kiqa's decoder), `client` (score images against TF
Serving's gRPC API) and `devserver` (a loopback stand-in for TF Serving). Nothing is
imported here, so `import kiqa.serving.client` does not load the Keras exporter.
"""
