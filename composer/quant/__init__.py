"""Quant methods: one module per method, each a strategy registered by name in QUANT_METHODS."""
