"""The served model: user tower → item index → item state → ranking → Value Model → top-k, one
``nn.Module`` published as one snapshot (SilverTorch's index as model)."""
