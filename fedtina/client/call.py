"""What a client step receives: the message's records, its config, the client's id and its persistent state; and
the method's options as its own dataclass (`call.options`). Options travel in the message's one ConfigRecord as
`<prefix>.<field>` entries: `pack` on the server, `unpack` on the client, nothing else reads them.

`state` is the node's `Context.state` (a RecordDict): Flower keeps it in the driver between messages and ships it to
whichever actor runs the node, so personal models (FedPer's head, Ditto's model) survive across rounds there.
Data is loaded lazily and cached per actor process (fedtina.client.ops).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from fedtina.client import ops as client_ops
from fedtina.config import HeadTrainConfig, from_dict
from fedtina.data.partition import ClientSpec, client_spec
from fedtina.errors import FedtinaError

OPTIONS = "options"   # the prefix of the method's own options in a message's config
HEAD_FT = "head_ft"   # the prefix of the clients' head fine-tuning (HeadTrainConfig) beside them

T = TypeVar("T")


def pack(options: Any, prefix: str = OPTIONS) -> dict[str, Any]:
    """A dataclass as ConfigRecord entries `<prefix>.<field>` (a nested dataclass: `<prefix>.<field>.<sub>`), to go
    into a message's config beside the other entries; `unpack` reads it back."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        value, key = getattr(options, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(pack(value, key))
        elif value is None:   # a ConfigRecord holds no null: an option that may be null cannot reach a client
            raise FedtinaError(f"{key}=null cannot travel in a message config")
        else:
            out[key] = value
    return out


def unpack(cls: type[T], record: Any, prefix: str = OPTIONS) -> T:
    """The dataclass `cls` that `pack(options, prefix)` put into `record` (a ConfigRecord or a dict)."""
    tree: dict[str, Any] = {}
    for key, value in record.items():
        if key.startswith(f"{prefix}."):
            *path, last = key[len(prefix) + 1:].split(".")
            node = tree
            for p in path:
                node = node.setdefault(p, {})
            node[last] = list(value) if isinstance(value, list) else value
    return from_dict(cls, tree, prefix)


@dataclass
class ClientCall:
    content: Any          # the message's RecordDict
    cfg: Any              # its "config" ConfigRecord
    cid: int              # partition id
    state: Any            # Context.state (RecordDict), persistent per node
    note: str = field(default="")   # goes into the phase record's detail (e.g. which state the step started from)
    options_cls: type | None = None   # the method's options dataclass (`options`)

    @property
    def options(self) -> Any:
        """The method's options, as the server packed them (its own dataclass)."""
        return unpack(self.options_cls, self.cfg) if self.options_cls is not None else None

    @property
    def head_ft(self) -> HeadTrainConfig:
        """The clients' head fine-tuning, as the server packed it (Federation.finetune_config)."""
        return unpack(HeadTrainConfig, self.cfg, HEAD_FT)

    @property
    def round(self) -> int:
        return int(self.cfg.get("round", self.cfg.get("server-round", 0)))

    @property
    def spec(self) -> ClientSpec:
        return client_spec(str(self.cfg["partition"]), self.cid)

    @property
    def data(self) -> client_ops.ClientData:
        """Frozen features of its images (the generic backbone's)."""
        return client_ops.load_client_data(str(self.cfg["features"]), str(self.cfg["partition"]), self.cid)

    def images(self) -> client_ops.ClientImages:
        """Its raw images: labelled training images and local test images."""
        return client_ops.load_client_images(str(self.cfg["images"]), str(self.cfg["partition"]), self.cid)

    @property
    def device(self) -> str:
        from fedtina.device import pick_device

        return str(pick_device(str(self.cfg.get("device", "auto"))))

    def arrays(self, key: str = "arrays") -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.content[key].items()}

    def load_state(self, key: str) -> dict[str, np.ndarray] | None:
        """Arrays this node saved under `key` in an earlier message (None: none); the note says from which round."""
        if key not in self.state.array_records:
            return None
        self.note = f"{key} from Context.state, saved in round {int(self.state[f'{key}.meta']['round'])}"
        return {k: v.numpy() for k, v in self.state[key].items()}

    def save_state(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        from flwr.app import ConfigRecord

        from fedtina.runtime.spec import arrays_record

        self.state[key] = arrays_record(arrays)
        self.state[f"{key}.meta"] = ConfigRecord({"round": self.round})


def update(arrays: dict[str, np.ndarray], n: int):
    """A training step's reply: the arrays for the strategy to aggregate, weighted by `n` examples."""
    from flwr.app import MetricRecord

    from fedtina.runtime.spec import arrays_record

    return {"arrays": arrays_record(arrays), "metrics": MetricRecord({"num-examples": int(n)})}, None


def scored(acc: float, n: int):
    """An evaluate step's reply: the client's accuracy on its `n` test examples."""
    from flwr.app import MetricRecord

    return {"metrics": MetricRecord({"acc": float(acc), "num-examples": int(n)})}, float(acc)
