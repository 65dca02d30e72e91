"""Split deployment: the language server's ``mm_pipeline`` that calls a remote encoder server.

``encoders.RemoteEncoders`` reaches one or more encoder servers (their ``mm_encoder`` model) over gRPC,
round-robin with fail-over; ``triton_model`` is the BLS model that runs it and then the local
``mm_language``; ``repository`` generates the model repositories ``scripts/serve --role`` serves.
Nothing here imports torch: a pipeline instance is a light process.
"""

from .encoders import EncoderCallError, RemoteEncoders, parse_encoder_urls

__all__ = ["EncoderCallError", "RemoteEncoders", "parse_encoder_urls"]
