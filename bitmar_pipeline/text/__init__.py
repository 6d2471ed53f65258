"""Text: the tokenizer and the corpus it is trained on."""
