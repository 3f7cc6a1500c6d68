"""The Titans / Miras test-time memory mixer (kind "memory", config layers/memory/config.py) on
the neural-memory op (pallas_kernels/neural_memory). `mixer` holds the layer, `decode` the
one-token step that reproduces the training chunking."""
