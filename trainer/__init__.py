"""PyTorch side of rnnserve: corpus, sampling, models, training, export and the CLI.

Nothing here is imported by the server or the client: they read only the exported package.
"""
