"""MEDS events to a token store (``nextvisit tokenize``, ``nextvisit inspect``).

Modules, each importing only those before it: ``store`` (the token store format), ``config``
(``TokenizerConfig``), ``events`` (annotation and drop reasons), ``vocabulary`` (fitting on train),
``tokenizer`` (``Tokenizer``, ``TokenBatch``, counts), ``shards`` (reading MEDS shards), ``dataset``
(``tokenize_dataset``, ``run_cli``), ``timeline`` (``format_timeline``, ``inspect_cli``).
"""
