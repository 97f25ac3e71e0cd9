"""The HTTP port (--http-port): OpenAI-compatible completions and KServe v2 REST, served by
aiohttp on the gRPC server's event loop and calling the same Engine (docs/protocols.md)."""
