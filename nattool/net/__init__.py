"""All sockets and event loops: the server loop, client transactions, DNS."""
