"""Experiments: each module is one `python -m fedtina.experiments.<name>` command (Hydra overrides), run through the
shared harness. They sit on top of the library and never import one another."""
