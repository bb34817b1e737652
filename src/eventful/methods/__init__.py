"""Methods built on the engine: IA-RED^2, TORE, baselines."""
