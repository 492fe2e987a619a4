"""nattool: a NAT tracker (rendezvous) server and the client toolkit around it."""

__version__ = "0.1.0"
