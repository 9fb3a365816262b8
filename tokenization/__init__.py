"""Text <-> token ids. One interface (tokenizer.Tokenizer) with two implementations: GPT-2's, run by tiktoken
(tokenizer.py), and a tokenizer.json, run by Hugging Face's `tokenizers` (llama_tokenizer.py: LLaMA, SmolLM2, .gguf
files). load_tokenizer(spec, vocab_size) finds the one a model reads; chat.py renders chats with its template."""
from tokenization.tokenizer import load_tokenizer  # noqa: F401
