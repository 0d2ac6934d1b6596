"""Text and image encoders behind one interface, loading their models from local paths through one cache."""
