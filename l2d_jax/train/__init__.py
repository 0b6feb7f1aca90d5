"""Training: ``data`` (examples and batches), ``templates`` (chat formats), ``optim``,
``step`` and ``loop``. Submodules are imported on use, so the data pipeline loads without JAX."""
