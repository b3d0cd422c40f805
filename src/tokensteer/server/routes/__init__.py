"""The server's HTTP routes: completions, chat, and the model/tokenizer/health/metrics routes."""
