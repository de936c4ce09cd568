"""The seeding helpers under their former name; they live in ``fedpeft.seeding`` (a leaf module, so
that strategies can derive seeds without importing the federation package that imports them)."""

from fedpeft.seeding import derive_seed, index_stream, sample_clients

__all__ = ["derive_seed", "index_stream", "sample_clients"]
