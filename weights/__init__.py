"""Shipped molgen models (installed as ``molgen.weights``); each folder holds config.json, params.msgpack,
meta.json and a model card README.md."""
