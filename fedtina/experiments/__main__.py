"""`python -m fedtina.experiments`: every experiment and app, with its one-line summary."""

from fedtina.experiments.harness import APPS, PACKAGE, experiments, summary

print("experiments: python -m fedtina.experiments.<name> key=value ...  (configs/<name>.yaml)")
for name, line in experiments().items():
    print(f"  {name:<12} {line}")
print("apps: python -m fedtina.<name> ...")
for name in APPS:
    print(f"  {name:<12} {summary(PACKAGE.parent / f'{name}.py')}")
