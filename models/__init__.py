"""MolGen-Bench's library: the domains (models/domains.py) and the backbones and processes they name, the tasks
train.py trains (models/tasks.py) and the loop's parts (models/training.py), data, metrics, checkpoints, labels and
the student force field. models/README.md maps the modules. Modules that need no torch (domains, labels, fileio,
cli) import without it, so the scripts check their flags before the heavy imports."""
