"""The accuracy benchmark's parts (bench/accuracy.py is its command): the variants a run plans, running them over
the items, what their outcomes add up to, the targets they are checked against, and the tables and plot."""
