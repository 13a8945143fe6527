"""Data: tokenizer, chat template, embedded corpus, readers for real files, batch loaders."""
