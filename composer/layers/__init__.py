"""Layers: gate, router, FusedMoE, shared experts, norm, the MoE block and the model stack."""
