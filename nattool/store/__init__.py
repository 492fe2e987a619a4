"""Tracker state behind one interface: memory, sqlite (the default), redis."""
