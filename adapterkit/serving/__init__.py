"""Serving: many callers at once on one resident base, each request choosing its pocket book.

``engine.py`` decodes mixed batches (continuous batching, one forward per step), ``rows.py``
adds each row's own LoRA delta, ``kv.py`` keeps the batch's KV cache as rows join and leave,
``requests.py`` is what a caller submits and reads back, ``names.py`` reads what a request's
``model`` names; the HTTP app sits on top of the engine. Only ``rows.py`` (a torch module)
imports torch when imported.
"""
