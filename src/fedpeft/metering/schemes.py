"""The wire compression schemes by name: the one list that the config (``federation.uplink_compression``)
and the codecs (``compression.py``, which documents each) share. Kept free of torch so that loading a
config does not import it."""

SCHEMES = ("none", "fp16", "bf16", "int8", "int8_channel")
