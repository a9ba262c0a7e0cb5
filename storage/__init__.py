"""Durable Raft log and hard state: LMDB (`storage.lmdb_store`) and an in-memory double."""
