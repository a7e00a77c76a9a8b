"""The Hub: loading folders safely, writing Hub-ready folders, model cards and checked uploads."""
