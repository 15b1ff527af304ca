"""The tokenizers a store carries, and loading one given by path: ``runtime.load_tokenizer`` (a store's own), ``loaders``
(a tokenizer given by path, installing it into a store); one module per kind (``base``: the interface and the byte
tokenizer; ``hf``, ``spm``, ``gguf_rebuild``, ``tiktoken_bpe``), ``config_files`` for the side files they share."""
