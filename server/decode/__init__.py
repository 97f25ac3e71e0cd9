"""The decode engine: one thread per model version owns its batch (loop.py), token choice
has one owner (choose.py), streams buffer their output for the event loop (stream.py), and
admission is bounded server-wide (limiter.py). docs/serving.md explains the design."""
