"""An out-of-tree composer plugin: replaces the in-tree `fused_moe` layer through register_oot.

The replacement computes the same function (it delegates to the in-tree forward) and counts its
calls, so tests can see that composer's factory constructed it without any change to model code.
"""

CALLS = {"forward": 0}


def register() -> None:
    from composer.layers.fused_moe import FusedMoE

    @FusedMoE.register_oot
    class ExampleFusedMoE(FusedMoE):
        def forward(self, hidden_states, topk_weights, topk_ids):
            CALLS["forward"] += 1
            return super().forward(hidden_states, topk_weights, topk_ids)
