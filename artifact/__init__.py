"""The model package both sides share: manifest schema, tokenizer and vocabulary.

Nothing here imports torch or grpc, so the trainer writes and the server reads one format.
"""
