"""Client-side procedures built on nattool.net and nattool.protocol: probe, connect, bench."""
