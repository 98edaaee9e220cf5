"""`python -m dtrain doctor`: the same as the `dtrain doctor` command."""

from dtrain.launch.doctor import entry

entry()
