"""The federation's building blocks, shared by the ServerApp (`server/`), the ClientApps (`clients/`) and the driver
(`fedtina.simulate`); of these, only `mods` and `aggregation` import Flower:

* `partition`   non-IID client partitions (classes, zoo-part train images, test-part images, server hold-out); JSON
* `client_ops`  a client's data (memory-mapped features), head scoring, fine-tuning, FedAvg local steps
* `checks`      the server's gate for uploaded heads (shape, finiteness, norms, held-out accuracy)
* `profiling`   per-phase wall/CPU/peak-memory/bytes records, encoded for Flower ConfigRecords
* `report`      per-method summary, CSV/JSON/PNG report, console table
* `attacks`     bad heads and bad updates (what a poisoned client sends); `mods` plays them, and the privacy mods,
                as ClientApp mods
* `privacy`     clip + Gaussian noise of uploads, epsilon from Flower's RDP accountant
* `aggregation` the FedAvg family's server rule: Flower's FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan

Import the submodules directly (`from fedtina.federation.partition import make_partition`); this package keeps its
import light so the Flower glue modules living beside it (`runtime`, `launch`) load fast.
"""
