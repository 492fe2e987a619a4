"""The pure (sans-I/O) protocol package.

It parses and builds messages and decides replies from explicit inputs. It never
touches sockets, clocks, files or randomness, and on any input bytes it raises
nothing but :class:`nattool.errors.ProtocolError` (or a subclass of NattoolError).
"""
