"""fedtina's Flower ClientApp (evaluates, fine-tunes and uploads heads; FedAvg local steps)."""
