"""The server's engine, Flower-facing but method-agnostic: the Federation facade (transport, roster of clients,
results ledger), the run loop, FedAvg-family strategies and robust aggregation, and the gate for uploaded heads."""
