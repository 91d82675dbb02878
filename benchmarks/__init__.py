"""Benchmark harness and leaderboard (FROC/CPM, Dice, AUC, timings). Configs are the YAML files here."""
