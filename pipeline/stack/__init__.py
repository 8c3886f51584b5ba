"""The stacking stage: every input layer, masks and terrain on one lazy 10 m grid."""
