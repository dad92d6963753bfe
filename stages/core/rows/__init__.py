"""Row logic: the filter, flags, requests and replies, judgements and scores, the second turn,
release records and SFT conversations, prompts. Imports config and storage, never an engine."""
