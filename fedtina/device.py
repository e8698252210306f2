"""Device selection: CUDA when present, the CPU otherwise."""

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` -> cuda if available else cpu; `cpu` / `cuda` / `cuda:1` are taken as given."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)
