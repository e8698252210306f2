"""fedtina's Flower ServerApp (hosts Tina and the zoo; plays every method on the same clients)."""
