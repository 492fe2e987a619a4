"""The tracker's decisions: dispatch a datagram, registry rules, rate limits, federation."""
