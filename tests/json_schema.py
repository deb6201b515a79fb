"""The stable `--json` answer schema of DESIGN.md §6, as the CLI tests check it (fields may be added)."""

SCHEMA = {"question", "answer", "model", "method", "budget", "documents", "stats"}
DOCUMENT_KEYS = {"name", "sha256", "pages", "tokens", "pages_used"}
STATS_KEYS = {
    "load_s",
    "read_s",
    "tokenize_s",
    "cache_load_s",
    "prefill_s",
    "ttft_s",
    "decode_tokens_per_s",
    "new_tokens",
    "context_tokens",
    "kv_bytes_full",
    "kv_bytes_kept",
    "kept_tokens_per_layer",
}
