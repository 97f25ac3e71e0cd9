"""The Open Inference Protocol (KServe v2): tensors <-> Engine calls, and the gRPC servicer.

The REST routes (server/http/kserve_routes.py) and the gRPC servicer (service.py) share
`tensors.py` (wire formats) and `mapping.py` (task <-> tensors), so both transports answer
the same call the same way.
"""
