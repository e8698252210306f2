"""The adversary and privacy layer: bad heads and updates (`attacks`), clip + noise of uploads with epsilon
(`privacy`), and the ClientApp mods that play both (`mods`)."""
