"""What every Tessera process needs: its configuration, the engine built from it, metrics and health."""
