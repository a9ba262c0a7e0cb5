"""Fault injection against real `raftkv serve` processes: nemesis, clients, history checks."""
