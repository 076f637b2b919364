"""The bulk job on Ray Data: ``clipvision batch run|status|verify`` (the ``ray`` extra).

A surface beside api/: it drives the server's runtime (through encoders.py only) or a
running server (through the client) over a manifest of fixed shards, each committed as
one Parquet file. Nothing in the server imports it; the ``clipvision`` command does.
"""
