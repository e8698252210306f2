"""The server's engine, Flower-facing and method-agnostic: the Federation facade (`federation`) over the run's
transport, roster of clients, results ledger and server-side heads; the run loop (`loop.run_all`, which plays the
methods it is handed); Flower strategies with robust aggregation; and the gate for uploaded heads."""
